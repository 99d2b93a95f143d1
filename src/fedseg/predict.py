"""Apply a trained run to one's own CT: `python -m fedseg predict --run results/<run> --images <folder>`.

Every NIfTI of the folder goes through 04's path (`fedseg.evaluate.external`) unchanged: the profile's preprocessing
(`inference.inference_transform`: RAS, the run's voxel size, the HU window), sliding-window inference with the
chosen model's checkpoints, the combination 04 uses for that method (the FL local ensemble takes each channel
from the client that owns it; "processed" adds the connected-component post-processing), inversion to the
image's own grid (MONAI Invertd, `inference.to_original_grid`) and fusion into one label map whose values are
channel indices (`fedseg.data.labels.CHANNELS`: 1 liver, 2 liver tumour, 3 spleen, 4 pancreas, 5 pancreas tumour,
6 kidney, 7 kidney tumour), as 04 writes BTCV's predictions. Per image it writes, into the output folder:

- `<case>.nii.gz`: the label map on the image's grid (its shape, affine and header; uint8),
- `<case>.png`: axial and coronal slices through the predicted organs over the CT (W400 L40), with a legend,

and one `volumes.csv` for all: per case, the volume of each label in mL (voxels x voxel volume from the written
NIfTI's header). A fused label counts each voxel once: the liver's volume with its tumours is liver + liver_tumor.

Each input is also checked against what the run's models were trained on (`training_domain`): its contrast phase
is estimated from the CT values inside the predicted organs and a simple aorta finder (`estimate_phase`, whose
docstring gives the rule and thresholds), its field of view is measured (`field_of_view`), and a `remark` says when
either lies outside the training data (`remark`): in volumes.csv (columns `phase_estimate`, `phase_hu`, `fov_mm`,
`remark`), under the PNG's title, and after the printed volumes.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import PROFILE_FILE, load_profile, local_path, synthetic_data_root
from fedseg.data import phantom
from fedseg.data.catalogue import BY_NAME
from fedseg.data.labels import (
    CHANNEL_INDEX,
    CHANNELS,
    COLOURS,
    FOREGROUND,
    NUM_CHANNELS,
    TRAIN_DATASETS,
)
from fedseg.evaluate import external
from fedseg.reporting.figures import ct_display
from fedseg.reporting.report import best_axial_slice, canonical, overlay
from fedseg.train import inference
from fedseg.train.training import select_device

#: Model names on the command line -> 04's method (`external.METHODS`). Each name is also its output folder.
MODELS: dict[str, str] = {
    "fl-local-ensemble": external.LOCAL,
    "fl-local-processed": external.LOCAL_PP,
    "fl-global": external.GLOBAL,
    "sl-ensemble": external.SL,
    "sl-processed": external.SL_PP,
    "central": external.CENTRAL,
}
DEFAULT_MODEL = "fl-local-ensemble"
#: The notebook that trains each checkpoint group (`external.group_checkpoints`).
GROUP_NOTEBOOK = {"sl": "02_standalone_baselines", "central": "02_standalone_baselines",
                  "fl-global": "03_federated_training", "fl-local": "03_federated_training"}
#: `volumes.csv`'s columns after `case`: the voxel volume, then one per foreground label.
VOLUME_COLUMNS = ("voxel_mm3", *(f"{name}_ml" for name in FOREGROUND))
#: ... then the input's check against the training data: the estimated phase (`estimate_phase`), the CT values it
#: was estimated from, the field of view (R-L x A-P x S-I mm) and the remark ("" when nothing is out of domain).
CHECK_COLUMNS = ("phase_estimate", "phase_hu", "fov_mm", "remark")

# ---------------------------------------------------------------------------------------------------
# Is the input like the training data? Contrast phase and field of view.
# ---------------------------------------------------------------------------------------------------
#: The phases' names in remarks (`phantom.PHASES`, plus the estimator's "enhanced": contrast, phase not determined).
PHASE_NAMES = {"unenhanced": "unenhanced", "arterial": "late arterial", "portal": "portal venous",
               "delayed": "delayed", "enhanced": "contrast-enhanced"}
#: The least predicted volume (mL) of an organ whose CT values `estimate_phase` uses.
PHASE_MIN_ML = {"kidney": 10.0, "liver": 100.0}
#: An organ's median outside this range (HU) is not the organ (fat, air, bone painted by a lost model): not used.
SOFT_TISSUE_HU = (0.0, 400.0)
#: Kidney parenchyma: ~30 HU without contrast, 130-200 in every enhanced phase (docs/phantom.md's table).
UNENHANCED_KIDNEY_HU = 80.0
#: Aorta minus liver (HU): ~200 late arterial (aorta ~300, liver ~80), ~60 portal venous (~170 / ~105), ~25 delayed
#: (~120 / ~93); the boundaries between.
ARTERIAL_AORTA_LIVER_HU = 100.0
DELAYED_AORTA_LIVER_HU = 35.0
#: The aorta finder: the brightest structure narrower than `AORTA_WIDTH_MM` in the median over the kidneys' slices
#: (at least `AORTA_SLAB_MM` of them), within `AORTA_BOX_MM` (x: either side, y: behind, in front) of the body's centre.
AORTA_WIDTH_MM = 30.0
AORTA_SLAB_MM = 60.0
AORTA_BOX_MM = (50.0, 40.0, 50.0)
#: A field of view is flagged when its extent along the body (or in-plane) is more than this fraction above the
#: longest training CT's, or below the shortest's.
FOV_TOLERANCE = 0.2


class PhaseEstimate(NamedTuple):
    """What `estimate_phase` returns."""
    #: unenhanced | arterial | portal | delayed | enhanced (contrast, phase not determined) | unknown.
    phase: str
    #: The median CT values (HU) it was estimated from: kidney, liver, aorta (those found).
    hu: dict[str, float]
    #: Why "unknown" or "enhanced" (which organ was not found); "" otherwise.
    reason: str = ""


class TrainingDomain(NamedTuple):
    """What `training_domain` returns: what the run's models were trained on."""
    #: Each training dataset's contrast phases (`phantom.PHASES` names; "randomised" for SynthSeg-style intensities,
    #: "mri_like" for MRI-like cases).
    phases: dict[str, set[str]]
    #: The training CTs' extent along the body (S-I), least and most, mm.
    z_mm: tuple[float, float]
    #: Their largest in-plane extent (max of R-L and A-P), least and most, mm.
    inplane_mm: tuple[float, float]
    #: Where this was read: the data root's phantom.json, or the profile and the catalogue.
    source: str


def _aorta_hu(hu: np.ndarray, spacing: tuple[float, ...]) -> float | None:
    """The aorta's median CT value in a slab of axial slices (canonical RAS, x y z), or None.

    In the median over the slab's slices (smoothed over 6 mm in-plane), the candidate columns lie in the body, within
    `AORTA_BOX_MM` of its centre (where the aorta runs in front of the spine), are not bone (90th percentile over the
    slices < 450 HU) and steady along the body (90th - 10th percentile < 100 HU: the vertebrae alternate with discs);
    of those, the one most above its surroundings after a grey opening with a disc `AORTA_WIDTH_MM` wide (a white
    top-hat: structures narrower than the disc, which removes the vertebral bodies and the liver). Unenhanced, it
    finds some soft-tissue column (not needed then); on blurred images it can take the spine instead."""
    sx, sy, _ = spacing
    body = hu > -300
    labels, count = ndimage.label(body)
    if count == 0:
        return None
    body = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    cx, cy, _ = ndimage.center_of_mass(body)
    smooth = ndimage.uniform_filter(hu.astype(np.float32), size=(max(1, round(6.0 / sx)), max(1, round(6.0 / sy)), 1),
                                    mode="nearest")
    p10, mid, p90 = np.percentile(smooth, [10, 50, 90], axis=2)
    rx, ry = max(1, round(AORTA_WIDTH_MM / 2 / sx)), max(1, round(AORTA_WIDTH_MM / 2 / sy))
    gx, gy = np.mgrid[-rx:rx + 1, -ry:ry + 1]
    tophat = mid - ndimage.grey_opening(mid, footprint=(gx / rx) ** 2 + (gy / ry) ** 2 <= 1.0, mode="nearest")
    x = (np.arange(hu.shape[0]) - cx) * sx
    y = (np.arange(hu.shape[1]) - cy) * sy
    side, back, front = AORTA_BOX_MM
    candidate = ((np.abs(x)[:, None] <= side) & (y[None, :] >= -back) & (y[None, :] <= front) & body.all(axis=2)
                 & (p90 < 450.0) & (p90 - p10 < 100.0))
    if not candidate.any():
        return None
    i, j = np.unravel_index(int(np.argmax(np.where(candidate, tophat, -np.inf))), tophat.shape)
    return float(mid[i, j])


def estimate_phase(hu: np.ndarray, fused: np.ndarray, spacing: tuple[float, ...]) -> PhaseEstimate:
    """The contrast phase of a CT from its values inside the predicted organs (canonical RAS arrays: HU and the
    fused label map of `CHANNELS`; voxel size in mm). Tumour channels are left out. The rule (docs/phantom.md's
    "Contrast phases" gives the values it rests on):

    1. The kidney (at least `PHASE_MIN_ML` predicted, its median soft tissue: `SOFT_TISSUE_HU`) is needed: without
       it the phase is "unknown". Its median below `UNENHANCED_KIDNEY_HU` (80 HU) is "unenhanced": parenchyma is
       ~30 HU without contrast and 130-200 HU in every enhanced phase (the liver, ~55 HU, is then the brighter).
    2. Enhanced: the aorta's value (`_aorta_hu`, on the kidneys' slices, at least `AORTA_SLAB_MM`) minus the liver's
       median: >= `ARTERIAL_AORTA_LIVER_HU` (100) late arterial, >= `DELAYED_AORTA_LIVER_HU` (35) portal venous, below
       it delayed. Without a liver (or aorta) found: "enhanced", the phase not determined.

    On the phantoms' reference organs at coarse voxels, rule 1 was right in every case and scanner tried, rule 2 in
    most (docs/predict.md gives the counts): bolus timing varies within a phase and the aorta finder
    can take the spine. It is an estimate for a remark, not a measurement."""
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    kidney = fused == CHANNEL_INDEX["kidney"]
    liver = fused == CHANNEL_INDEX["liver"]
    values: dict[str, float] = {}
    if kidney.sum() * voxel_ml < PHASE_MIN_ML["kidney"]:
        return PhaseEstimate("unknown", values, "no kidney predicted")
    values["kidney"] = float(np.median(hu[kidney]))
    if not SOFT_TISSUE_HU[0] <= values["kidney"] <= SOFT_TISSUE_HU[1]:
        return PhaseEstimate("unknown", values, f"the predicted kidney is not soft tissue: median "
                                                f"{values['kidney']:.0f} HU")
    if liver.sum() * voxel_ml >= PHASE_MIN_ML["liver"]:
        median = float(np.median(hu[liver]))
        if SOFT_TISSUE_HU[0] <= median <= SOFT_TISSUE_HU[1]:
            values["liver"] = median
    if values["kidney"] < UNENHANCED_KIDNEY_HU:
        return PhaseEstimate("unenhanced", values)
    slices = np.flatnonzero(kidney.any(axis=(0, 1)))
    centre, half = (slices[0] + slices[-1]) / 2.0, max(slices[-1] - slices[0] + 1, AORTA_SLAB_MM / spacing[2]) / 2.0
    lo, hi = max(0, int(np.floor(centre - half))), min(hu.shape[2], int(np.ceil(centre + half)) + 1)
    aorta = _aorta_hu(hu[:, :, lo:hi], spacing) if (hi - lo) * spacing[2] >= 0.6 * AORTA_SLAB_MM else None
    if aorta is not None:
        values["aorta"] = aorta
    if "liver" not in values or aorta is None:
        return PhaseEstimate("enhanced", values, "no liver predicted" if "liver" not in values else "no aorta found")
    gap = aorta - values["liver"]
    phase = ("arterial" if gap >= ARTERIAL_AORTA_LIVER_HU else "portal" if gap >= DELAYED_AORTA_LIVER_HU
             else "delayed")
    return PhaseEstimate(phase, values)


def field_of_view(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """The extent (mm) of a canonical RAS volume: R-L, A-P, S-I (voxels x voxel size)."""
    return tuple(round(float(n) * float(s), 1) for n, s in zip(shape[:3], spacing[:3], strict=True))


def _published_phases(phases: str, domain: str) -> dict[str, set[str]]:
    """Each training dataset's phases by the profile's `data.phantom` settings (or the datasets' published ones)."""
    if domain == "randomised":
        return {d: {"randomised"} for d in TRAIN_DATASETS}
    if phases in phantom.PHASES:
        return {d: {phases} for d in TRAIN_DATASETS}
    if phases == "all":
        return {d: set(phantom.PHASES) for d in TRAIN_DATASETS}
    return {d: set(BY_NAME[d].phantom.scanner["phases"]) for d in TRAIN_DATASETS}


def training_domain(run_dir: str | Path, cfg: dict[str, Any]) -> TrainingDomain:
    """What the run's models were trained on: each training dataset's contrast phases and the training CTs'
    extents. Read from the run's data root (`cfg["data_root"]`, else run.json's) when it holds the phantom's
    phantom.json (each case's acquisition, shape and voxel size; the training datasets' cases, all splits); else
    from the profile (`data.phantom.phases` and `domain` for synthetic data) and the catalogue: the datasets'
    published phases (`catalogue.Phantom.scanner["phases"]`) and typical extents (`z_extent`, `fov`)."""
    root = cfg.get("data_root")
    record_path = run_folder.run_record(run_dir)
    if not root and record_path.exists():
        root = json.loads(record_path.read_text()).get("data_root")
    record = None
    if root and (Path(root) / phantom.PHANTOM_FILE).is_file():
        try:
            record = json.loads((Path(root) / phantom.PHANTOM_FILE).read_text())
        except ValueError:
            record = None
    cases = [c for c in (record or {}).get("cases", []) if c.get("dataset") in TRAIN_DATASETS and c.get("shape")]
    if cases:
        phases: dict[str, set[str]] = {}
        z, inplane = [], []
        for case in cases:
            published = BY_NAME[case["dataset"]].phantom.scanner["phases"]
            phase = (case.get("acquisition") or {}).get("phase")
            phases.setdefault(case["dataset"], set()).update([phase] if phase else published)
            extent = [n * s for n, s in zip(case["shape"], case["spacing"], strict=True)]
            axcodes = case.get("axcodes", "RAS")
            along = next(i for i, c in enumerate(axcodes) if c in "SI")
            z.append(extent[along])
            inplane.append(max(e for i, e in enumerate(extent) if i != along))
        return TrainingDomain(phases, (min(z), max(z)), (min(inplane), max(inplane)),
                              f"{Path(root) / phantom.PHANTOM_FILE} ({len(cases)} training-dataset cases)")
    data = cfg.get("data", {})
    settings = data.get("phantom", {}) if data.get("source") == "synthetic" else {}
    scanners = [BY_NAME[d].phantom.scanner for d in TRAIN_DATASETS]
    return TrainingDomain(_published_phases(settings.get("phases", "published"), settings.get("domain", "ct")),
                          (min(s["z_extent"][0] for s in scanners), max(s["z_extent"][1] for s in scanners)),
                          (min(s["fov"][0] for s in scanners), max(s["fov"][1] for s in scanners)),
                          "the profile and the datasets' catalogue (published phases, typical extents)")


def _trained_on(domain: TrainingDomain) -> str:
    """E.g. "portal venous (liver, pancreas, spleen) and late arterial (kits19) CT"."""
    by_phase: dict[str, list[str]] = {}
    for dataset in sorted(domain.phases):
        for phase in sorted(domain.phases[dataset]):
            by_phase.setdefault(phase, []).append(dataset)
    names = {**PHASE_NAMES, "randomised": "domain-randomised", "mri_like": "MRI-like"}
    parts = [f"{names.get(p, p)} ({', '.join(d)})" for p, d in sorted(by_phase.items(), key=lambda i: -len(i[1]))]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + " CT"


def remark(estimate: PhaseEstimate, fov_mm: tuple[float, float, float], domain: TrainingDomain) -> str:
    """The sentence(s) written beside the volumes when the input is unlike the training data: its estimated phase
    is none of the training phases (a "randomised" training covers every phase; "enhanced" is flagged only when no
    training phase had contrast; "unknown" is said as such), or its extent along the body or in-plane lies
    `FOV_TOLERANCE` beyond the training CTs' range. "" when neither."""
    said = []
    trained = set().union(*domain.phases.values()) if domain.phases else set()
    values = ", ".join(f"{k} {v:.0f} HU" for k, v in estimate.hu.items())
    if estimate.phase == "unknown":
        said.append(f"Phase not estimated ({estimate.reason}).")
    elif "randomised" not in trained and (
            (estimate.phase == "enhanced" and not trained & (set(phantom.PHASES) - {"unenhanced"}))
            or (estimate.phase != "enhanced" and estimate.phase not in trained)):
        said.append(f"Phase: {PHASE_NAMES[estimate.phase]} (estimated: {values}), the models were trained on "
                    f"{_trained_on(domain)}.")
    along, inplane = fov_mm[2], max(fov_mm[:2])
    (zlo, zhi), (ilo, ihi) = domain.z_mm, domain.inplane_mm
    if along > zhi * (1 + FOV_TOLERANCE) or along < zlo * (1 - FOV_TOLERANCE):
        said.append(f"Field of view {along:.0f} mm along the body, the training CTs {zlo:.0f}-{zhi:.0f} mm"
                    + (": it reaches beyond the abdomen (chest or pelvis), where organs may be painted."
                       if along > zhi else ": part of the abdomen only."))
    if inplane > ihi * (1 + FOV_TOLERANCE) or inplane < ilo * (1 - FOV_TOLERANCE):
        said.append(f"In-plane field of view {inplane:.0f} mm, the training CTs {ilo:.0f}-{ihi:.0f} mm.")
    if said and any(not s.startswith("Phase not") for s in said):
        said.append("Volumes may be wrong.")
    return " ".join(said)


def check_input(image_path: str | Path, label_path: str | Path, domain: TrainingDomain) -> dict[str, str]:
    """`CHECK_COLUMNS` for one input and its written label map (on the same grid)."""
    image = nib.as_closest_canonical(nib.load(str(image_path)))
    fused = np.asarray(nib.as_closest_canonical(nib.load(str(label_path))).dataobj, dtype=np.uint8)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    estimate = estimate_phase(np.asarray(image.dataobj, dtype=np.float32), fused, spacing)
    fov = field_of_view(image.shape, spacing)
    return {"phase_estimate": estimate.phase,
            "phase_hu": " ".join(f"{k}={v:.0f}" for k, v in estimate.hu.items()),
            "fov_mm": "x".join(f"{e:.0f}" for e in fov),
            "remark": remark(estimate, fov, domain)}


class Prediction(NamedTuple):
    """What `predict` returns."""
    #: The folder holding the label maps, overlays and volumes.csv.
    out: Path
    #: volumes.csv as written: index `case`, columns `VOLUME_COLUMNS`.
    volumes: pd.DataFrame


def resolve_model(name: str, run_dir: str | Path) -> str:
    """The command-line name (`MODELS`) of `name`, which may also be 04's folder name for the method
    (`external.slug`, e.g. fl-local-model-ensemble) or its table name; an error listing the run's models."""
    aliases = {**{external.slug(m): n for n, m in MODELS.items()}, **{m.lower(): n for n, m in MODELS.items()}}
    key = name.strip().lower()
    if key in MODELS:
        return key
    if key in aliases:
        return aliases[key]
    has = available_models(run_dir)
    raise ValueError(f"Unknown model {name!r}: {run_dir} has "
                     + (", ".join(has) if has
                        else f"no trained models (nothing under {run_folder.checkpoints_dir(run_dir)})")
                     + f". The study's models are {', '.join(MODELS)}.")


def available_models(run_dir: str | Path) -> list[str]:
    """The `MODELS` names whose checkpoints the run holds (all four clients' for an ensemble)."""
    methods = set(external.group_methods(external.run_checkpoints(run_dir)))
    return [name for name, method in MODELS.items() if method in methods]


def run_config(run_dir: str | Path, profile: str | Path | None = None) -> dict[str, Any]:
    """The settings the run was trained with: `profile` when given (a name or YAML path), else the run's own
    record (`run.json`'s profile_config, written by `python -m fedseg run`), else its `profile.yaml`."""
    run_dir = Path(run_dir)
    record = run_folder.run_record(run_dir)
    run = json.loads(record.read_text()) if record.exists() else {}
    if profile is not None:
        config = load_profile(profile)
    elif run.get("profile_config"):
        config = run["profile_config"]
    elif (run_dir / PROFILE_FILE).exists():
        config = load_profile(run_dir / PROFILE_FILE)
    else:
        config = None
    if config is not None:
        return {**config, **_data_root(config, run, run_dir)}
    raise FileNotFoundError(f"{run_dir} has no run.json with the profile it was trained with (nor a {PROFILE_FILE}): "
                            "pass it, e.g. --profile laptop (a run made in JupyterLab, results/lab-<profile>).")


def _data_root(config: dict[str, Any], run: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """The data root the run trained on, which its checkpoints name (`training.data_identity`): the configuration's
    own, else run.json's (their placeholders made local, `config.local_path`), else for synthetic data the
    profile's folder (`config.synthetic_data_root`); {} when none of them is on this machine."""
    for recorded in (config.get("data_root"), run.get("data_root")):
        if recorded and Path(local_path(str(recorded), run_dir)).is_dir():
            return {"data_root": local_path(str(recorded), run_dir)}
    if (config.get("data") or {}).get("source") == "synthetic":
        folder = synthetic_data_root(config, int(run.get("seed", config.get("seed", 0)) or 0))
        if folder.is_dir():
            return {"data_root": str(folder)}
    return {}


def nifti_images(folder: str | Path) -> dict[str, Path]:
    """The NIfTI images of a folder (*.nii.gz, *.nii; hidden files skipped), case name -> path, sorted by
    name; each must be a 3D volume. Errors name the folder or the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist (or is not a folder).")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        for suffix in (".nii.gz", ".nii"):
            if path.name.endswith(suffix):
                case = path.name[: -len(suffix)]
                if case in images:
                    raise ValueError(f"{images[case].name} and {path.name} in {folder} are the same case {case!r}: "
                                     "keep one.")
                images[case] = path
                break
    if not images:
        raise FileNotFoundError(f"No NIfTI images (*.nii.gz, *.nii) in {folder}.")
    for path in images.values():
        shape = nib.load(str(path)).shape
        if len(shape) != 3:
            raise ValueError(f"{path} has shape {shape}: predict takes 3D CT volumes (one channel, one time point). "
                             "Save each volume as its own 3D NIfTI.")
    return images


def label_volumes(label_path: str | Path) -> dict[str, float]:
    """The volume of each foreground label of a written label map, in mL: voxel count x voxel volume (the
    NIfTI header's zooms), beside that voxel volume in mm³."""
    written = nib.load(str(label_path))
    voxel_mm3 = float(np.prod(written.header.get_zooms()[:3]))
    counts = np.bincount(np.asarray(written.dataobj, dtype=np.uint8).ravel(), minlength=NUM_CHANNELS)
    return {"voxel_mm3": voxel_mm3,
            **{f"{name}_ml": round(int(counts[CHANNEL_INDEX[name]]) * voxel_mm3 / 1000.0, 3) for name in FOREGROUND}}


def overlay_figure(image_path: str | Path, label_path: str | Path, title: str = "",
                   volumes: dict[str, float] | None = None, note: str = "", warn: bool = False):
    """An axial and a coronal slice (radiological view: the patient's right on the left) through the most
    predicted voxels, the label map over the CT in the paper's colours, with a legend (and each label's mL
    from `volumes`, `label_volumes`) and `note` in a line under the title (red when `warn`: the input's
    `remark`). A matplotlib Figure on the Agg canvas, outside pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch


    hu, _ = canonical(image_path)
    fused, (sx, sy, sz) = canonical(label_path)
    multihot = np.stack([np.asarray(fused) == c for c in range(len(CHANNELS))])
    drawn = tuple(c for c in COLOURS if multihot[CHANNEL_INDEX[c]].any())
    z = best_axial_slice(multihot, drawn) if drawn else hu.shape[2] // 2
    y = best_axial_slice(multihot.transpose(0, 1, 3, 2), drawn) if drawn else hu.shape[1] // 2
    fig = Figure(figsize=(10, 5.2))
    FigureCanvasAgg(fig)
    axial, coronal = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    overlay(axial, ct_display(hu[:, :, z]), multihot[:, :, :, z], drawn)
    axial.set_aspect(sy / sx)  # rows are y, columns x
    axial.set_title(f"axial (RAS slice {z} of {hu.shape[2]})", fontsize=9)
    overlay(coronal, ct_display(hu[:, y, :]), multihot[:, :, y, :], drawn)
    coronal.set_aspect(sz / sx)  # rows are z (superior up), columns x
    coronal.set_title(f"coronal (RAS slice {y} of {hu.shape[1]})", fontsize=9)
    fig.suptitle(title + ("" if drawn else " (no organ predicted)"), fontsize=10)
    if note:
        fig.text(0.5, 0.925, textwrap.fill(note, 130), ha="center", va="top", fontsize=8,
                 color="firebrick" if warn else "dimgray")
    volumes = volumes or {}
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")
                    + (f" {volumes[f'{c}_ml']:.1f} mL" if f"{c}_ml" in volumes else "")) for c in drawn]
    if legend:
        fig.legend(handles=legend, loc="lower center", ncol=min(4, len(legend)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if legend else 0, 1, 0.95 - (0.03 * (1 + len(note) // 130) if note else 0)))
    return fig


def predict(run_dir: str | Path, images: str | Path, model: str = DEFAULT_MODEL, out: str | Path | None = None,
            device: str | None = None, *, profile: str | Path | None = None, cfg: dict[str, Any] | None = None,
            progress: bool = True) -> Prediction:
    """Segment every NIfTI of `images` with `model` of the run in `run_dir`, as 04 segments BTCV.

    `model` is one of `MODELS` (or 04's name for it); `out` defaults to `<run_dir>/predictions/own/<model>/`.
    The settings are the run's (`run_config`; `profile` or `cfg` replace them). Refuses a federation that did
    not finish (`run_folder.require_finished_federation`), a model whose checkpoints the run lacks (naming them and
    the notebook that makes them), and an image folder without 3D NIfTI images. Returns the output folder and the
    volumes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run folder {run_dir} does not exist: pass a run's folder, e.g. results/<run-name>.")
    name = resolve_model(model, run_dir)
    method = MODELS[name]
    group = external.METHOD_GROUP[method]
    paths = external.group_checkpoints(run_dir)[group]
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        has = available_models(run_dir)
        raise FileNotFoundError(f"Model {name} needs {', '.join(missing)}, which {run_dir} lacks: run "
                                f"{GROUP_NOTEBOOK[group]} into this run folder first (python -m fedseg run --only "
                                f"{GROUP_NOTEBOOK[group][:2]} --run-name {run_dir.name}). "
                                + (f"Models this run has: {', '.join(has)}." if has
                                   else "This run has no trained models."))
    run_folder.require_finished_federation(run_dir)  # as 04: never use the bests of a federation that failed half-way
    cases = nifti_images(images)
    out = Path(out) if out is not None else run_folder.predictions_dir(run_dir, "own", name)
    if out.resolve() == Path(images).resolve():
        raise ValueError(f"--out {out} is the image folder: the label maps would be read as images next time.")
    cfg = cfg if cfg is not None else run_config(run_dir, profile)
    device = select_device(device)
    models = external.load_group(cfg, paths, device)
    transform = inference.inference_transform(cfg)
    domain = training_domain(run_dir, cfg)
    rows = []
    for case, image_path in tqdm(list(cases.items()), desc=f"{name} on {Path(images).name}", disable=not progress):
        image = transform({"image": str(image_path)})["image"]
        logits = external.group_logits(group, models, image, cfg, device)
        label_map = inference.fuse(external.method_mask(method, logits, image, cfg))
        written = inference.write_prediction(label_map, image_path, out / f"{case}.nii.gz")
        volumes = label_volumes(written)
        check = check_input(image_path, written, domain)
        fig = overlay_figure(image_path, written, f"{case}: {name} ({run_dir.name})", volumes,
                             check["remark"] or _in_domain(check), warn=bool(check["remark"]))
        fig.savefig(out / f"{case}.png", dpi=110)
        rows.append({"case": case, **volumes, **check})
    table = pd.DataFrame(rows, columns=["case", *VOLUME_COLUMNS, *CHECK_COLUMNS]).set_index("case")
    table.to_csv(out / "volumes.csv")
    return Prediction(out, table)


def _in_domain(check: dict[str, str]) -> str:
    """The PNG's line for an input without a remark."""
    phase = check["phase_estimate"]
    return (f"phase: {PHASE_NAMES.get(phase, phase)} (estimated), field of view {check['fov_mm']} mm: "
            "like the training CTs")


def volume_table(volumes: pd.DataFrame) -> str:
    """The volumes as printed: mL per label, one decimal; then each case's remark (`remark`), if any."""
    shown = volumes[[f"{name}_ml" for name in FOREGROUND]]
    table = shown.rename(columns=lambda c: c.removesuffix("_ml")).to_markdown(floatfmt=".1f")
    remarks = volumes["remark"].fillna("") if "remark" in volumes else pd.Series(dtype=str)
    flagged = [f"- {case}: {text}" for case, text in remarks.items() if text]
    return table + ("\nUnlike the training data:\n" + "\n".join(flagged) if flagged else "")
