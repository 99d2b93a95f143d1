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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import PROFILE_FILE, load_profile
from fedseg.data.labels import (
    CHANNEL_INDEX,
    CHANNELS,
    COLOURS,
    FOREGROUND,
    NUM_CHANNELS,
)
from fedseg.evaluate import external
from fedseg.federated.task import require_finished
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
#: The CT window of the overlays (W400 L40, as Fig. 3).
WINDOW_HU = (-160.0, 240.0)
#: `volumes.csv`'s columns after `case`: the voxel volume, then one per foreground label.
VOLUME_COLUMNS = ("voxel_mm3", *(f"{name}_ml" for name in FOREGROUND))


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
    methods = set(external._methods(external.run_checkpoints(run_dir)))
    return [name for name, method in MODELS.items() if method in methods]


def run_config(run_dir: str | Path, profile: str | Path | None = None) -> dict[str, Any]:
    """The settings the run was trained with: `profile` when given (a name or YAML path), else the run's own
    record (`run.json`'s profile_config, written by `python -m fedseg run`), else its `profile.yaml`."""
    if profile is not None:
        return load_profile(profile)
    run_dir = Path(run_dir)
    record = run_folder.run_record(run_dir)
    if record.exists():
        config = json.loads(record.read_text()).get("profile_config")
        if config:
            return config
    if (run_dir / PROFILE_FILE).exists():
        return load_profile(run_dir / PROFILE_FILE)
    raise FileNotFoundError(f"{run_dir} has no run.json with the profile it was trained with (nor a {PROFILE_FILE}): "
                            "pass it, e.g. --profile laptop (a run made in JupyterLab, results/lab-<profile>).")


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


def _display(plane: np.ndarray) -> np.ndarray:
    return np.clip((plane - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0]), 0, 1)


def overlay_figure(image_path: str | Path, label_path: str | Path, title: str = "",
                   volumes: dict[str, float] | None = None):
    """An axial and a coronal slice (radiological view: the patient's right on the left) through the most
    predicted voxels, the label map over the CT in the paper's colours, with a legend (and each label's mL
    from `volumes`, `label_volumes`). A matplotlib Figure on the Agg canvas, outside pyplot."""
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
    overlay(axial, _display(np.asarray(hu[:, :, z], dtype=np.float32)), multihot[:, :, :, z], drawn)
    axial.set_aspect(sy / sx)  # rows are y, columns x
    axial.set_title(f"axial (RAS slice {z} of {hu.shape[2]})", fontsize=9)
    overlay(coronal, _display(np.asarray(hu[:, y, :], dtype=np.float32)), multihot[:, :, y, :], drawn)
    coronal.set_aspect(sz / sx)  # rows are z (superior up), columns x
    coronal.set_title(f"coronal (RAS slice {y} of {hu.shape[1]})", fontsize=9)
    fig.suptitle(title + ("" if drawn else " (no organ predicted)"), fontsize=10)
    volumes = volumes or {}
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")
                    + (f" {volumes[f'{c}_ml']:.1f} mL" if f"{c}_ml" in volumes else "")) for c in drawn]
    if legend:
        fig.legend(handles=legend, loc="lower center", ncol=min(4, len(legend)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if legend else 0, 1, 0.95))
    return fig


def predict(run_dir: str | Path, images: str | Path, model: str = DEFAULT_MODEL, out: str | Path | None = None,
            device: str | None = None, *, profile: str | Path | None = None, cfg: dict[str, Any] | None = None,
            progress: bool = True) -> Prediction:
    """Segment every NIfTI of `images` with `model` of the run in `run_dir`, as 04 segments BTCV.

    `model` is one of `MODELS` (or 04's name for it); `out` defaults to `<run_dir>/predictions/own/<model>/`.
    The settings are the run's (`run_config`; `profile` or `cfg` replace them). Refuses a federation that did
    not finish (`task.require_finished`), a model whose checkpoints the run lacks (naming them and the notebook
    that makes them), and an image folder without 3D NIfTI images. Returns the output folder and the volumes.
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
    require_finished(run_dir)  # as 04: never use the bests of a federation that failed half-way
    cases = nifti_images(images)
    out = Path(out) if out is not None else run_folder.predictions_dir(run_dir, "own", name)
    if out.resolve() == Path(images).resolve():
        raise ValueError(f"--out {out} is the image folder: the label maps would be read as images next time.")
    cfg = cfg if cfg is not None else run_config(run_dir, profile)
    device = select_device(device)
    models = external.load_group(cfg, paths, device)
    transform = inference.inference_transform(cfg)
    rows = []
    for case, image_path in tqdm(list(cases.items()), desc=f"{name} on {Path(images).name}", disable=not progress):
        image = transform({"image": str(image_path)})["image"]
        logits = external.group_logits(group, models, image, cfg, device)
        label_map = inference.fuse(external.method_mask(method, logits, image, cfg))
        written = inference.write_prediction(label_map, image_path, out / f"{case}.nii.gz")
        volumes = label_volumes(written)
        fig = overlay_figure(image_path, written, f"{case}: {name} ({run_dir.name})", volumes)
        fig.savefig(out / f"{case}.png", dpi=110)
        rows.append({"case": case, **volumes})
    table = pd.DataFrame(rows, columns=["case", *VOLUME_COLUMNS]).set_index("case")
    table.to_csv(out / "volumes.csv")
    return Prediction(out, table)


def volume_table(volumes: pd.DataFrame) -> str:
    """The volumes as printed: mL per label, one decimal."""
    shown = volumes[[f"{name}_ml" for name in FOREGROUND]]
    return shown.rename(columns=lambda c: c.removesuffix("_ml")).to_markdown(floatfmt=".1f")
