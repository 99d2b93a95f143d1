"""The synthetic abdominal-CT generator: the study's embedded default data (docs/study.md, "Data").

`generate` writes the five datasets in their real layouts (MSD `imagesTr/`+`labelsTr/`, KiTS19
`case_XXXXX/`, BTCV `img/`+`label/`) for a subset of the real manifest's cases, so every reader and
notebook runs unchanged on it. Each case is one synthetic patient, built in millimetres in the patient's
RAS frame (+x patient right, +y anterior, +z superior) and sampled onto its dataset's voxel grid:

* anatomy: body with subcutaneous fat and muscle wall, spine, ribs, pelvis, lungs and heart above the
  diaphragm, aorta, IVC, liver, spleen, pancreas, kidneys (cortex, medulla, sinus), stomach,
  gallbladder, bowel with gas; organs are deformed superquadrics (or a tube, the pancreas) with per-case
  size, shape and position, overlaps resolved by painting order;
* tumours (liver 1-3, pancreas 1-2, kidney 1-2; radius 3-25 mm at real scale and never under two
  in-plane voxels; 70 % hypodense by 15-55 HU, else hyperdense by 15-35 HU, large ones with a necrotic
  core) strictly inside the liver, the pancreas or a kidney (a large one widens its organ, as a mass
  does), and only in the images of the dataset whose task includes them;
* labels: each dataset annotates only its own organs with its own values (`fedseg.data.labels`); the other
  organs are in its images but unlabelled;
* per-dataset heterogeneity: voxel size, field of view, scan range, contrast phase, HU offset and gain,
  noise, and the orientation of the stored array (`PROFILES`); every affine maps voxels to RAS mm, so
  MONAI's `Orientationd("RAS")` + `Spacingd` recover the same anatomy;
* CT realism: tissue texture, partial-volume blur of the image (labels stay sharp), Gaussian noise,
  int16 HU; `mri_like` datasets get an MRI-like non-monotonic contrast instead (FedGIN).

Deterministic: case k of dataset d draws from `default_rng([seed, d, k])`, files are gzipped with
mtime 0 and no file name, so the same parameters give the same bytes whatever the worker count.
"""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    ornt_transform,
)
from scipy import ndimage
from scipy.interpolate import CubicSpline
from tqdm.auto import tqdm

from fedseg.data.catalogue import CATALOGUE
from fedseg.data.labels import DATASETS
from fedseg.data.layouts import DATASET_DIRS, LOCAL_MANIFEST
from fedseg.data.manifest import load_manifest, subset_manifest

#: Bump when the generator's output changes for the same parameters (phantom.json records it).
PHANTOM_VERSION = "1.0.0"
PHANTOM_FILE = "phantom.json"
_IN_PROGRESS = ".phantom-in-progress"

# ---------------------------------------------------------------------------------------------------
# Tissues: class index, CT value unenhanced, enhancement in arterial / portal phase, texture SD (HU),
# and an MRI-like value (T1-like: fat bright, bone and air dark, organs reordered; arbitrary units).
# ---------------------------------------------------------------------------------------------------
_TISSUES: dict[str, tuple[float, float, float, float, float]] = {
    #               HU    art    port   tex   MRI
    "air":       (-1000.0, 0.0, 0.0, 0.0, 5.0),
    "fat_sc":    (-105.0, 0.0, 0.0, 8.0, 950.0),
    "fat":       (-92.0, 0.0, 0.0, 10.0, 880.0),
    "muscle":    (52.0, 8.0, 12.0, 6.0, 300.0),
    "cortical":  (850.0, 0.0, 0.0, 90.0, 25.0),
    "marrow":    (230.0, 0.0, 0.0, 40.0, 620.0),
    "disc":      (85.0, 0.0, 0.0, 8.0, 210.0),
    "csf":       (10.0, 0.0, 0.0, 3.0, 110.0),
    "rib":       (400.0, 0.0, 0.0, 70.0, 160.0),
    "lung":      (-850.0, 0.0, 0.0, 45.0, 20.0),
    "heart":     (40.0, 210.0, 120.0, 8.0, 260.0),
    "artery":    (40.0, 260.0, 130.0, 6.0, 60.0),
    "vein":      (40.0, 40.0, 110.0, 6.0, 90.0),
    "liver":     (58.0, 22.0, 50.0, 6.0, 470.0),
    "spleen":    (48.0, 75.0, 65.0, 6.0, 330.0),
    "pancreas":  (42.0, 75.0, 50.0, 8.0, 560.0),
    "k_cortex":  (32.0, 170.0, 130.0, 8.0, 420.0),
    "k_medulla": (32.0, 45.0, 110.0, 8.0, 270.0),
    "k_sinus":   (-60.0, 0.0, 0.0, 12.0, 800.0),
    "gastric":   (40.0, 40.0, 30.0, 8.0, 390.0),
    "fluid":     (15.0, 0.0, 0.0, 5.0, 130.0),
    "gas":       (-950.0, 0.0, 0.0, 30.0, 8.0),
    "bowel":     (30.0, 30.0, 25.0, 12.0, 360.0),
    "bile":      (8.0, 0.0, 0.0, 3.0, 150.0),
    "table":     (150.0, 0.0, 0.0, 10.0, 4.0),
}
_TISSUE_NAMES = tuple(_TISSUES)
T = {name: i for i, name in enumerate(_TISSUE_NAMES)}  # tissue class indices

#: Organ ids of the internal anatomy map (not any dataset's label values).
ORGANS: dict[str, int] = {
    "liver": 1, "spleen": 2, "pancreas": 3, "kidney_right": 4, "kidney_left": 5,
    "stomach": 6, "aorta": 7, "ivc": 8, "gallbladder": 9,
}
#: Tumour ids of the internal tumour map.
TUMOURS: dict[str, int] = {"liver": 1, "pancreas": 2, "kidney": 3}

#: Each dataset's label values from the internal organ / tumour maps (tumour wins over organ).
_LABEL_RULES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    d.name: (d.phantom.organs, d.phantom.tumours) for d in CATALOGUE}
#: Which tumours each dataset's patients carry: (organ, fewest, most per patient).
_TUMOUR_TASKS: dict[str, tuple[tuple[str, int, int], ...]] = {d.name: d.phantom.tumour_counts for d in CATALOGUE}
#: Tumour radius range (mm, real scale; log-uniform, at least two in-plane voxels).
_TUMOUR_RADIUS = {"liver": (3.0, 25.0), "pancreas": (5.0, 18.0), "kidney": (5.0, 25.0)}

#: Per-dataset acquisition, at real scale (mm; in-plane and slice spacing are multiplied by the zooms).
#: axcodes: orientation of the stored array (nibabel codes: the direction each array axis points to).
PROFILES: dict[str, dict[str, Any]] = {d.name: d.phantom.scanner for d in CATALOGUE}

#: MSD dataset.json fields of the three MSD tasks.
_MSD_JSON = {d.name: d.phantom.msd_json for d in CATALOGUE if d.phantom.msd_json}


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


def _waves(rng: np.random.Generator, amplitude: float, count: int = 3) -> list[tuple]:
    """Random smooth surface deformation: sums of sines of the shape's normalised coordinates."""
    out = []
    for _ in range(count):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        out.append((amplitude * rng.uniform(0.5, 1.0), direction, rng.uniform(1.5, 3.0),
                    rng.uniform(0, 2 * math.pi)))
    return out


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
    """Voxels within the interpolated radius of a polyline: (box, mask) or None."""
    reach = float(radii.max()) + 1.0
    box = _box(grid, points.min(0) - reach, points.max(0) + reach)
    if box is None:
        return None
    px, py, pz = _local(grid, box, (0.0, 0.0, 0.0))
    inside = np.zeros(np.broadcast_shapes(px.shape, py.shape, pz.shape), dtype=bool)
    for (a, b), (ra, rb) in zip(zip(points[:-1], points[1:]), zip(radii[:-1], radii[1:])):
        d = b - a
        t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / float(d @ d)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2
        inside |= dist2 < (ra + t * (rb - ra)) ** 2
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


# ---------------------------------------------------------------------------------------------------
# One patient's anatomy (mm, RAS) and its acquisition grid.
# ---------------------------------------------------------------------------------------------------
def _jitter(rng, centre, sd=5.0, limit=10.0):
    return np.asarray(centre, float) + np.clip(rng.normal(0.0, sd, 3), -limit, limit)


def _scaled(rng, axes, overall=0.17, per_axis=0.07):
    return np.asarray(axes, float) * rng.uniform(1 - overall, 1 + overall) * rng.uniform(
        1 - per_axis, 1 + per_axis, 3)


def sample_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """One patient's body and organ parameters (mm, RAS: +x right, +y anterior, +z superior)."""
    zs = rng.uniform(-12.0, 12.0)  # the whole abdomen higher or lower (height, breathing)
    a, b = rng.uniform(130.0, 158.0), rng.uniform(96.0, 118.0)
    body = dict(a=a, b=b, y0=rng.uniform(-5.0, 5.0), fat=rng.uniform(10.0, 32.0),
                fat_ant=rng.uniform(1.0, 1.6), muscle=rng.uniform(8.0, 14.0),
                wave=rng.uniform(0.0, 2 * math.pi))
    yv = -b + rng.uniform(72.0, 84.0)  # centre of the vertebral bodies
    spine = dict(y=yv, period=rng.uniform(32.0, 38.0), phase=rng.uniform(0.0, 40.0),
                 rib_phase=rng.uniform(0.0, 30.0), iliac=-105.0 + zs + rng.uniform(-10, 10))
    liver = dict(c=_jitter(rng, (62.0, 5.0, 55.0 + zs)), axes=_scaled(rng, (95.0, 80.0, 72.0)),
                 rot=_rotation(rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-8, 8)),
                 taper=rng.uniform(0.45, 0.65), waves=_waves(rng, 0.06))
    spleen = dict(c=_jitter(rng, (-85.0, -35.0, 52.0 + zs)), axes=_scaled(rng, (22.0, 55.0, 50.0)),
                  rot=_rotation(rng.uniform(30, 52), rng.uniform(-10, 10), rng.uniform(-10, 10)),
                  waves=_waves(rng, 0.07))
    kidneys = {}
    for side, sign, z0 in (("kidney_right", 1.0, -6.0), ("kidney_left", -1.0, 6.0)):
        kidneys[side] = dict(
            c=_jitter(rng, (sign * 70.0, -40.0, z0 + zs)), axes=_scaled(rng, (25.0, 22.0, 52.0), 0.15),
            rot=_rotation(sign * rng.uniform(20, 40), -sign * rng.uniform(5, 15), rng.uniform(-12, -4)),
            sign=sign, cortex=rng.uniform(5.0, 8.0), waves=_waves(rng, 0.04))
    # pancreas: head (right, near the duodenum) -> neck (anterior to the vessels) -> body -> tail (splenic hilum)
    ctrl = np.array([(32.0, 6.0, 4.0), (6.0, 18.0, 12.0), (-32.0, 8.0, 20.0), (-72.0, -14.0, 28.0)])
    ctrl = ctrl + np.clip(rng.normal(0, 4.0, ctrl.shape), -8, 8) + np.array([0, 0, zs])
    pancreas = dict(ctrl=ctrl, radii=np.array([16.0, 10.0, 11.0, 9.0]) * rng.uniform(0.83, 1.17),
                    lobules=(rng.uniform(0.06, 0.12), rng.uniform(5.0, 9.0), rng.uniform(0, 2 * math.pi)))
    stomach = dict(c=_jitter(rng, (-42.0, 45.0, 62.0 + zs)), axes=_scaled(rng, (40.0, 30.0, 48.0)),
                   rot=_rotation(rng.uniform(-35, -15), rng.uniform(-15, 5), 0), waves=_waves(rng, 0.06),
                   gas=rng.uniform(0.2, 0.6))
    gallbladder = dict(c=_jitter(rng, (45.0, 42.0, 14.0 + zs)), axes=_scaled(rng, (14.0, 14.0, 30.0)),
                       rot=_rotation(0, rng.uniform(-10, 10), rng.uniform(20, 40)), waves=_waves(rng, 0.04))
    vessels = dict(aorta=(-12.0 + rng.uniform(-4, 4), yv + 29.0 + rng.uniform(-3, 3), rng.uniform(10.0, 13.0)),
                   ivc=(24.0 + rng.uniform(-4, 4), yv + 30.0 + rng.uniform(-3, 3), rng.uniform(9.0, 12.0)))
    heart = dict(c=_jitter(rng, (-15.0, 30.0, 0.0)), axes=_scaled(rng, (60.0, 48.0, 52.0), 0.1))
    return dict(zs=zs, body=body, spine=spine, liver=liver, spleen=spleen, kidneys=kidneys,
                pancreas=pancreas, stomach=stomach, gallbladder=gallbladder, vessels=vessels,
                heart=heart, field_seed=int(rng.integers(2**31)))


def _draw(rng: np.random.Generator, spec: tuple) -> float:
    kind, lo, hi = spec
    if kind == "fixed":
        return float(lo)
    if kind == "log":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _target_range(anatomy: dict[str, Any], target: str) -> tuple[float, float]:
    """The z range (mm) a dataset's scans must cover: its organ of interest."""
    if target == "liver":
        c, ax = anatomy["liver"]["c"], anatomy["liver"]["axes"]
        return c[2] - ax[2] - 10, c[2] + ax[2] + 5
    if target == "spleen":
        c, ax = anatomy["spleen"]["c"], anatomy["spleen"]["axes"]
        return c[2] - ax.max() - 10, c[2] + ax.max() + 5
    if target == "pancreas":
        z = anatomy["pancreas"]["ctrl"][:, 2]
        return z.min() - 25, z.max() + 25
    if target == "kidneys":
        ks = anatomy["kidneys"].values()
        return min(k["c"][2] - k["axes"][2] for k in ks) - 8, max(k["c"][2] + k["axes"][2] for k in ks) + 8
    return anatomy["liver"]["c"][2] + anatomy["liver"]["axes"][2] - 230, anatomy["liver"]["c"][2] + 80


def sample_grid(rng: np.random.Generator, dataset: str, anatomy: dict[str, Any],
                inplane_zoom: float, slice_zoom: float) -> Grid:
    """The dataset's scan of this patient: voxel size, field of view and scan range (canonical RAS)."""
    p = PROFILES[dataset]
    s_xy = rng.uniform(*p["inplane"]) * inplane_zoom
    s_z = _draw(rng, p["slices"]) * slice_zoom
    fov = max(rng.uniform(*p["fov"]), 2 * anatomy["body"]["a"] + 20.0)
    n_xy = max(8, int(round(fov / s_xy)))
    lo, hi = _target_range(anatomy, p["target"])
    extent = max(rng.uniform(*p["z_extent"]), hi - lo)
    zc = (lo + hi) / 2 + rng.uniform(-1, 1) * (extent - (hi - lo)) / 2
    n_z = max(4, int(round(extent / s_z)))
    xc, yc = rng.uniform(-15, 15), anatomy["body"]["y0"] + rng.uniform(-10, 25)

    def axis(centre, n, s):
        return (centre + (np.arange(n) - (n - 1) / 2) * s).astype(np.float64)

    return Grid(axis(xc, n_xy, s_xy), axis(yc, n_xy, s_xy), axis(zc, n_z, s_z))


# ---------------------------------------------------------------------------------------------------
# Building a case: tissue classes, organ ids and tumours on the canonical grid.
# ---------------------------------------------------------------------------------------------------
class _Canvas(NamedTuple):
    tissue: np.ndarray  # uint8 tissue class
    organ: np.ndarray  # uint8 organ id (ORGANS)
    tumour: np.ndarray  # uint8 tumour id (TUMOURS)
    free: np.ndarray  # bool: abdominal cavity below the diaphragm not yet taken by a structure
    boxes: dict  # organ id -> index box that holds all its voxels


def _paint(canvas: _Canvas, box, mask, tissue: int | np.ndarray, organ: int = 0, where=None) -> np.ndarray:
    """Paint `mask` (in `box`) where `where` (default: free cavity) allows; returns the painted mask."""
    allowed = canvas.free[box] if where is None else where
    m = mask & allowed
    t = canvas.tissue[box]
    t[m] = tissue if np.isscalar(tissue) else tissue[m]
    if organ:
        canvas.organ[box][m] = organ
        old = canvas.boxes.get(organ, box)
        canvas.boxes[organ] = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(old, box))
    canvas.free[box][m] = False
    return m


def _body(grid: Grid, an: dict[str, Any], canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Table, skin/fat, muscle wall, cavity; returns (body mask, cavity mask)."""
    bd = an["body"]
    x, y, z = grid.x[:, None, None], grid.y[None, :, None], grid.z[None, None, :]
    wob = 1.0 + 0.035 * np.sin(2 * math.pi * z / 260.0 + bd["wave"])
    a, b = bd["a"] * wob, bd["b"] * wob
    yy = y - bd["y0"]
    b_side = np.where(yy < 0, 0.93, 1.0)  # the back flattened by the table

    def ellipse(da, db_ant, db_post):
        db = np.where(yy < 0, db_post, db_ant)
        return (x / (a - da)) ** 2 + (yy / (b * b_side - db)) ** 2 <= 1.0

    body = ellipse(0.0, 0.0, 0.0)
    f, m = bd["fat"], bd["muscle"]
    muscle_out = ellipse(f, f * bd["fat_ant"], 0.8 * f)
    cavity = ellipse(f + m, f * bd["fat_ant"] + m, 0.8 * f + m)
    back = bd["y0"] - bd["b"] * 0.93 * 1.035
    table = (y > back - 22.0) & (y < back - 12.0) & (np.abs(x) < 230.0) & np.ones_like(z, bool)
    canvas.tissue[table] = T["table"]
    canvas.tissue[body] = T["fat_sc"]
    canvas.tissue[muscle_out] = T["muscle"]
    canvas.tissue[cavity] = T["fat"]
    return body, cavity


def _dome(grid: Grid, an: dict[str, Any]) -> np.ndarray:
    """Height (mm) of the diaphragm over each (x, y): two domes, the right one higher."""
    lv = an["liver"]
    top_r = lv["c"][2] + lv["axes"][2] * 0.95 + 6.0
    top_l = top_r - 16.0
    x, y = grid.x[:, None], grid.y[None, :]
    right = top_r - 70.0 * (((x - 55.0) / 95.0) ** 2 + (y / 85.0) ** 2)
    left = top_l - 70.0 * (((x + 60.0) / 95.0) ** 2 + ((y + 5.0) / 85.0) ** 2)
    return np.maximum(right, left)[:, :, None]


def _skeleton(grid: Grid, an: dict[str, Any], canvas: _Canvas, body: np.ndarray):
    """Vertebrae and discs, spinal canal, paraspinal muscles and psoas, ribs, iliac wings."""
    sp, bd = an["spine"], an["body"]
    yv = sp["y"]
    z = grid.z
    vertebra = ((z - sp["phase"]) % sp["period"]) > 8.0  # False in the discs
    box = _box(grid, (-75, yv - 95, z[0]), (75, yv + 25, z[-1]))
    if box is not None:
        dx, dy, _ = _local(grid, box, (0.0, yv, 0.0))
        vb = vertebra[box[2]][None, None, :]
        inb = body[box]
        body_r = (dx / 22.0) ** 2 + (dy / 18.0) ** 2
        canal = (dx / 11.0) ** 2 + ((dy + 28.0) / 9.0) ** 2
        arch = ((dx / 17.0) ** 2 + ((dy + 29.0) / 15.0) ** 2 <= 1.0) & (canal > 1.0) & vb
        spinous = (np.abs(dx) < 4.5) & (dy < -38.0) & (dy > -70.0) & vb
        band = (((grid.z[box[2]] - sp["phase"]) % sp["period"]) > sp["period"] - 14.0)[None, None, :]
        transverse = (np.abs(dx) > 10.0) & (np.abs(dx) < 40.0) & (np.abs(dy + 26.0) < 3.5) & band
        paraspinal = (((np.abs(dx) - 38.0) / 27.0) ** 2 + ((dy + 52.0) / 22.0) ** 2 <= 1.0)
        zz = grid.z[box[2]][None, None, :]
        psoas_r = np.clip(7.0 + (30.0 + an["zs"] - zz) * 0.13, 0.0, 22.0)
        psoas = ((np.abs(dx) - 30.0 - psoas_r * 0.4) ** 2 + (dy - 6.0) ** 2 <= psoas_r**2) & (psoas_r > 3)
        tissue = canvas.tissue[box]
        free = canvas.free[box]
        muscle = (paraspinal | psoas) & inb
        tissue[muscle] = T["muscle"]
        free[muscle] = False
        bone = ((body_r <= 1.0) | arch | spinous | transverse) & inb
        cortical = bone & ~((body_r <= 0.72) & vb)
        tissue[bone] = T["marrow"]
        tissue[cortical] = T["cortical"]
        disc = (body_r <= 1.0) & ~vb & inb
        tissue[disc] = T["disc"]
        csf = (canal <= 1.0) & inb
        tissue[csf] = T["csf"]
        free[bone | disc | csf] = False
    # ribs: arcs in the wall, sloping down anteriorly, lower margin rising towards the front
    x, y = grid.x[:, None], grid.y[None, :] - bd["y0"]
    theta = np.arctan2(y / bd["b"], x / bd["a"])
    ring_out = (x / (bd["a"] - bd["fat"] + 2.0)) ** 2 + (y / (bd["b"] - bd["fat"] * 0.9 + 2.0)) ** 2
    ring_in = (x / (bd["a"] - bd["fat"] - 6.0)) ** 2 + (y / (bd["b"] - bd["fat"] * 0.9 - 6.0)) ** 2
    ring = (ring_out <= 1.0) & (ring_in > 1.0) & (np.abs(theta + math.pi / 2) > 0.45)
    ring &= ~((theta > 0.9) & (theta < math.pi - 0.9))  # no ribs over the anterior midline (linea alba)
    ix, iy = np.nonzero(ring)  # evaluate along the ring's columns only
    th = theta[ix, iy][:, None]
    z_min = an["zs"] + 15.0 + 40.0 * np.maximum(np.sin(th), 0) - 30.0 * np.cos(th) ** 2
    slope = 30.0 * (np.sin(th) + 1.0) / 2.0
    zz = grid.z[None, :]
    ribs = (zz > z_min) & (((zz + slope - sp["rib_phase"]) % 26.0) < 9.0) & body[ix, iy, :]
    r, k = np.nonzero(ribs)
    canvas.tissue[ix[r], iy[r], k] = T["rib"]
    canvas.free[ix[r], iy[r], k] = False
    # iliac wings below the iliac crest
    for sign in (1.0, -1.0):
        centre = (sign * 82.0, yv - 10.0, sp["iliac"] - 90.0)
        blob = _blob(grid, centre, (13.0, 55.0, 90.0), _rotation(sign * 35.0), exponent=4)
        if blob is None:
            continue
        bx, mask, rho = blob
        m = mask & body[bx]
        tissue = canvas.tissue[bx]
        tissue[m] = T["cortical"]
        tissue[m & (rho < 0.6)] = T["marrow"]
        canvas.free[bx][m] = False


def _vessels(grid: Grid, an: dict[str, Any], canvas: _Canvas, body: np.ndarray):
    """Aorta (all levels, bifurcating at the iliac crest) and IVC (up to the right atrium)."""
    z = grid.z
    sp = an["spine"]
    ivc_top = an["liver"]["c"][2] + an["liver"]["axes"][2]  # joins the right atrium
    for name, tissue, top in (("aorta", T["artery"], z[-1] + 1), ("ivc", T["vein"], ivc_top)):
        x0, y0, r = an["vessels"][name]
        bottom = sp["iliac"] + 10.0
        box = _box(grid, (x0 - r - 40, y0 - r - 10, max(bottom - 40, z[0])), (x0 + r + 40, y0 + r + 10, top))
        if box is None:
            continue
        dx, dy, dz = _local(grid, box, (x0, y0, bottom))
        inside = (dx**2 + dy**2 <= r * r) & (dz >= 0)
        split = np.clip(-dz, 0, None) * 0.5  # the iliac branches below the crest
        branches = (((np.abs(dx + x0) - 6.0 - split) ** 2 + dy**2) <= (0.7 * r) ** 2) & (dz < 0)
        allowed = (canvas.free[box] | (canvas.tissue[box] == T["fat"])) & body[box]
        allowed &= ~np.isin(canvas.tissue[box], (T["cortical"], T["marrow"], T["rib"], T["disc"]))
        _paint(canvas, box, inside | branches, tissue, ORGANS[name], where=allowed)


def _kidney(grid: Grid, k: dict[str, Any], canvas: _Canvas, organ_id: int, masses: Sequence[tuple] = ()):
    """A bean-shaped kidney: cortex, medulla, sinus fat at the hilum; `masses` (direction, radius)
    enlarge the parenchyma around a tumour so that it stays inside the kidney."""
    for direction, radius in masses:
        centre = np.asarray(k["c"]) + k["rot"] @ (np.asarray(direction) * k["axes"] * 0.5)
        ball = _blob(grid, centre, (radius + 4.0,) * 3)
        if ball is not None:
            _paint(canvas, ball[0], ball[1], T["k_cortex"], organ_id)
    blob = _blob(grid, k["c"], k["axes"], k["rot"], waves=k["waves"])
    if blob is None:
        return
    box, mask, rho = blob
    # bean: the hilum notch on the medial side, the sinus (fat) inside behind it
    medial = -k["sign"]
    hil = np.asarray(k["c"]) + k["rot"] @ np.array([medial * k["axes"][0] * 1.05, 0.25 * k["axes"][1], 0.0])
    dx, dy, dz = _local(grid, box, hil)
    notch = (dx**2 + dy**2) / (0.42 * k["axes"][0]) ** 2 + dz**2 / (0.35 * k["axes"][2]) ** 2 <= 1.0
    sc = np.asarray(k["c"]) + k["rot"] @ np.array([medial * k["axes"][0] * 0.45, 0.1 * k["axes"][1], 0.0])
    dx, dy, dz = _local(grid, box, sc)
    sinus = (dx**2 + dy**2) / (0.4 * k["axes"][0]) ** 2 + dz**2 / (0.45 * k["axes"][2]) ** 2 <= 1.0
    kidney = mask & ~notch
    cortex_rho = 1.0 - k["cortex"] / float(np.mean(k["axes"][:2]))
    tissue = np.full(kidney.shape, T["k_medulla"], np.uint8)
    tissue[rho >= cortex_rho] = T["k_cortex"]
    tissue[sinus] = T["k_sinus"]
    _paint(canvas, box, kidney, tissue, organ_id)


def _pancreas(grid: Grid, p: dict[str, Any], canvas: _Canvas, masses: Sequence[tuple[float, float]] = ()):
    """The pancreas as a lobulated tube; `masses` (position 0..1 head to tail, radius mm) widen the
    gland around a tumour (mass effect), so that the tumour stays inside it."""
    t = np.linspace(0, 1, len(p["ctrl"]))
    spline = CubicSpline(t, p["ctrl"], axis=0)
    ts = np.linspace(0, 1, 41)
    radii = np.interp(ts, t, p["radii"])
    amp, freq, phase = p["lobules"]
    radii = radii * (1 + amp * np.sin(2 * math.pi * freq * ts + phase))
    for where, radius in masses:
        bulge = (radius + 4.0) * np.exp(-0.5 * ((ts - where) / 0.06) ** 2)
        radii = np.maximum(radii, bulge)
    tube = _tube(grid, spline(ts), radii)
    if tube is not None:
        _paint(canvas, tube[0], tube[1], T["pancreas"], ORGANS["pancreas"])


def _stomach(grid: Grid, s: dict[str, Any], canvas: _Canvas):
    blob = _blob(grid, s["c"], s["axes"], s["rot"], waves=s["waves"])
    if blob is None:
        return
    box, mask, rho = blob
    wall = 1.0 - 4.5 / float(np.min(s["axes"]))
    tissue = np.full(mask.shape, T["fluid"], np.uint8)
    _, dy, _ = _local(grid, box, s["c"])
    tissue[np.broadcast_to(dy > s["axes"][1] * (1 - 2 * s["gas"]) * 0.8, mask.shape)] = T["gas"]
    tissue[rho >= wall] = T["gastric"]
    _paint(canvas, box, mask, tissue, ORGANS["stomach"])


def _chest(grid: Grid, an: dict[str, Any], canvas: _Canvas, cavity: np.ndarray, dome: np.ndarray):
    """Heart and lungs above the diaphragm (the cavity there is not `free`)."""
    zz = grid.z[None, None, :]
    chest = cavity & (zz >= dome) & (canvas.tissue == T["fat"]) & (canvas.organ == 0)
    if not chest.any():
        return
    h = an["heart"]
    centre = (h["c"][0], h["c"][1], float(dome.max()) + h["axes"][2] * 0.55)
    blob = _blob(grid, centre, h["axes"], _rotation(-30.0, 0.0, 15.0))
    if blob is not None:
        box, mask, _ = blob
        m = mask & chest[box]
        canvas.tissue[box][m] = T["heart"]
        chest[box][m] = False
    x, y = grid.x[:, None, None], grid.y[None, :, None]
    mediastinum = (np.abs(x + 5.0) < 22.0) & (y > an["spine"]["y"] - 12.0)
    canvas.tissue[chest & ~mediastinum] = T["lung"]


def _bowel(grid: Grid, an: dict[str, Any], canvas: _Canvas, field_rng: np.random.Generator):
    """Bowel loops with gas in the free cavity, denser low in the abdomen, in front of the spine."""
    loops = _smooth_field(field_rng, grid, 11.0)
    zz, yy = grid.z[None, None, :], grid.y[None, :, None]
    top = an["liver"]["c"][2] - 10.0
    threshold = 0.1 + np.clip((zz - (top - 90.0)) / 90.0, 0.0, 1.0) * 1.6
    where = canvas.free & (yy > an["spine"]["y"] - 5.0)
    bowel = where & (loops > threshold)
    canvas.tissue[bowel] = T["bowel"]
    canvas.tissue[bowel & (loops > threshold + 1.0)] = T["gas"]
    canvas.free[bowel] = False


def _place_tumours(rng: np.random.Generator, grid: Grid, canvas: _Canvas, plan: list[dict]) -> list[dict]:
    """The planned tumours, each strictly inside its organ (never touching the organ's surface)."""
    placed, cache = [], {}
    for tumour in plan:
        organ, radius = tumour["organ"], tumour["radius"]
        oid = tumour["oid"] if "oid" in tumour else ORGANS[organ]
        if oid not in canvas.boxes:
            continue
        if oid not in cache:
            box = canvas.boxes[oid]
            inside = canvas.organ[box] == oid
            interior = ndimage.binary_erosion(inside, border_value=0)
            depth = ndimage.distance_transform_edt(np.pad(inside, 1), sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
            cache[oid] = box, interior, depth
        box, interior, depth = cache[oid]
        if not interior.any():
            continue
        margin = max(grid.spacing)
        room = depth >= radius + margin
        if not room.any():  # smaller organ than tumour: the biggest one that fits
            radius = max(float(depth.max()) - margin, min(grid.spacing))
            room = depth >= depth.max() - 1e-6
        cand = np.flatnonzero(room & interior)
        if len(cand) == 0:
            continue
        i, j, k = np.unravel_index(cand[int(rng.integers(len(cand)))], room.shape)
        sub = Grid(grid.x[box[0]], grid.y[box[1]], grid.z[box[2]])
        centre = (sub.x[i], sub.y[j], sub.z[k])
        axes = radius * rng.uniform(0.8, 1.2, 3)
        blob = _blob(sub, centre, axes, _rotation(*rng.uniform(-90, 90, 3)), waves=_waves(rng, 0.08))
        delta = rng.uniform(-55.0, -15.0) if rng.random() < 0.7 else rng.uniform(15.0, 35.0)
        necrosis = rng.uniform(-25.0, -10.0) if radius > 12.0 else 0.0
        if blob is None:
            continue
        tbox, tmask, rho = blob
        tmask = tmask & interior[tbox]
        tmask[i - tbox[0].start, j - tbox[1].start, k - tbox[2].start] |= True  # at least its centre
        full = tuple(slice(b.start + t.start, b.start + t.stop) for b, t in zip(box, tbox))
        canvas.tumour[full][tmask] = TUMOURS[organ]
        placed.append(dict(box=full, mask=tmask, core=tmask & (rho < 0.5), delta=delta, necrosis=necrosis,
                           organ=organ, radius_mm=round(float(radius), 2)))
    return placed


def build_anatomy(anatomy: dict[str, Any], grid: Grid, tumour_rng: np.random.Generator | None,
                  tumour_tasks: Sequence[tuple[str, int, int]] = ()) -> tuple[_Canvas, list[dict[str, Any]]]:
    """Tissue classes, organ ids and tumours of one patient on one grid (painting order = priority)."""
    shape = grid.shape
    canvas = _Canvas(np.full(shape, T["air"], np.uint8), np.zeros(shape, np.uint8),
                     np.zeros(shape, np.uint8), np.zeros(shape, bool), {})
    body, cavity = _body(grid, anatomy, canvas)
    dome = _dome(grid, anatomy)
    canvas.free[...] = cavity & (grid.z[None, None, :] < dome)
    _skeleton(grid, anatomy, canvas, body)
    _vessels(grid, anatomy, canvas, body)
    plan = _plan_tumours(tumour_rng, tumour_tasks, grid) if tumour_rng is not None else []
    for side, k in anatomy["kidneys"].items():
        masses = [(t["direction"], t["radius"]) for t in plan if t.get("oid") == ORGANS[side]]
        _kidney(grid, k, canvas, ORGANS[side], masses)
    gb = anatomy["gallbladder"]
    blob = _blob(grid, gb["c"], gb["axes"], gb["rot"], waves=gb["waves"])
    if blob is not None:
        _paint(canvas, blob[0], blob[1], T["bile"], ORGANS["gallbladder"])
    for name in ("liver", "spleen"):
        o = anatomy[name]
        blob = _blob(grid, o["c"], o["axes"], o["rot"], exponent=2,
                     waves=o["waves"], taper=o.get("taper", 0.0))
        if blob is not None:
            _paint(canvas, blob[0], blob[1], T[name], ORGANS[name])
    _pancreas(grid, anatomy["pancreas"], canvas, [(t["where"], t["radius"]) for t in plan if t["organ"] == "pancreas"])
    _stomach(grid, anatomy["stomach"], canvas)
    _chest(grid, anatomy, canvas, cavity, dome)
    _bowel(grid, anatomy, canvas, np.random.default_rng(anatomy["field_seed"]))
    tumours = _place_tumours(tumour_rng, grid, canvas, plan) if plan else []
    return canvas, tumours


def _plan_tumours(rng: np.random.Generator, tasks: Sequence[tuple[str, int, int]], grid: Grid) -> list[dict]:
    """Organ, radius (log-uniform, at least ~2 in-plane voxels) and, in the pancreas, position of each tumour."""
    plan = []
    for organ, low, high in tasks:
        r_min = max(_TUMOUR_RADIUS[organ][0], 2.0 * min(grid.spacing[:2]))
        r_max = max(_TUMOUR_RADIUS[organ][1], r_min * 1.01)
        for _ in range(int(rng.integers(low, high + 1))):
            tumour = dict(organ=organ, radius=math.exp(rng.uniform(math.log(r_min), math.log(r_max))),
                          where=rng.uniform(0.05, 0.75))
            if organ == "kidney":
                direction = rng.standard_normal(3)
                tumour.update(oid=ORGANS[("kidney_right", "kidney_left")[int(rng.integers(2))]],
                              direction=direction / np.linalg.norm(direction))
            plan.append(tumour)
    return plan


# ---------------------------------------------------------------------------------------------------
# Intensities: CT (HU) or MRI-like.
# ---------------------------------------------------------------------------------------------------
def _intensities(rng: np.random.Generator, grid: Grid, canvas: _Canvas, tumours: list[dict[str, Any]],
                 dataset: str, mri: bool, field_rng: np.random.Generator) -> np.ndarray:
    p = PROFILES[dataset]
    table = np.array([_TISSUES[n] for n in _TISSUE_NAMES], dtype=np.float32)
    texture = _smooth_field(field_rng, grid, 7.0)
    if mri:
        values = table[:, 4] * rng.uniform(0.9, 1.1)
        tex_sd = table[:, 3] * 2.0
    else:
        timing = rng.uniform(0.85, 1.15)  # contrast bolus timing of this scan
        values = table[:, 0] + table[:, 1 if p["phase"] == "arterial" else 2] * timing
        tex_sd = table[:, 3]
    image = values[canvas.tissue]
    image += texture * tex_sd[canvas.tissue]
    organ_value = {"liver": T["liver"], "pancreas": T["pancreas"], "kidney": T["k_medulla"]}
    for t in tumours:
        delta = t["delta"] * (-4.0 if mri else 1.0)  # tumours bright on the MRI-like contrast
        view = image[t["box"]]
        base = values[organ_value[t["organ"]]] if t["organ"] != "kidney" else view[t["mask"]].mean()
        view[t["mask"]] = base + delta + texture[t["box"]][t["mask"]] * 6.0
        view[t["core"]] += t["necrosis"] * (-4.0 if mri else 1.0)
    sigma_in, sigma_z = rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8)  # partial volume (voxels)
    image = ndimage.gaussian_filter(image, (sigma_in, sigma_in, sigma_z), truncate=3.0)
    noise_sd = rng.uniform(*p["noise"])
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    if mri:
        bias = np.exp(0.15 * _smooth_field(field_rng, grid, 120.0))
        noise2 = rng.standard_normal(image.shape, dtype=np.float32)
        image = np.sqrt((image * bias + noise * noise_sd) ** 2 + (noise2 * noise_sd) ** 2)  # Rician
        return np.clip(np.rint(image), 0, 32767).astype(np.int16)
    image = image * p["gain"] + p["offset"] + noise * noise_sd
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def dataset_label(dataset: str, canvas: _Canvas) -> np.ndarray:
    """The dataset's own label map: only its organs, with its own values (the rest stays 0)."""
    organ_values, tumour_values = _LABEL_RULES[dataset]
    lut = np.zeros(256, np.uint8)
    for name, value in organ_values.items():
        lut[ORGANS[name]] = value
    label = lut[canvas.organ]
    for name, value in tumour_values.items():
        label[canvas.tumour == TUMOURS[name]] = value
    return label


def case_number(case_id: str) -> int:
    """The number in a case id (liver_13 -> 13, case_00042 -> 42, img0021 -> 21): the case's RNG key."""
    digits = re.findall(r"\d+", case_id)
    if not digits:
        raise ValueError(f"Case id {case_id!r} has no number; the phantom keys each case's RNG on it.")
    return int(digits[-1])


def simulate_case(dataset: str, case_id: str, *, seed: int = 0, inplane_zoom: float = 4.0,
                  slice_zoom: float = 1.5, mri_like: bool = False) -> dict[str, Any]:
    """One synthetic case on its canonical RAS grid (before the dataset's storage orientation).

    Returns image (int16), label (uint8, the dataset's own values), organs, tumour_map and tissue
    (the full anatomy: internal ids `ORGANS`, `TUMOURS`, tissue classes `T`), affine (RAS), tumours
    (organ and radius of each), grid.
    """
    if dataset not in PROFILES:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(PROFILES)}.")
    rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id)])
    anatomy = sample_anatomy(rng)
    grid = sample_grid(rng, dataset, anatomy, inplane_zoom, slice_zoom)
    canvas, tumours = build_anatomy(anatomy, grid, rng, _TUMOUR_TASKS[dataset])
    field_rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id), 1])
    image = _intensities(rng, grid, canvas, tumours, dataset, mri_like, field_rng)
    return dict(image=image, label=dataset_label(dataset, canvas), organs=canvas.organ,
                tumour_map=canvas.tumour, tissue=canvas.tissue, affine=grid.affine(), grid=grid,
                tumours=[{k: t[k] for k in ("organ", "radius_mm")} for t in tumours])


def to_storage(array: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a canonical RAS array to the dataset's storage axis codes; the affine follows."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


# ---------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    """A .nii.gz as bytes, reproducibly: gzip with mtime 0 and no file name in its header."""
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_case(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: simulate one case and write its image and label (each atomically)."""
    start = time.perf_counter()
    case = simulate_case(job["dataset"], job["case_id"], seed=job["seed"], inplane_zoom=job["inplane_zoom"],
                         slice_zoom=job["slice_zoom"], mri_like=job["mri"])
    axcodes = PROFILES[job["dataset"]]["axcodes"]
    image, affine = to_storage(case["image"], case["affine"], axcodes)
    label, _ = to_storage(case["label"], case["affine"], axcodes)
    tag = f"fedseg phantom {PHANTOM_VERSION} {job['dataset']}"
    root = Path(job["root"])
    _atomic_write(root / job["image"], nifti_bytes(image, affine, tag + (" MRI-like" if job["mri"] else " CT")))
    _atomic_write(root / job["label"], nifti_bytes(label, affine, tag + " label"))
    return dict(dataset=job["dataset"], case_id=job["case_id"], shape=list(image.shape),
                spacing=[round(float(s), 3) for s in voxel_sizes(affine)],
                axcodes="".join(axcodes), labels=np.flatnonzero(np.bincount(label.ravel(), minlength=1)).tolist(),
                tumours=case["tumours"], seconds=time.perf_counter() - start)


def _msd_json(dataset: str, rows: pd.DataFrame, mri: bool) -> bytes:
    name, labels = _MSD_JSON[dataset]
    doc = {
        "name": name,
        "description": f"fedseg synthetic {name} (phantom {PHANTOM_VERSION}), in the layout of MSD "
                       f"{DATASET_DIRS[dataset]}",
        "reference": "fedseg.data.phantom (synthetic; not the Medical Segmentation Decathlon data)",
        "licence": "CC-BY-SA 4.0",
        "release": PHANTOM_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI-like (synthetic)" if mri else "CT"},
        "labels": labels,
        "numTraining": int(len(rows)),
        "numTest": 0,
        "training": [{"image": f"./{r.image}", "label": f"./{r.label}"} for r in rows.itertuples()],
        "test": [],
    }
    return (json.dumps(doc, indent=4) + "\n").encode()


def _parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets) -> dict[str, Any]:
    return dict(seed=int(seed), case_scale=float(case_scale), min_cases=[int(m) for m in min_cases],
                inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom),
                mri_like=sorted(mri_like), datasets=None if datasets is None else sorted(datasets))


def _is_current(root: Path, record: dict[str, Any]) -> bool:
    """True when `root` holds a finished generation with the same version and parameters."""
    marker, manifest = root / PHANTOM_FILE, root / LOCAL_MANIFEST
    if not (marker.is_file() and manifest.is_file()) or (root / _IN_PROGRESS).exists():
        return False
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if old.get("version") != record["version"] or old.get("parameters") != record["parameters"]:
        return False
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return all((root / DATASET_DIRS[r.dataset] / p).is_file() for r in rows.itertuples() for p in (r.image, r.label))


def _refuse_real_data(root: Path) -> None:
    """Never write the phantom over a folder that holds data it did not write."""
    if (root / PHANTOM_FILE).exists() or (root / _IN_PROGRESS).exists():
        return
    for folder in DATASET_DIRS.values():
        if (root / folder).is_dir() and any((root / folder).rglob("*.nii*")):
            raise FileExistsError(f"{root / folder} holds NIfTI files the phantom did not write (real data?); "
                                  f"choose another data_root for the synthetic data.")


def generate(data_root: str | Path, *, seed: int = 0, case_scale: float = 0.1,
             min_cases: Sequence[int] = (2, 1, 1), inplane_zoom: float = 4.0, slice_zoom: float = 1.5,
             mri_like: Sequence[str] = (), datasets: Sequence[str] | None = None, workers: int | None = None,
             progress: bool = True) -> Path:
    """Write the synthetic datasets under `data_root` in the real layouts; returns `data_root`.

    Cases are `subset_manifest(load_manifest(), case_scale, min_cases)` (optionally only `datasets`);
    voxel sizes are the real ones times `inplane_zoom` / `slice_zoom`; `mri_like` datasets get an
    MRI-like contrast. Files: each case's image (int16) and label (uint8) .nii.gz, an MSD
    `dataset.json` per MSD task, `manifest.csv` (the subset, written last) and `phantom.json` (the
    parameters, written at the very end). A finished generation with the same parameters is reused as
    it is; the same parameters always give the same bytes.
    """
    root = Path(data_root)
    unknown = sorted(set(mri_like).union(datasets or ()) - set(PROFILES))
    if unknown:
        raise ValueError(f"Unknown dataset(s) {unknown} in mri_like/datasets: use names from {list(PROFILES)}.")
    if min(inplane_zoom, slice_zoom) <= 0:
        raise ValueError(f"inplane_zoom and slice_zoom must be positive, got {inplane_zoom}, {slice_zoom}.")
    record = dict(generator="fedseg.data.phantom", version=PHANTOM_VERSION,
                  parameters=_parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets))
    if _is_current(root, record):
        if progress:
            print(f"phantom: {root} already holds this generation (same parameters, version "
                  f"{PHANTOM_VERSION}); reusing it.")
        return root
    _refuse_real_data(root)
    manifest = subset_manifest(load_manifest(), case_scale, tuple(min_cases))
    if datasets is not None:
        manifest = manifest[manifest["dataset"].isin(list(datasets))].reset_index(drop=True)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / _IN_PROGRESS, json.dumps(record).encode())
    for stale in (PHANTOM_FILE, LOCAL_MANIFEST):  # an interrupted run must never look finished
        (root / stale).unlink(missing_ok=True)
    jobs = [dict(dataset=r.dataset, case_id=r.case_id, image=f"{DATASET_DIRS[r.dataset]}/{r.image}",
                 label=f"{DATASET_DIRS[r.dataset]}/{r.label}", root=str(root), seed=int(seed),
                 inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom), mri=r.dataset in set(mri_like))
            for r in manifest.itertuples()]
    start = time.perf_counter()
    results = _run_jobs(jobs, workers, progress)
    for dataset in _MSD_JSON:
        rows = manifest[manifest["dataset"] == dataset]
        if len(rows):
            _atomic_write(root / DATASET_DIRS[dataset] / "dataset.json", _msd_json(dataset, rows, dataset in mri_like))
    _atomic_write(root / LOCAL_MANIFEST, manifest.to_csv(index=False).encode())
    order = {(j["dataset"], j["case_id"]): i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["dataset"], r["case_id"])])
    record["cases"] = [{k: v for k, v in r.items() if k != "seconds"} for r in results]
    _atomic_write(root / PHANTOM_FILE, (json.dumps(record, indent=1) + "\n").encode())
    (root / _IN_PROGRESS).unlink(missing_ok=True)
    if progress:
        print(f"phantom: wrote {len(jobs)} cases to {root} in {time.perf_counter() - start:.1f} s")
    return root


def _run_jobs(jobs: list[dict[str, Any]], workers: int | None, progress: bool) -> list[dict[str, Any]]:

    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    bar = tqdm(total=len(jobs), desc="phantom", unit="case", disable=not progress)
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_write_case(job))
                bar.update()
        else:
            # fork on Linux (fast, and scripts need no __main__ guard), spawn elsewhere; the cases do
            # not depend on the scheduling
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                for result in pool.map(_write_case, jobs, chunksize=1):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


def clear(data_root: str | Path) -> None:
    """Delete a synthetic data root the phantom wrote (refuses folders without its phantom.json)."""
    root = Path(data_root)
    if not ((root / PHANTOM_FILE).exists() or (root / _IN_PROGRESS).exists()):
        raise FileNotFoundError(f"{root} has no {PHANTOM_FILE}: not a phantom data root, not deleting it.")
    shutil.rmtree(root)
