"""Geometry: the world (RAS mm) grid a case is built on, shapes evaluated only inside their bounding boxes
(deformed superquadrics, tubes along polylines) and smooth random fields sampled on a grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage


class Grid(NamedTuple):
    """World (RAS mm) coordinates of the voxel centres along each axis of a canonical RAS array."""
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(a[1] - a[0]) if len(a) > 1 else 1.0 for a in self)  # type: ignore[return-value]

    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = [self.x[0], self.y[0], self.z[0]]
        return aff


# ---------------------------------------------------------------------------------------------------
# Geometry helpers: shapes evaluated only inside their bounding boxes.
# ---------------------------------------------------------------------------------------------------
def _box(grid: Grid, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
    """Index slices of the voxels whose centres lie in the world box [lo, hi]; None if empty."""
    out = []
    for axis, a, b in zip(grid, lo, hi):
        start, stop = np.searchsorted(axis, a, "left"), np.searchsorted(axis, b, "right")
        if stop <= start:
            return None
        out.append(slice(int(start), int(stop)))
    return tuple(out)  # type: ignore[return-value]


def _local(grid: Grid, box: tuple[slice, slice, slice], centre: Sequence[float]):
    """Open (broadcastable) float32 offsets from `centre` of the voxels in `box`."""
    return ((grid.x[box[0]] - centre[0]).astype(np.float32)[:, None, None],
            (grid.y[box[1]] - centre[1]).astype(np.float32)[None, :, None],
            (grid.z[box[2]] - centre[2]).astype(np.float32)[None, None, :])


def _rotation(rz: float = 0.0, ry: float = 0.0, rx: float = 0.0) -> np.ndarray:
    """Rotation matrix (columns: the shape's local axes in world coordinates), angles in degrees."""
    a, b, c = np.radians([rz, ry, rx])
    rz_ = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry_ = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx_ = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz_ @ ry_ @ rx_


def _blob(grid: Grid, centre, axes, rot=None, exponent: int = 2, waves=(), taper: float = 0.0):
    """A deformed superquadric: (box, inside mask, normalised radius rho) or None outside the grid.

    rho < 1 inside; `taper` thins the shape towards the negative end of its first local axis (the
    liver's left lobe).
    """
    rot = np.eye(3) if rot is None else rot
    axes = np.asarray(axes, dtype=float)
    # half-extent along each world axis: the rotated ellipsoid's, or its bounding cube's (exponent > 2)
    if exponent == 2:
        half = np.sqrt(((rot * axes[None, :]) ** 2).sum(1))
    else:
        half = (np.abs(rot) * axes[None, :]).sum(1)
    reach = half * (1.0 + sum(w[0] for w in waves)) + 1.0
    box = _box(grid, np.asarray(centre) - reach, np.asarray(centre) + reach)
    if box is None:
        return None
    dx, dy, dz = _local(grid, box, centre)
    u = (dx * rot[0, 0] + dy * rot[1, 0] + dz * rot[2, 0]) / axes[0]
    v = (dx * rot[0, 1] + dy * rot[1, 1] + dz * rot[2, 1]) / axes[1]
    w = (dx * rot[0, 2] + dy * rot[1, 2] + dz * rot[2, 2]) / axes[2]
    if taper:
        thickness = np.clip(1.0 - taper * (1.0 - u) / 2.0, 0.3, None)
        v, w = v / thickness, w / thickness
    bound = 1.0
    for amp, direction, freq, phase in waves:
        bound = bound + amp * np.sin(freq * (u * direction[0] + v * direction[1] + w * direction[2]) + phase)
    u, v, w = u * u, v * v, w * w
    if exponent == 2:
        f = np.sqrt(u + v + w)
    elif exponent == 4:  # boxier (flat-topped) superquadric
        f = np.sqrt(np.sqrt(u * u + v * v + w * w))
    else:
        raise ValueError(f"exponent must be 2 or 4, got {exponent}.")
    rho = f / bound
    return box, rho < 1.0, rho


def _tube(grid: Grid, points: np.ndarray, radii: np.ndarray):
    """Voxels within the interpolated radius of a polyline: (box, mask) or None. Each segment is evaluated
    only inside its own bounding box (a long tube such as the colon crosses the whole abdomen)."""
    reach = float(radii.max()) + 1.0
    box = _box(grid, points.min(0) - reach, points.max(0) + reach)
    if box is None:
        return None
    inside = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
    for (a, b), (ra, rb) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
        r = max(ra, rb) + 1.0
        seg = _box(grid, np.minimum(a, b) - r, np.maximum(a, b) + r)
        if seg is None:
            continue
        px, py, pz = _local(grid, seg, (0.0, 0.0, 0.0))
        d = b - a
        t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2
        inside[tuple(slice(s_.start - b_.start, s_.stop - b_.start) for s_, b_ in zip(seg, box))] |= (
            dist2 < (ra + t * (rb - ra)) ** 2)
    return box, inside


def _smooth_field(rng: np.random.Generator, grid: Grid, cell: float) -> np.ndarray:
    """A smooth random field (unit SD, correlation length ~ `cell` mm), sampled on the grid.

    Drawn on a coarse lattice in world coordinates and interpolated separably, so its look does not
    depend on the voxel size.
    """
    taps = []
    for axis in grid:
        n = int(math.ceil((axis[-1] - axis[0]) / cell)) + 4
        pos = np.clip((axis - axis[0]) / cell + 1.5, 0, n - 1.000001)
        i0 = np.floor(pos).astype(np.intp)
        taps.append((n, i0, (pos - i0).astype(np.float32)))
    field = rng.standard_normal(tuple(t[0] for t in taps)).astype(np.float32)
    field = ndimage.uniform_filter(field, 2, mode="wrap")  # a little smoother than linear
    field /= field.std() + 1e-6
    for dim, (_, i0, frac) in enumerate(taps):  # linear interpolation, one axis at a time
        shape = [1, 1, 1]
        shape[dim] = len(frac)
        frac = frac.reshape(shape)
        field = np.take(field, i0, axis=dim) * (1 - frac) + np.take(field, i0 + 1, axis=dim) * frac
    return field
