"""One patient on one grid: the painting order of every structure (`build_anatomy`, order = priority), and the
tumours' plan (organ, radius, position) and placement strictly inside their organs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from fedseg.data.phantom.anatomy import _waves
from fedseg.data.phantom.geometry import Grid, _blob, _rotation, _smooth_field
from fedseg.data.phantom.painting import (
    _body,
    _Canvas,
    _chest,
    _dome,
    _kidney,
    _paint,
    _pancreas,
    _skeleton,
    _stomach,
    _vessels,
)
from fedseg.data.phantom.structure import (
    _bowel,
    _colon,
    _fat_strands,
    _liver_vessels,
    _portal_splenic,
    _renal_vessels,
    _warp,
)
from fedseg.data.phantom.tissues import ORGANS, TUMOURS, T

#: Tumour radius range (mm, real scale; log-uniform, at least two in-plane voxels).
_TUMOUR_RADIUS = {"liver": (3.0, 25.0), "pancreas": (5.0, 18.0), "kidney": (5.0, 25.0)}


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
