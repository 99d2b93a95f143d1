"""Structure inside and between organs: liver, portal-splenic and renal vessels, colon with its contents,
small-bowel loops, strands in the fat, and the smooth random deformation of the whole body.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from fedseg.data.phantom.geometry import Grid, _smooth_field, _tube
from fedseg.data.phantom.painting import _Canvas, _hilum, _paint
from fedseg.data.phantom.tissues import ORGANS, T


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
