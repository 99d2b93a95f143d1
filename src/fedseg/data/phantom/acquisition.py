"""Each dataset's scanner (`SCANNERS`: voxel size, field of view, scan range, phases, calibration,
storage orientation) and the scan grid of one patient in it (`sample_grid`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedseg.data.catalogue import CATALOGUE
from fedseg.data.phantom.geometry import Grid

#: Per-dataset acquisition, at real scale (mm; in-plane and slice spacing are multiplied by the zooms).
#: axcodes: orientation of the stored array (nibabel codes: the direction each array axis points to).
SCANNERS: dict[str, dict[str, Any]] = {d.name: d.phantom.scanner for d in CATALOGUE}
#: Deprecated name of `SCANNERS` (a "profile" is a run's settings, `fedseg/profiles/`; docs/glossary.md).
PROFILES = SCANNERS


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
    p = SCANNERS[dataset]
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
