"""One patient's anatomy (mm, RAS): body and organ parameters drawn from published adult statistics
(`ORGAN_VOLUMES_ML`, `ORGAN_LEVELS`), each organ fitted to the room the body cavity leaves it (`sample_anatomy`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.interpolate import CubicSpline

from fedseg.data.phantom.geometry import Grid, _blob, _rotation


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
