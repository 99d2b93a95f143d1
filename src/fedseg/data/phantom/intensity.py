"""Intensities: the image of an anatomy (`_intensities`) in one domain (`DOMAINS`): CT in HU (contrast
phase, texture, tumours, partial volume, noise, the scanner's calibration), MRI-like, or SynthSeg-style randomised;
the contrast phases (`PHASES`), the tissues' enhancement curves (`enhancement`), a tumour's contrast in each phase
and the phase of one case (`case_phase`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from fedseg.data.catalogue import BY_NAME
from fedseg.data.phantom.acquisition import SCANNERS
from fedseg.data.phantom.geometry import Grid, _smooth_field
from fedseg.data.phantom.painting import _Canvas
from fedseg.data.phantom.tissues import _TISSUE_NAMES, _TISSUES, T

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
    mix = dict(SCANNERS[dataset]["phases"])
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
    p = dict(SCANNERS[dataset])
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
