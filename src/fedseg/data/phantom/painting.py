"""Painting a case's maps: the canvas (tissue classes, organ ids, tumour ids, free cavity), the body wall and
table, diaphragm, skeleton, aorta and IVC, kidneys, pancreas, stomach, heart and lungs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from fedseg.data.phantom.anatomy import _pancreas_spline
from fedseg.data.phantom.geometry import Grid, _blob, _box, _local, _rotation, _tube
from fedseg.data.phantom.tissues import ORGANS, T


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


def _hilum(k: dict[str, Any]) -> np.ndarray:
    """The renal hilum: the medial notch of the bean."""
    return np.asarray(k["c"]) + k["rot"] @ np.array([-k["sign"] * k["axes"][0] * 1.05, 0.25 * k["axes"][1], 0.0])


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
