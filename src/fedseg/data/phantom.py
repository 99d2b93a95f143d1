"""The synthetic abdominal-CT generator: the study's embedded default data (docs/study.md, "Data").

`generate` writes the five datasets in their real layouts (MSD `imagesTr/`+`labelsTr/`, KiTS19
`case_XXXXX/`, BTCV `img/`+`label/`) for a subset of the real manifest's cases, so every reader and
notebook runs unchanged on it. Each case is one synthetic patient, built in millimetres in the patient's
RAS frame (+x patient right, +y anterior, +z superior) and sampled onto its dataset's voxel grid:

* anatomy (docs/phantom.md): body from thin to obese with subcutaneous fat and muscle wall, spine with
  vertebral levels, ribs, pelvis, lungs and heart above the diaphragm, aorta, IVC, liver, spleen, pancreas,
  kidneys, stomach, gallbladder, colon and small bowel. Organ volumes and vertebral levels are drawn from
  published adult statistics (`ORGAN_VOLUMES_ML`, `ORGAN_LEVELS`), positions spread by centimetres, each
  organ's shape bent by smooth random waves and fitted to the room the body cavity leaves it, and the
  whole body finally bent by a smooth random deformation; organs touch where they do in real abdomens
  (liver and right kidney, spleen and left kidney, spleen and stomach), overlaps resolved by painting order;
* structure inside and between organs: portal and hepatic veins in the liver, the splenic and portal vein
  behind the pancreas, renal vessels and pelvis at the hila, colon with faeces-like contents and gas,
  small-bowel loops with gas, fluid or oral contrast, stomach contents, strands in the fat;
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
  int16 HU; `mri_like` datasets get an MRI-like non-monotonic contrast instead (FedGIN); `domain`
  "randomised" gives the training datasets SynthSeg-style random tissue intensities, bias, blur and
  noise, "other_scanner" another CT scanner and protocol (`DOMAINS`).

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

from fedseg.data.catalogue import BY_NAME, CATALOGUE
from fedseg.data.labels import DATASETS
from fedseg.data.layouts import DATASET_DIRS, LOCAL_MANIFEST
from fedseg.data.manifest import load_manifest, subset_manifest

#: Bump when the generator's output changes for the same parameters (phantom.json records it).
PHANTOM_VERSION = "3.0.0"
PHANTOM_FILE = "phantom.json"
_IN_PROGRESS = ".phantom-in-progress"

# ---------------------------------------------------------------------------------------------------
# Tissues: class index, CT value unenhanced (HU), enhancement over it at the reference time of the late arterial,
# portal venous and delayed phase (`PHASE_KNOTS_S`), texture SD (HU), and an MRI-like value (T1-like: fat bright,
# bone and air dark, organs reordered; arbitrary units). Organ and vessel values after the published multiphase
# measurements docs/phantom.md cites (aorta, portal vein, liver: Bae 2010, Herts et al. 1995; pancreas: Lu et al.
# 1996; kidney: Yuh & Cohan 1999; excretion: van der Molen et al. 2008); the rest are the generator's choices.
# ---------------------------------------------------------------------------------------------------
_TISSUES: dict[str, tuple[float, float, float, float, float, float]] = {
    #               HU    art    port   del    tex   MRI
    "air":       (-1000.0, 0.0, 0.0, 0.0, 0.0, 5.0),
    "fat_sc":    (-105.0, 0.0, 0.0, 0.0, 8.0, 950.0),
    "fat":       (-92.0, 0.0, 0.0, 0.0, 10.0, 880.0),
    "muscle":    (52.0, 8.0, 12.0, 10.0, 6.0, 300.0),
    "cortical":  (850.0, 0.0, 0.0, 0.0, 90.0, 25.0),
    "marrow":    (230.0, 0.0, 0.0, 0.0, 40.0, 620.0),
    "disc":      (85.0, 0.0, 0.0, 0.0, 8.0, 210.0),
    "csf":       (10.0, 0.0, 0.0, 0.0, 3.0, 110.0),
    "rib":       (400.0, 0.0, 0.0, 0.0, 70.0, 160.0),
    "lung":      (-850.0, 0.0, 0.0, 0.0, 45.0, 20.0),
    "heart":     (40.0, 210.0, 120.0, 75.0, 8.0, 260.0),
    "artery":    (40.0, 260.0, 130.0, 80.0, 6.0, 60.0),
    "vein":      (40.0, 40.0, 110.0, 75.0, 6.0, 90.0),
    "liver":     (58.0, 22.0, 50.0, 35.0, 6.0, 470.0),
    "spleen":    (48.0, 75.0, 65.0, 45.0, 6.0, 330.0),
    "pancreas":  (42.0, 75.0, 50.0, 30.0, 8.0, 560.0),
    "k_cortex":  (32.0, 170.0, 130.0, 100.0, 8.0, 420.0),
    "k_medulla": (32.0, 45.0, 110.0, 105.0, 8.0, 270.0),
    "k_sinus":   (-60.0, 0.0, 0.0, 0.0, 12.0, 800.0),
    "gastric":   (40.0, 40.0, 30.0, 20.0, 8.0, 390.0),
    "fluid":     (15.0, 0.0, 0.0, 0.0, 5.0, 130.0),
    "gas":       (-950.0, 0.0, 0.0, 0.0, 30.0, 8.0),
    "bowel":     (30.0, 30.0, 25.0, 15.0, 12.0, 360.0),
    "bile":      (8.0, 0.0, 0.0, 0.0, 3.0, 150.0),
    "table":     (150.0, 0.0, 0.0, 0.0, 10.0, 4.0),
    "oral":      (260.0, 0.0, 0.0, 0.0, 25.0, 60.0),     # positive oral contrast in stomach and bowel
    "mottled":   (15.0, 0.0, 0.0, 0.0, 45.0, 420.0),     # faeces, food: soft tissue with fine gas
    "strand":    (25.0, 15.0, 35.0, 25.0, 8.0, 420.0),   # fat septa and small vessels
    "urine":     (15.0, 0.0, 0.0, 350.0, 5.0, 130.0),    # renal pelvis: contrast excreted from ~3 min on
}
_TISSUE_NAMES = tuple(_TISSUES)
T = {name: i for i, name in enumerate(_TISSUE_NAMES)}  # tissue class indices

#: Organ ids of the internal anatomy map (not any dataset's label values).
ORGANS: dict[str, int] = {
    "liver": 1, "spleen": 2, "pancreas": 3, "kidney_right": 4, "kidney_left": 5,
    "stomach": 6, "aorta": 7, "ivc": 8, "gallbladder": 9, "portal_vein": 10,
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


# ---------------------------------------------------------------------------------------------------
# One patient's anatomy (mm, RAS) and its acquisition grid.
# ---------------------------------------------------------------------------------------------------
def _scaled(rng, axes, overall=0.17, per_axis=0.07):
    return np.asarray(axes, float) * rng.uniform(1 - overall, 1 + overall) * rng.uniform(
        1 - per_axis, 1 + per_axis, 3)


#: Published adult organ volumes (mL) as (5th, 95th) percentiles of a log-normal (docs/phantom.md cites them).
ORGAN_VOLUMES_ML: dict[str, tuple[float, float]] = {
    "liver": (1200.0, 1900.0), "spleen": (100.0, 350.0), "kidney": (100.0, 200.0), "pancreas": (50.0, 100.0)}
#: Published vertebral levels (vertebrae above the centre of L1; T12 = 1, L2 = -1): mean and SD between people.
ORGAN_LEVELS: dict[str, tuple[float, float]] = {
    "liver_dome": (3.5, 0.6),        # T9-T10
    "kidney_right": (-0.7, 0.6),     # hilum near L1-L2, the right kidney lower
    "spleen": (1.8, 0.6),            # T10-T12, posterior left
    "pancreas": (-0.3, 0.5),         # across the midline near L1-L2
}
#: The left kidney lies higher than the right by this much (mm, uniform).
LEFT_KIDNEY_HIGHER_MM = (5.0, 25.0)
_Z90 = 1.6448536269514722  # the standard normal's 95th percentile
#: Drawn / painted volume: the liver and spleen lose part of their drawn shape to the structures painted
#: before them (kidneys, pancreas, vessels, gallbladder, spine) and to the diaphragm, so each is drawn this
#: much larger; chosen so that the median painted volume over `anatomy_table(seed=0, patients=30)` is the
#: published median (a calibration of the generator, not of any result).
_PAINT_LOSS = {"liver": 1.3, "spleen": 1.15}


def _log_normal(rng: np.random.Generator, low: float, high: float) -> float:
    """A draw whose 5th and 95th percentiles are `low` and `high`."""
    mu, sd = (math.log(low) + math.log(high)) / 2, (math.log(high) - math.log(low)) / (2 * _Z90)
    return float(math.exp(rng.normal(mu, sd)))


def _coarse_grid(centre: Sequence[float], reach: float, step: float = 4.0) -> Grid:
    axes = [np.arange(c - reach, c + reach + step, step) for c in centre]
    return Grid(*axes)


def _cavity(body: dict[str, Any]) -> tuple[float, float, float]:
    """The abdominal cavity's half-width and its anterior and posterior half-depths (mm, at mid-height)."""
    f, m = body["fat"], body["muscle"]
    return body["a"] - f - m, body["b"] - f * body["fat_ant"] - m, body["b"] * 0.93 - 0.8 * f - m


def _in_cavity(body: dict[str, Any], x, y, limit: float = 1.0):
    a, b_ant, b_post = _cavity(body)
    yy = y - body["y0"]
    return (x / a) ** 2 + (yy / np.where(yy < 0, b_post, b_ant)) ** 2 <= limit**2


def _into_cavity(body: dict[str, Any], centre: np.ndarray, limit: float) -> np.ndarray:
    """Move an organ's centre towards the body axis until it lies within `limit` of the cavity's radius."""
    a, b_ant, b_post = _cavity(body)
    x, yy = centre[0], centre[1] - body["y0"]
    r = math.hypot(x / a, yy / (b_post if yy < 0 else b_ant))
    if r > limit:
        centre = np.array([x * limit / r, body["y0"] + yy * limit / r, centre[2]])
    return centre


def _fit_blob(organ: dict[str, Any], volume_ml: float, body: dict[str, Any], exponent: int = 2) -> dict[str, Any]:
    """Scale a blob's axes so that its part inside the body cavity holds `volume_ml` (measured on a 4 mm
    grid: waves, taper and the cavity's wall make a closed form inexact), as organs fill the room they have."""
    step = 4.0
    for _ in range(3):
        reach = float(np.max(organ["axes"])) * (1.0 + sum(w[0] for w in organ["waves"])) + 4.0
        grid = _coarse_grid(organ["c"], reach, step)
        blob = _blob(grid, organ["c"], organ["axes"], organ["rot"], exponent, organ["waves"],
                     organ.get("taper", 0.0))
        if blob is None:
            break
        box, mask, _ = blob
        inside = mask & _in_cavity(body, grid.x[box[0]][:, None, None], grid.y[box[1]][None, :, None])
        volume = float(inside.sum()) * step**3 / 1000.0
        if mask.any():  # how far its top lies above its centre
            organ["top"] = float(grid.z[box[2]][np.flatnonzero(mask.any((0, 1)))[-1]] - organ["c"][2])
        if volume <= 0 or abs(volume / volume_ml - 1.0) < 0.02:
            break
        organ["axes"] = np.asarray(organ["axes"]) * float(np.clip(volume_ml / volume, 0.5, 2.0)) ** (1.0 / 3.0)
    return organ


def _pancreas_spline(p: dict[str, Any], count: int = 41) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 1, len(p["ctrl"]))
    ts = np.linspace(0, 1, count)
    amp, freq, phase = p["lobules"]
    radii = np.interp(ts, t, p["radii"]) * (1 + amp * np.sin(2 * math.pi * freq * ts + phase))
    return CubicSpline(t, p["ctrl"], axis=0)(ts), radii


def _fit_pancreas(p: dict[str, Any], volume_ml: float) -> dict[str, Any]:
    """Scale the pancreas's radii so that the tube holds `volume_ml` (volume ~ radius^2 at fixed length)."""
    points, radii = _pancreas_spline(p, 121)
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    area = math.pi * ((radii[:-1] + radii[1:]) / 2) ** 2
    volume = float((area * lengths).sum() + 2 / 3 * math.pi * (radii[0] ** 3 + radii[-1] ** 3)) / 1000.0
    p["radii"] = np.asarray(p["radii"]) * math.sqrt(volume_ml / volume)
    return p


def _waves(rng: np.random.Generator, amplitude: float, count: int = 3, freq=(1.5, 3.0)) -> list[tuple]:
    """Random smooth surface deformation: sums of sines of the shape's normalised coordinates."""
    out = []
    for _ in range(count):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        out.append((amplitude * rng.uniform(0.5, 1.0), direction, rng.uniform(*freq),
                    rng.uniform(0, 2 * math.pi)))
    return out


def _shape_waves(rng: np.random.Generator, amplitude: float) -> list[tuple]:
    """An organ's own shape: two broad bends (lobes, flattening) and three finer bumps."""
    return _waves(rng, amplitude, 2, (0.8, 1.6)) + _waves(rng, amplitude * 0.5, 3, (1.6, 3.0))


def _normal(rng: np.random.Generator, sd: float, limit: float, size: int = 3) -> np.ndarray:
    return np.clip(rng.normal(0.0, sd, size), -limit, limit)


def sample_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """One patient's body and organ parameters (mm, RAS: +x right, +y anterior, +z superior).

    Organ volumes and vertebral levels follow published adult statistics (`ORGAN_VOLUMES_ML`,
    `ORGAN_LEVELS`); positions spread by centimetres between people, the body from thin to obese.
    """
    zs = rng.uniform(-15.0, 15.0)  # the whole abdomen higher or lower in the scanner
    habitus = float(rng.beta(2.0, 2.5))  # 0 thin ... 1 obese
    fat = 6.0 + 40.0 * habitus + rng.uniform(-3.0, 3.0)
    a = 138.0 + 45.0 * habitus + rng.normal(0.0, 5.0)
    b = 96.0 + 40.0 * habitus + rng.normal(0.0, 5.0)
    muscle = rng.uniform(8.0, 14.0)
    body = dict(a=a, b=b, y0=rng.uniform(-5.0, 5.0), fat=fat, fat_ant=rng.uniform(1.0, 1.6), muscle=muscle,
                wave=rng.uniform(0.0, 2 * math.pi), habitus=habitus)
    lateral = float(np.clip((a - fat - muscle) / 118.0, 0.9, 1.15))  # organs spread with the cavity
    yv = -b + 0.8 * fat + muscle + rng.uniform(46.0, 58.0)  # centre of the vertebral bodies
    period = rng.uniform(30.0, 36.0)  # one vertebra and its disc
    z_l1 = 10.0 + zs
    # vertebra = ((z - phase) % period) > 8: a disc occupies [phase, phase + 8), L1's body is centred on z_l1
    spine = dict(y=yv, period=period, phase=(z_l1 - 8.0 - (period - 8.0) / 2) % period, z_l1=z_l1,
                 rib_phase=rng.uniform(0.0, 30.0), iliac=z_l1 - 3.3 * period + rng.uniform(-10, 10))

    def level(name: str) -> float:
        mean, sd = ORGAN_LEVELS[name]
        return z_l1 + float(np.clip(rng.normal(mean, sd), mean - 2.5 * sd, mean + 2.5 * sd)) * period

    dome = level("liver_dome")
    liver = dict(axes=_scaled(rng, (100.0, 62.0, 80.0), 0.08, 0.1),
                 rot=_rotation(rng.uniform(-15, 15), rng.uniform(-12, 12), rng.uniform(-12, 12)),
                 taper=rng.uniform(0.4, 0.7), waves=_shape_waves(rng, rng.uniform(0.06, 0.12)),
                 volume_ml=_log_normal(rng, *ORGAN_VOLUMES_ML["liver"]))
    liver["c"] = _into_cavity(body, np.array([55.0 * lateral, yv + 34.0, 0.0]) + np.r_[_normal(rng, 7.0, 18.0, 2), 0.0],
                              0.45)
    _fit_blob(liver, liver["volume_ml"] * _PAINT_LOSS["liver"], body)
    liver["c"][2] = dome - liver["top"]  # its top under the right dome (`_dome`)
    spleen = dict(c=_into_cavity(body, np.array([-92.0 * lateral, yv + 2.0, level("spleen")]) + _normal(rng, 7.0, 18.0),
                                 0.82),  # against the posterolateral wall, above and lateral to the left kidney
                  axes=_scaled(rng, (22.0, 55.0, 50.0), 0.08, 0.12),
                  rot=_rotation(rng.uniform(25, 55), rng.uniform(-15, 15), rng.uniform(-15, 15)),
                  waves=_shape_waves(rng, rng.uniform(0.06, 0.14)),
                  volume_ml=_log_normal(rng, *ORGAN_VOLUMES_ML["spleen"]))
    _fit_blob(spleen, spleen["volume_ml"] * _PAINT_LOSS["spleen"], body)
    left_dome = dome - 16.0 - 70.0 * (((spleen["c"][0] + 60.0) / 95.0) ** 2 + ((spleen["c"][1] + 5.0) / 85.0) ** 2)
    spleen["c"][2] = min(spleen["c"][2], left_dome - spleen["top"])  # under the left dome
    kidneys = {}
    z_right = level("kidney_right")
    for side, sign, z in (("kidney_right", 1.0, z_right),
                          ("kidney_left", -1.0, z_right + rng.uniform(*LEFT_KIDNEY_HIGHER_MM))):
        kidney = dict(c=_into_cavity(body, np.array([sign * 66.0 * lateral, yv - 8.0, z]) + _normal(rng, 5.0, 12.0),
                                     0.72),
                      axes=_scaled(rng, (25.0, 22.0, 52.0), 0.05, 0.1),
                      rot=_rotation(sign * rng.uniform(15, 40), -sign * rng.uniform(5, 20), rng.uniform(-15, -3)),
                      sign=sign, cortex=rng.uniform(5.0, 8.0), waves=_shape_waves(rng, rng.uniform(0.03, 0.07)),
                      volume_ml=_log_normal(rng, *ORGAN_VOLUMES_ML["kidney"]))
        kidneys[side] = _fit_blob(kidney, kidney["volume_ml"], body)
    # pancreas: head (right, near the duodenum, L2) -> neck (anterior to the vessels) -> body -> tail (splenic hilum)
    z_p = level("pancreas")
    ctrl = np.array([(32.0, 6.0, -0.6 * period), (6.0, 18.0, -0.25 * period), (-32.0, 8.0, 0.1 * period),
                     (-72.0 * lateral, -14.0, 0.5 * period)])
    ctrl = ctrl + _normal(rng, 6.0, 14.0, ctrl.size).reshape(ctrl.shape) + np.array([0.0, yv + 36.0, z_p])
    ctrl[-1, 2] = 0.5 * ctrl[-1, 2] + 0.5 * (spleen["c"][2] - 0.3 * spleen["axes"][2])  # the tail reaches the hilum
    pancreas = dict(ctrl=ctrl, radii=np.array([16.0, 10.0, 11.0, 9.0]) * rng.uniform(0.8, 1.2, 4),
                    lobules=(rng.uniform(0.06, 0.14), rng.uniform(4.0, 9.0), rng.uniform(0, 2 * math.pi)),
                    volume_ml=_log_normal(rng, *ORGAN_VOLUMES_ML["pancreas"]))
    _fit_pancreas(pancreas, pancreas["volume_ml"])
    stomach = dict(c=np.array([spleen["c"][0] + 34.0, spleen["c"][1] + 40.0, dome - 60.0]) + _normal(rng, 6.0, 12.0),
                   axes=_scaled(rng, (40.0, 30.0, 48.0), 0.2, 0.1),
                   rot=_rotation(rng.uniform(-40, -10), rng.uniform(-20, 10), 0), waves=_shape_waves(rng, 0.08),
                   gas=rng.uniform(0.15, 0.6), content=str(rng.choice(["fluid", "food", "contrast"], p=[.5, .3, .2])))
    gallbladder = dict(c=np.array([45.0 * lateral, yv + 71.0, liver["c"][2] - 41.0]) + _normal(rng, 6.0, 14.0),
                       axes=_scaled(rng, (14.0, 14.0, 30.0), 0.25), waves=_waves(rng, 0.05),
                       rot=_rotation(0, rng.uniform(-15, 15), rng.uniform(15, 45)))
    vessels = dict(aorta=(-12.0 + rng.uniform(-4, 4), yv + 29.0 + rng.uniform(-3, 3), rng.uniform(10.0, 13.0)),
                   ivc=(24.0 + rng.uniform(-4, 4), yv + 30.0 + rng.uniform(-3, 3), rng.uniform(9.0, 12.0)))
    heart = dict(c=np.array([-15.0, 30.0, 0.0]) + _normal(rng, 5.0, 10.0), axes=_scaled(rng, (60.0, 48.0, 52.0), 0.1))
    colon = dict(radius=rng.uniform(16.0, 26.0), wiggle=_normal(rng, 8.0, 16.0, 24).reshape(8, 3),
                 gas=rng.uniform(0.1, 0.5))
    oral_contrast = bool(rng.random() < 0.4)
    return dict(zs=zs, z_l1=z_l1, dome=dome, body=body, spine=spine, liver=liver, spleen=spleen, kidneys=kidneys,
                pancreas=pancreas, stomach=stomach, gallbladder=gallbladder, vessels=vessels, heart=heart,
                colon=colon, oral_contrast=oral_contrast, lateral=lateral, field_seed=int(rng.integers(2**31)),
                warp=dict(amplitude=rng.uniform(4.0, 10.0), cell=rng.uniform(60.0, 90.0)))


#: Published statistics the phantom's anatomy is compared with (docs/phantom.md gives the sources).
PUBLISHED_ANATOMY: dict[str, tuple[str, str]] = {
    "liver volume (mL)": ("1200-1900", "Heinemann et al. 1999: 1072.8 x BSA - 345.7 at BSA 1.5-2.1 m2"),
    "spleen volume (mL)": ("107-315, mean 215", "Prassopoulos et al. 1997 (CT, 140 adults)"),
    "kidney volume, each (mL)": ("100-200", "adult reference range (Cheong et al. 2007: MRI)"),
    "pancreas volume (mL)": ("72 +/- 26 (ages 20-60)", "Saisho et al. 2007 (CT, 1,721 adults)"),
    "liver dome (vertebra)": ("T9-T10", "Standring 2016 (Gray's Anatomy)"),
    "right kidney centre (vertebra)": ("L1-L2, hila mostly L2", "Mirjalili et al. 2012"),
    "left kidney higher than right (mm)": ("10-20", "Standring 2016 (Gray's Anatomy)"),
    "spleen centre (vertebra)": ("T10-T12", "Standring 2016 (Gray's Anatomy)"),
    "pancreas centre (vertebra)": ("L1-L2 (transpyloric plane)", "Mirjalili et al. 2012"),
    "subcutaneous fat, flank (mm)": ("thin to obese", "body habitus"),
    "liver touches right kidney (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
    "spleen touches left kidney (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
    "spleen touches stomach (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
}
#: The published ranges the anatomy figure shades, in each quantity's own unit: the adult volumes the generator
#: draws between (`ORGAN_VOLUMES_ML`) and the vertebral levels quoted above (vertebrae above L1's centre).
PUBLISHED_RANGES: dict[str, tuple[float, float]] = {
    "liver volume (mL)": ORGAN_VOLUMES_ML["liver"], "spleen volume (mL)": ORGAN_VOLUMES_ML["spleen"],
    "kidney volume, each (mL)": ORGAN_VOLUMES_ML["kidney"], "pancreas volume (mL)": ORGAN_VOLUMES_ML["pancreas"],
    "liver dome (vertebra)": (3, 4), "right kidney centre (vertebra)": (-1, 0),  # T10-T9, L2-L1
    "spleen centre (vertebra)": (1, 3), "pancreas centre (vertebra)": (-1, 0)}  # T12-T10, L2-L1
_VERTEBRAE = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")


def vertebra(level: float) -> str:
    """The vertebra at `level` (vertebrae above L1's centre): 0 -> L1, 1.4 -> T12, -0.6 -> L2."""
    index = int(np.clip(round(level), -4, 6)) + 4
    return _VERTEBRAE[index]


def patient_anatomy(seed: int, patient: int, spacing: float = 3.0) -> dict[str, float]:
    """One synthetic patient's anatomy measured on a whole-abdomen grid: painted organ volumes (mL),
    vertebral levels (vertebrae above L1's centre), left-right kidney offset, contacts, flank fat."""
    rng = np.random.default_rng([int(seed), 99, int(patient)])
    an = sample_anatomy(rng)
    bd, sp = an["body"], an["spine"]

    def axis(lo, hi):
        return np.arange(lo, hi + spacing, spacing, dtype=np.float64)

    grid = Grid(axis(-bd["a"] - 10, bd["a"] + 10), axis(bd["y0"] - bd["b"] - 10, bd["y0"] + bd["b"] + 10),
                axis(sp["iliac"] - 40.0, an["dome"] + 30.0))
    canvas, _ = build_anatomy(an, grid, None)
    voxel = spacing**3 / 1000.0
    organs = {n: canvas.organ == i for n, i in ORGANS.items()}
    z = grid.z[None, None, :]

    def level(mask) -> float:
        return float(((z * mask).sum() / max(mask.sum(), 1) - an["z_l1"]) / sp["period"])

    def touches(a, b) -> float:
        return 100.0 * float((ndimage.binary_dilation(organs[a], iterations=2) & organs[b]).any())

    liver_top = grid.z[np.flatnonzero(organs["liver"].any((0, 1)))[-1]] if organs["liver"].any() else np.nan
    return {
        "liver volume (mL)": organs["liver"].sum() * voxel,
        "spleen volume (mL)": organs["spleen"].sum() * voxel,
        "kidney volume, each (mL)": (organs["kidney_right"].sum() + organs["kidney_left"].sum()) * voxel / 2,
        "pancreas volume (mL)": organs["pancreas"].sum() * voxel,
        "liver dome (vertebra)": (liver_top - an["z_l1"]) / sp["period"],
        "right kidney centre (vertebra)": level(organs["kidney_right"]),
        "left kidney higher than right (mm)": (level(organs["kidney_left"]) - level(organs["kidney_right"]))
        * sp["period"],
        "spleen centre (vertebra)": level(organs["spleen"]),
        "pancreas centre (vertebra)": level(organs["pancreas"]),
        "subcutaneous fat, flank (mm)": bd["fat"],
        "liver touches right kidney (%)": touches("liver", "kidney_right"),
        "spleen touches left kidney (%)": touches("spleen", "kidney_left"),
        "spleen touches stomach (%)": touches("spleen", "stomach"),
    }


def anatomy_table(seed: int = 0, patients: int = 40, spacing: float = 3.0, progress: bool = True) -> pd.DataFrame:
    """The phantom's anatomy against published adult statistics: per quantity, the phantom's median and
    5th-95th percentiles over `patients` synthetic patients (contacts: % of patients) and the published range."""
    rows = [patient_anatomy(seed, k, spacing) for k in tqdm(range(patients), desc="anatomy", disable=not progress)]
    frame = pd.DataFrame(rows)
    out = []
    for quantity, (published, source) in PUBLISHED_ANATOMY.items():
        values = frame[quantity].astype(float)
        if quantity.endswith("(%)"):
            phantom = f"{values.mean():.0f} %"
        elif quantity.endswith("(vertebra)"):
            lo, mid, hi = values.quantile([0.05, 0.5, 0.95])
            phantom = f"{vertebra(mid)} ({vertebra(hi)} to {vertebra(lo)})"  # superior to inferior
        else:
            lo, mid, hi = values.quantile([0.05, 0.5, 0.95])
            phantom = f"{round(mid)} ({round(lo)} to {round(hi)})"
        out.append(dict(quantity=quantity, phantom=phantom, published=published, source=source))
    table = pd.DataFrame(out).set_index("quantity")
    table.attrs["patients"] = frame
    return table


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
    top_r = an["dome"]
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
    hil = _hilum(k)
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
    dx, dy, dz = _local(grid, box, (np.asarray(sc) + hil) / 2)  # renal pelvis: urine, opening at the hilum
    pelvis = (dx**2 + dy**2) / (0.28 * k["axes"][0]) ** 2 + dz**2 / (0.22 * k["axes"][2]) ** 2 <= 1.0
    tissue[pelvis & (sinus | notch)] = T["urine"]
    _paint(canvas, box, kidney | (pelvis & mask), tissue, organ_id)


def _pancreas(grid: Grid, p: dict[str, Any], canvas: _Canvas, masses: Sequence[tuple[float, float]] = ()):
    """The pancreas as a lobulated tube; `masses` (position 0..1 head to tail, radius mm) widen the
    gland around a tumour (mass effect), so that the tumour stays inside it."""
    points, radii = _pancreas_spline(p)
    ts = np.linspace(0, 1, len(points))
    for where, radius in masses:
        bulge = (radius + 4.0) * np.exp(-0.5 * ((ts - where) / 0.06) ** 2)
        radii = np.maximum(radii, bulge)
    tube = _tube(grid, points, radii)
    if tube is not None:
        _paint(canvas, tube[0], tube[1], T["pancreas"], ORGANS["pancreas"])


def _stomach(grid: Grid, s: dict[str, Any], canvas: _Canvas):
    blob = _blob(grid, s["c"], s["axes"], s["rot"], waves=s["waves"])
    if blob is None:
        return
    box, mask, rho = blob
    wall = 1.0 - 4.5 / float(np.min(s["axes"]))
    content = {"fluid": T["fluid"], "food": T["mottled"], "contrast": T["oral"]}[s.get("content", "fluid")]
    tissue = np.full(mask.shape, content, np.uint8)
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


# ---------------------------------------------------------------------------------------------------
# Structure inside and between organs: vessels, renal pelvis, colon, bowel contents, fat strands.
# ---------------------------------------------------------------------------------------------------
def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / (np.linalg.norm(v) + 1e-9)


def _vessel_tree(rng: np.random.Generator, root, direction, length: float, radius: float,
                 depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A random branching vessel: polylines (points, radii), each branch splitting in two, thinner."""
    out, stack = [], [(np.asarray(root, float), _unit(direction), length, radius, depth)]
    while stack:
        start, d, span, r, k = stack.pop()
        bend = _unit(d + rng.normal(0.0, 0.35, 3))
        mid = start + 0.5 * span * d
        end = mid + 0.5 * span * bend
        out.append((np.array([start, mid, end]), np.array([r, 0.9 * r, 0.8 * r])))
        if k > 0:
            for _ in range(2):
                stack.append((end, _unit(bend + rng.normal(0.0, 0.7, 3)), span * rng.uniform(0.5, 0.75),
                              max(0.8 * r * rng.uniform(0.7, 0.9), 1.2), k - 1))
    return out


def _paint_tubes(grid: Grid, canvas: _Canvas, tubes, tissue: int, organ: int = 0, inside: int | None = None,
                 body: np.ndarray | None = None) -> None:
    """Paint polylines: `inside` an organ's voxels (tissue only, the organ keeps its id), else in the free
    cavity and fat (with `organ` as their id)."""
    for points, radii in tubes:
        tube = _tube(grid, points, radii)
        if tube is None:
            continue
        box, mask = tube
        if inside is not None:
            m = mask & (canvas.organ[box] == inside)
            canvas.tissue[box][m] = tissue
            continue
        allowed = (canvas.free[box] | ((canvas.tissue[box] == T["fat"]) & (canvas.organ[box] == 0)))
        if body is not None:
            allowed &= body[box]
        _paint(canvas, box, mask, tissue, organ, where=allowed)


def _hilum(k: dict[str, Any]) -> np.ndarray:
    """The renal hilum: the medial notch of the bean."""
    return np.asarray(k["c"]) + k["rot"] @ np.array([-k["sign"] * k["axes"][0] * 1.05, 0.25 * k["axes"][1], 0.0])


def _liver_hilum(an: dict[str, Any]) -> np.ndarray:
    """The porta hepatis: where the portal vein enters the liver (medial, posterior, low)."""
    c, ax = np.asarray(an["liver"]["c"]), np.asarray(an["liver"]["axes"])
    return c + np.array([-0.3 * ax[0], -0.1 * ax[1], -0.45 * ax[2]])


def _liver_vessels(grid: Grid, an: dict[str, Any], canvas: _Canvas, rng: np.random.Generator) -> None:
    """Portal and hepatic veins inside the liver (part of the liver's label, as in the datasets)."""
    x_ivc, y_ivc, _ = an["vessels"]["ivc"]
    size = float(np.mean(an["liver"]["axes"]))
    hilum = _liver_hilum(an)
    tubes = []
    for direction in ((1.0, -0.3, 0.3), (-1.0, 0.5, 0.3)):  # portal vein: right and left branches
        tubes += _vessel_tree(rng, hilum, direction, 0.55 * size, rng.uniform(5.0, 7.0), 2)
    root = np.array([x_ivc, y_ivc, an["dome"] - 28.0])  # hepatic veins drain into the IVC below the dome
    for direction in ((1.0, -0.2, -0.7), (0.3, 0.7, -0.7), (-0.8, 0.6, -0.4)):  # right, middle, left
        tubes += _vessel_tree(rng, root, direction, 0.6 * size, rng.uniform(4.5, 6.5), 2)
    _paint_tubes(grid, canvas, tubes, T["vein"], inside=ORGANS["liver"])


def _portal_splenic(grid: Grid, an: dict[str, Any], canvas: _Canvas, body: np.ndarray) -> None:
    """The splenic vein behind the pancreas, joining the portal vein behind its neck, up to the liver
    (BTCV's "portal and splenic vein")."""
    p, sp = an["pancreas"], an["spleen"]
    ctrl, radii = np.asarray(p["ctrl"]), np.asarray(p["radii"])
    behind = ctrl[1:] - np.array([0.0, 1.0, 0.0])[None, :] * (radii[1:, None] + 6.0)
    splenic_hilum = np.asarray(sp["c"]) + np.array([0.6 * sp["axes"][0] + 8.0, 10.0, -0.2 * sp["axes"][2]])
    splenic = np.vstack([behind, splenic_hilum])
    confluence = behind[0]
    hilum = _liver_hilum(an)
    portal = np.array([confluence, (confluence + hilum) / 2 + np.array([0.0, -5.0, 0.0]), hilum])
    r = an["vessels"]["ivc"][2] * 0.6
    _paint_tubes(grid, canvas, [(splenic, np.full(len(splenic), 0.55 * r)), (portal, np.full(3, r))],
                 T["vein"], ORGANS["portal_vein"], body=body)


def _renal_vessels(grid: Grid, an: dict[str, Any], canvas: _Canvas, body: np.ndarray) -> None:
    """Renal veins to the IVC (the left one in front of the aorta) and renal arteries from the aorta."""
    xa, ya, ra = an["vessels"]["aorta"]
    xi, yi, _ = an["vessels"]["ivc"]
    veins, arteries = [], []
    for k in an["kidneys"].values():
        hil = _hilum(k)
        via = [] if k["sign"] > 0 else [np.array([xa, ya + ra + 7.0, hil[2] + 4.0])]
        veins.append((np.array([hil, *via, np.array([xi, yi, hil[2] + 6.0])]), np.full(2 + len(via), 5.0)))
        arteries.append((np.array([np.array([xa, ya, hil[2] + 12.0]), hil + np.array([0.0, -6.0, 6.0])]),
                         np.full(2, 3.0)))
    _paint_tubes(grid, canvas, veins, T["vein"], body=body)
    _paint_tubes(grid, canvas, arteries, T["artery"], body=body)


def _colon(grid: Grid, an: dict[str, Any], canvas: _Canvas, field: np.ndarray) -> None:
    """The colon framing the abdomen (caecum, ascending, transverse, descending, sigmoid) with
    faeces-like mottled contents and gas."""
    yv, lat, sp, lv = an["spine"]["y"], an["lateral"], an["spine"], an["liver"]
    z_l1, p = an["z_l1"], sp["period"]
    flex_r = lv["c"][2] - 0.6 * lv["axes"][2]
    flex_l = an["spleen"]["c"][2] - 0.5 * an["spleen"]["axes"][2]
    path = np.array([
        (78 * lat, yv + 45, sp["iliac"] + 15), (88 * lat, yv + 30, flex_r - 30), (72 * lat, yv + 70, flex_r),
        (0.0, yv + 105, z_l1 - 1.5 * p), (-76 * lat, yv + 60, flex_l), (-88 * lat, yv + 30, z_l1 - 1.5 * p),
        (-80 * lat, yv + 40, sp["iliac"] + 5), (-30.0, yv + 65, sp["iliac"] - 25)]) + an["colon"]["wiggle"]
    spline = CubicSpline(np.linspace(0, 1, len(path)), path, axis=0)
    points = spline(np.linspace(0, 1, 60))
    radius = an["colon"]["radius"]
    outer = _tube(grid, points, np.full(len(points), radius))
    if outer is None:
        return
    box, mask = outer
    inner = _tube(grid, points, np.full(len(points), max(radius - 3.5, 2.0)))
    tissue = np.full(mask.shape, T["bowel"], np.uint8)
    if inner is not None:
        lumen = np.zeros(mask.shape, bool)
        sub = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner[0], box))
        lumen[sub] = inner[1]
        tissue[lumen] = T["mottled"]
        tissue[lumen & (field[box] > 1.2 - 2.0 * an["colon"]["gas"])] = T["gas"]
    _paint(canvas, box, mask, tissue)


def _bowel(grid: Grid, an: dict[str, Any], canvas: _Canvas, field_rng: np.random.Generator):
    """Small-bowel loops in the free cavity, denser low in the abdomen, in front of the spine: a wall and a
    lumen holding gas, fluid or (with oral contrast) contrast, loop by loop."""
    loops = _smooth_field(field_rng, grid, 11.0)
    contents = _smooth_field(field_rng, grid, 40.0)
    zz, yy = grid.z[None, None, :], grid.y[None, :, None]
    top = an["liver"]["c"][2] - 10.0
    threshold = 0.1 + np.clip((zz - (top - 90.0)) / 90.0, 0.0, 1.0) * 1.6
    where = canvas.free & (yy > an["spine"]["y"] - 5.0)
    bowel = where & (loops > threshold)
    lumen = bowel & (loops > threshold + 0.5)
    canvas.tissue[bowel] = T["bowel"]
    canvas.tissue[lumen] = T["fluid"]
    canvas.tissue[lumen & (contents < -0.5)] = T["gas"]
    if an["oral_contrast"]:
        canvas.tissue[lumen & (contents > 0.3)] = T["oral"]
    canvas.tissue[bowel & (loops > threshold + 1.2) & (contents < 0.5)] = T["gas"]
    canvas.free[bowel] = False


def _fat_strands(grid: Grid, canvas: _Canvas, field_rng: np.random.Generator) -> None:
    """Thin septa and small vessels in the fat: where a smooth random field crosses zero."""
    field = _smooth_field(field_rng, grid, 18.0)
    sheets = np.abs(field) < 0.06
    canvas.tissue[sheets & (canvas.tissue == T["fat"]) & (canvas.organ == 0)] = T["strand"]
    canvas.tissue[(np.abs(field - 1.0) < 0.03) & (canvas.tissue == T["fat_sc"])] = T["strand"]


def _warp(grid: Grid, an: dict[str, Any], canvas: _Canvas, field_rng: np.random.Generator) -> None:
    """A smooth random deformation of the whole body (nearest-neighbour resampling of the maps), so
    that no two patients share the same straight spine, round body or organ outlines."""
    amplitude, cell = an["warp"]["amplitude"], an["warp"]["cell"]
    shape = grid.shape
    coords = np.empty((3, *shape), np.float32)
    for dim, step in enumerate(grid.spacing):
        index = np.arange(shape[dim], dtype=np.float32).reshape([-1 if d == dim else 1 for d in range(3)])
        coords[dim] = index + _smooth_field(field_rng, grid, cell) * (amplitude / step)
    for array in (canvas.tissue, canvas.organ):
        array[...] = ndimage.map_coordinates(array, coords, order=0, mode="nearest")
    canvas.free[...] = ndimage.map_coordinates(canvas.free.view(np.uint8), coords, order=0, mode="nearest") > 0
    canvas.boxes.clear()
    for oid, box in enumerate(ndimage.find_objects(canvas.organ), start=1):
        if box is not None:
            canvas.boxes[oid] = box


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
    _renal_vessels(grid, anatomy, canvas, body)
    # the pancreas before the liver and spleen: the retroperitoneal gland keeps its volume, they wrap around it
    _pancreas(grid, anatomy["pancreas"], canvas, [(t["where"], t["radius"]) for t in plan if t["organ"] == "pancreas"])
    for name in ("liver", "spleen"):
        o = anatomy[name]
        blob = _blob(grid, o["c"], o["axes"], o["rot"], exponent=2,
                     waves=o["waves"], taper=o.get("taper", 0.0))
        if blob is not None:
            _paint(canvas, blob[0], blob[1], T[name], ORGANS[name])
    seed = anatomy["field_seed"]
    _liver_vessels(grid, anatomy, canvas, np.random.default_rng([seed, 1]))
    _portal_splenic(grid, anatomy, canvas, body)
    _stomach(grid, anatomy["stomach"], canvas)
    _colon(grid, anatomy, canvas, _smooth_field(np.random.default_rng([seed, 4]), grid, 6.0))
    _chest(grid, anatomy, canvas, cavity, dome)
    _warp(grid, anatomy, canvas, np.random.default_rng([seed, 2]))
    _bowel(grid, anatomy, canvas, np.random.default_rng(seed))
    _fat_strands(grid, canvas, np.random.default_rng([seed, 3]))
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
#: The generator's image domains. "ct": the CT-realistic default of every table; "randomised": SynthSeg-style
#: domain randomisation of the training datasets (a random intensity and texture per tissue, bias field,
#: random blur and noise; the BTCV test set stays "ct"); "other_scanner": another CT scanner and protocol
#: (the other contrast phase, a softer kernel, more noise, another calibration), a test domain.
DOMAINS = ("ct", "randomised", "other_scanner")

#: The contrast phases a CT comes in, and each one's window of seconds after the start of the injection: a case's
#: scan time is drawn in its phase's window (bolus timing varies within a phase). Unenhanced: no contrast.
PHASES: dict[str, tuple[float, float] | None] = {
    "unenhanced": None, "arterial": (30.0, 45.0), "portal": (60.0, 90.0), "delayed": (180.0, 300.0)}
#: Enhancement curves: seconds at which `_TISSUES` gives each tissue's late arterial, portal venous and delayed
#: enhancement (0 at the injection); linear in between, the delayed value after its knot.
PHASE_KNOTS_S = (0.0, 35.0, 70.0, 240.0)
#: A tumour's contrast to its organ (drawn for the portal venous phase) in each phase: subtle without contrast,
#: hypervascular tumours brighter and hypovascular ones a little less dark in the late arterial phase, fading
#: in the delayed phase (the generator's rule, not a measurement).
TUMOUR_CONTRAST = {"unenhanced": (0.4, 0.4), "arterial": (0.8, 1.6), "portal": (1.0, 1.0), "delayed": (0.8, 0.7)}
#: `data.phantom.phases`: "published" (each dataset's own phase mix, `catalogue.Phantom.scanner["phases"]`),
#: "all" (every phase equally likely, for every training dataset), or one phase for every case of every dataset.
PHASE_CHOICES = ("published", "all", *PHASES)


def case_phase(dataset: str, phases: str, rng: np.random.Generator) -> str:
    """The contrast phase of one case: drawn from the dataset's published mix, or from every phase (training
    datasets only: the external test set keeps its own with `phases="all"`), or the one phase asked for."""
    if phases not in PHASE_CHOICES:
        raise ValueError(f"Unknown data.phantom.phases {phases!r}: use one of {', '.join(PHASE_CHOICES)}.")
    if phases in PHASES:
        return phases
    mix = dict(PROFILES[dataset]["phases"])
    if phases == "all" and BY_NAME[dataset].role == "train":
        mix = {phase: 1.0 for phase in PHASES}
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))] if len(names) > 1 else names[0]


def enhancement(phase: str, seconds: float | None = None) -> np.ndarray:
    """Each tissue's enhancement (HU over its unenhanced value) `seconds` after the injection (default: the
    phase's reference time), interpolated between the knots of `PHASE_KNOTS_S`; zero for unenhanced."""
    table = np.array([_TISSUES[n][1:4] for n in _TISSUE_NAMES], dtype=np.float32)
    if PHASES[phase] is None:
        return np.zeros(len(table), np.float32)
    if seconds is None:
        seconds = PHASE_KNOTS_S[list(PHASES).index(phase)]
    knots = np.concatenate([np.zeros((len(table), 1), np.float32), table], axis=1)
    return np.array([np.interp(seconds, PHASE_KNOTS_S, row) for row in knots], dtype=np.float32)


def _intensities(rng: np.random.Generator, grid: Grid, canvas: _Canvas, tumours: list[dict[str, Any]],
                 dataset: str, mri: bool, field_rng: np.random.Generator, domain: str = "ct",
                 phase: str = "portal") -> tuple[np.ndarray, dict[str, Any]]:
    """The image of an anatomy (HU, or MRI-like units) and its acquisition: phase and seconds after injection."""
    p = dict(PROFILES[dataset])
    table = np.array([_TISSUES[n] for n in _TISSUE_NAMES], dtype=np.float32)
    texture = _smooth_field(field_rng, grid, 7.0)
    blur, noise_scale = 1.0, 1.0
    if domain == "other_scanner":
        phase = {"arterial": "portal", "portal": "arterial"}.get(phase, phase)
        p.update(gain=p["gain"] * 1.1, offset=p["offset"] + 25.0)
        blur, noise_scale = 1.8, 1.7
    randomised = domain == "randomised" and not mri
    window = PHASES[phase]
    seconds = None if window is None or mri or randomised else float(rng.uniform(*window))
    acquisition = {"phase": "mri_like" if mri else "randomised" if randomised else phase,
                   "seconds": None if seconds is None else round(seconds, 1)}
    if mri:
        values = table[:, 5] * rng.uniform(0.9, 1.1)
        tex_sd = table[:, 4] * 2.0
    elif randomised:  # SynthSeg-style: every tissue its own random mean and texture, in the HU window
        values = rng.uniform(-450.0, 450.0, len(table)).astype(np.float32)
        tex_sd = rng.uniform(0.0, 40.0, len(table)).astype(np.float32)
    else:
        dose = rng.uniform(0.85, 1.15)  # the patient's enhancement per unit contrast (cardiac output, weight, dose)
        values = table[:, 0] + enhancement(phase, seconds) * dose
        tex_sd = table[:, 4]
    image = values[canvas.tissue]
    image += texture * tex_sd[canvas.tissue]
    organ_value = {"liver": T["liver"], "pancreas": T["pancreas"], "kidney": T["k_medulla"]}
    for t in tumours:
        delta = t["delta"] * (-4.0 if mri else 1.0)  # tumours bright on the MRI-like contrast
        if randomised:
            delta = rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 150.0)
        elif not mri:
            hypo, hyper = TUMOUR_CONTRAST[phase]
            delta *= hyper if delta > 0 else hypo
        view = image[t["box"]]
        base = values[organ_value[t["organ"]]] if t["organ"] != "kidney" else view[t["mask"]].mean()
        view[t["mask"]] = base + delta + texture[t["box"]][t["mask"]] * 6.0
        view[t["core"]] += t["necrosis"] * (-4.0 if mri else 1.0)
    sigma_in, sigma_z = rng.uniform(0.5, 0.9) * blur, rng.uniform(0.4, 0.8) * blur  # partial volume (voxels)
    if randomised:  # random resolution: anything from sharp to a few voxels of blur, per axis
        sigma_in, sigma_z = rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.5)
    image = ndimage.gaussian_filter(image, (sigma_in, sigma_in, sigma_z), truncate=3.0)
    noise_sd = rng.uniform(*p["noise"]) * noise_scale
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    if mri:
        bias = np.exp(0.15 * _smooth_field(field_rng, grid, 120.0))
        noise2 = rng.standard_normal(image.shape, dtype=np.float32)
        image = np.sqrt((image * bias + noise * noise_sd) ** 2 + (noise2 * noise_sd) ** 2)  # Rician
        return np.clip(np.rint(image), 0, 32767).astype(np.int16), acquisition
    if randomised:
        bias = np.exp(rng.uniform(0.0, 0.3) * _smooth_field(field_rng, grid, 120.0))
        image = (image + 500.0) * bias - 500.0  # multiplicative about the window's floor
        return np.clip(np.rint(image + noise * rng.uniform(0.0, 40.0)), -1024, 3071).astype(np.int16), acquisition
    image = image * p["gain"] + p["offset"] + noise * noise_sd
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), acquisition


#: The tissues whose values the enhancement table compares with the published ones (`enhancement_table`), named.
ENHANCEMENT_TISSUES = {"aorta": "artery", "portal vein, IVC": "vein", "liver": "liver", "spleen": "spleen",
                       "pancreas": "pancreas", "kidney cortex": "k_cortex", "kidney medulla": "k_medulla",
                       "renal pelvis (urine)": "urine"}


def enhancement_table(seed: int = 0, patients: int = 10, dataset: str = "btcv", progress: bool = True) -> pd.DataFrame:
    """Each tissue's value in each phase as the images show it (HU; median and 5th-95th percentile over `patients`
    cases of `dataset`, each case's median over the tissue's voxels: blur, noise, bolus timing and the scanner's
    calibration included) beside the published value the generator aims at (unenhanced + enhancement at the
    phase's reference time, `PHASE_KNOTS_S`)."""
    values: dict[tuple[str, str], list[float]] = {}
    for k in tqdm(range(patients), desc="enhancement", disable=not progress):
        for phase in PHASES:
            case = simulate_case(dataset, f"case{k:04d}", seed=seed, phases=phase)
            image, tissue = case["image"].astype(np.float32), case["tissue"]
            for name, t in ENHANCEMENT_TISSUES.items():
                inside = tissue == T[t]
                if inside.any():
                    values.setdefault((name, phase), []).append(float(np.median(image[inside])))
    rows = []
    for name, t in ENHANCEMENT_TISSUES.items():
        row = {"tissue": name}
        for phase in PHASES:
            found = np.asarray(values.get((name, phase), []))
            target = _TISSUES[t][0] + float(enhancement(phase)[T[t]])
            lo, mid, hi = np.percentile(found, [5, 50, 95]) if len(found) else (np.nan,) * 3
            row[phase] = f"{mid:.0f} ({lo:.0f} to {hi:.0f}) / {target:.0f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("tissue")


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
                  slice_zoom: float = 1.5, mri_like: bool = False, domain: str = "ct",
                  phases: str = "published") -> dict[str, Any]:
    """One synthetic case on its canonical RAS grid (before the dataset's storage orientation).

    `domain` (`DOMAINS`) and `phases` (`PHASE_CHOICES`: the dataset's published mix, every phase, or one) change
    only the image: the same case has the same anatomy and labels in every domain, phase and contrast.

    Returns image (int16), label (uint8, the dataset's own values), organs, tumour_map and tissue
    (the full anatomy: internal ids `ORGANS`, `TUMOURS`, tissue classes `T`), affine (RAS), tumours
    (organ and radius of each), acquisition (contrast phase and seconds after the injection), grid.
    """
    if dataset not in PROFILES:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(PROFILES)}.")
    if domain not in DOMAINS:
        raise ValueError(f"Unknown phantom domain {domain!r}: use one of {', '.join(DOMAINS)}.")
    rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id)])
    anatomy = sample_anatomy(rng)
    grid = sample_grid(rng, dataset, anatomy, inplane_zoom, slice_zoom)
    canvas, tumours = build_anatomy(anatomy, grid, rng, _TUMOUR_TASKS[dataset])
    field_rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id), 1])
    phase = case_phase(dataset, phases, np.random.default_rng([int(seed), DATASETS.index(dataset),
                                                               case_number(case_id), 2]))
    image, acquisition = _intensities(rng, grid, canvas, tumours, dataset, mri_like, field_rng, domain, phase)
    return dict(image=image, label=dataset_label(dataset, canvas), organs=canvas.organ,
                tumour_map=canvas.tumour, tissue=canvas.tissue, affine=grid.affine(), grid=grid,
                tumours=[{k: t[k] for k in ("organ", "radius_mm")} for t in tumours], acquisition=acquisition)


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
                         slice_zoom=job["slice_zoom"], mri_like=job["mri"], domain=job["domain"],
                         phases=job["phases"])
    axcodes = PROFILES[job["dataset"]]["axcodes"]
    image, affine = to_storage(case["image"], case["affine"], axcodes)
    label, _ = to_storage(case["label"], case["affine"], axcodes)
    tag = f"fedseg phantom {PHANTOM_VERSION} {job['dataset']}"
    root = Path(job["root"])
    kind = " MRI-like" if job["mri"] else {"ct": " CT", "randomised": " randomised", "other_scanner": " CT scanner B"}[
        job["domain"]]
    _atomic_write(root / job["image"], nifti_bytes(image, affine, tag + kind))
    _atomic_write(root / job["label"], nifti_bytes(label, affine, tag + " label"))
    return dict(dataset=job["dataset"], case_id=job["case_id"], shape=list(image.shape),
                spacing=[round(float(s), 3) for s in voxel_sizes(affine)],
                axcodes="".join(axcodes), labels=np.flatnonzero(np.bincount(label.ravel(), minlength=1)).tolist(),
                tumours=case["tumours"], acquisition=case["acquisition"], seconds=time.perf_counter() - start)


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


def _parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets, domain,
                phases) -> dict[str, Any]:
    return dict(seed=int(seed), case_scale=float(case_scale), min_cases=[int(m) for m in min_cases],
                inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom),
                mri_like=sorted(mri_like), datasets=None if datasets is None else sorted(datasets), domain=str(domain),
                phases=str(phases))


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
             mri_like: Sequence[str] = (), datasets: Sequence[str] | None = None, domain: str = "ct",
             phases: str = "published", workers: int | None = None, progress: bool = True) -> Path:
    """Write the synthetic datasets under `data_root` in the real layouts; returns `data_root`.

    Cases are `subset_manifest(load_manifest(), case_scale, min_cases)` (optionally only `datasets`);
    voxel sizes are the real ones times `inplane_zoom` / `slice_zoom`; `mri_like` datasets get an
    MRI-like contrast; `domain` (`DOMAINS`) the image domain ("randomised" applies to the training
    datasets only: the external test set stays realistic CT); `phases` (`PHASE_CHOICES`) each case's contrast
    phase: the dataset's published mix, every phase for the training datasets ("all"), or one phase for all.
    Files: each case's image (int16) and label (uint8) .nii.gz, an MSD `dataset.json` per MSD task,
    `manifest.csv` (the subset, written last) and `phantom.json` (the parameters and each case's acquisition,
    written at the very end). A finished generation with the
    same parameters is reused as it is; the same parameters always give the same bytes.
    """
    root = Path(data_root)
    unknown = sorted(set(mri_like).union(datasets or ()) - set(PROFILES))
    if unknown:
        raise ValueError(f"Unknown dataset(s) {unknown} in mri_like/datasets: use names from {list(PROFILES)}.")
    if domain not in DOMAINS:
        raise ValueError(f"Unknown phantom domain {domain!r} (data.phantom.domain): use one of {', '.join(DOMAINS)}.")
    if phases not in PHASE_CHOICES:
        raise ValueError(f"Unknown data.phantom.phases {phases!r}: use one of {', '.join(PHASE_CHOICES)}.")
    if min(inplane_zoom, slice_zoom) <= 0:
        raise ValueError(f"inplane_zoom and slice_zoom must be positive, got {inplane_zoom}, {slice_zoom}.")
    record = dict(generator="fedseg.data.phantom", version=PHANTOM_VERSION,
                  parameters=_parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets,
                                         domain, phases))
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
                 inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom), mri=r.dataset in set(mri_like),
                 domain="ct" if domain == "randomised" and BY_NAME[r.dataset].role != "train" else domain,
                 phases=phases)
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


def generation(data_root: str | Path) -> dict[str, Any] | None:
    """The generator version and parameters a synthetic data root was written with (its phantom.json), or None
    for a root the phantom did not write (real data)."""
    try:
        record = json.loads((Path(data_root) / PHANTOM_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"version": record.get("version"), "parameters": record.get("parameters")}


def clear(data_root: str | Path) -> None:
    """Delete a synthetic data root the phantom wrote (refuses folders without its phantom.json)."""
    root = Path(data_root)
    if not ((root / PHANTOM_FILE).exists() or (root / _IN_PROGRESS).exists()):
        raise FileNotFoundError(f"{root} has no {PHANTOM_FILE}: not a phantom data root, not deleting it.")
    shutil.rmtree(root)
