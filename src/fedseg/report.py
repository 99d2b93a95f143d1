"""Tables and figures of the study: Table 1, the dataset fingerprint, Fig. 1, and how they are saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from fedseg.datasets import case_files
from fedseg.labels import CHANNEL_INDEX, COLOURS, DATASETS, owned_channels
from fedseg.manifest import SPLITS, TABLE1, split_counts

#: Row labels of the paper's Table 1.
PAPER_NAMES = {"liver": "MSD liver", "pancreas": "MSD pancreas", "kits19": "KiTS19", "spleen": "MSD spleen",
               "btcv": "BTCV (external)"}


def save_table(table: pd.DataFrame, run_dir: str | Path, name: str, note: str = "") -> Path:
    """Write a table as CSV and Markdown under `run_dir/tables/`; the note goes under the Markdown table."""
    folder = Path(run_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / f"{name}.csv")
    (folder / f"{name}.md").write_text(table.to_markdown() + (f"\n\n{note}\n" if note else "\n"))
    return folder / f"{name}.csv"


def save_figure(fig: plt.Figure, run_dir: str | Path, name: str) -> Path:
    """Save a figure as PNG under `run_dir/figures/`."""
    folder = Path(run_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def table1(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cases per dataset and split in this run, with the paper's Table 1 beside (train/val/test)."""
    run = split_counts(manifest)
    rows = []
    for dataset in run.index:
        paper = TABLE1[dataset]
        row = {"dataset": PAPER_NAMES[dataset]}
        for split, count in zip(SPLITS, paper):
            row[f"{split} (this run)"] = int(run.loc[dataset, split])
            row[f"{split} (paper)"] = count
        row["total (this run)"], row["total (paper)"] = int(run.loc[dataset, "total"]), sum(paper)
        rows.append(row)
    return pd.DataFrame(rows).set_index("dataset")


def fingerprint(data_root: str | Path, manifest: pd.DataFrame, max_cases: int | None = None) -> pd.DataFrame:
    """Per dataset: cases, median shape and voxel size (as stored), orientations, HU range, label values.

    Like nnU-Net's and SegViz's dataset fingerprints: what differs between the clients before any
    preprocessing. Intensity range is the 0.5-99.5 percentile band over the sampled cases.
    """
    rows = []
    for dataset, cases in manifest.groupby("dataset", sort=False):
        cases = cases if max_cases is None else cases.head(max_cases)
        shapes, spacings, orientations, low, high, values = [], [], set(), [], [], set()
        for _, row in cases.iterrows():
            image_path, label_path = case_files(data_root, row)
            image = nib.load(str(image_path))
            data = np.asanyarray(image.dataobj)
            shapes.append(image.shape)
            spacings.append(image.header.get_zooms()[:3])
            orientations.add("".join(nib.aff2axcodes(image.affine)))
            lo, hi = np.percentile(data[::2, ::2, ::2], [0.5, 99.5])
            low.append(lo)
            high.append(hi)
            values |= set(np.unique(np.asanyarray(nib.load(str(label_path)).dataobj)).astype(int).tolist())
        rows.append({
            "dataset": PAPER_NAMES[dataset], "cases": len(cases),
            "median shape": "×".join(str(int(v)) for v in np.median(shapes, axis=0)),
            "median spacing (mm)": "×".join(f"{v:.2f}" for v in np.median(spacings, axis=0)),
            "orientation": ", ".join(sorted(orientations)),
            "intensity p0.5–p99.5": f"{np.median(low):.0f} to {np.median(high):.0f}",
            "label values": ", ".join(str(v) for v in sorted(values)),
            "channels annotated": ", ".join(owned_channels(dataset)),
        })
    return pd.DataFrame(rows).set_index("dataset")


def radiological(axial: np.ndarray) -> np.ndarray:
    """An axial RAS slice (x, y) as displayed in radiology: anterior up, patient's right on the left."""
    return np.flipud(np.fliplr(axial.T))


def overlay(ax: plt.Axes, image: np.ndarray, target: np.ndarray, channels: tuple[str, ...],
            alpha: float = 0.55) -> None:
    """Draw an axial slice (x, y arrays in RAS) in radiological view with label channels in the paper's colours.

    Organs first, tumours last, so a tumour shows on top of its organ.
    """
    ax.imshow(radiological(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for name in sorted(channels, key=lambda c: c.endswith("tumor")):
        mask = radiological(target[CHANNEL_INDEX[name]] > 0)
        if mask.any():
            ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([COLOURS[name]]), alpha=alpha,
                      vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def best_axial_slice(target: np.ndarray, channels: tuple[str, ...]) -> int:
    """The axial (z) index with the most labelled voxels of `channels`, tumours counted extra."""
    score = np.zeros(target.shape[-1])
    for name in channels:
        weight = 4.0 if name.endswith("tumor") else 1.0
        score += weight * target[CHANNEL_INDEX[name]].sum(axis=(0, 1))
    return int(np.argmax(score))


def figure1(volumes: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> plt.Figure:
    """Fig. 1: one axial slice per dataset, labels in the paper's colours (kidney pink, liver red, ...).

    `volumes` maps dataset -> (image (x,y,z) in [0,1], multi-hot target (8,x,y,z), case id), both RAS.
    """
    names = [d for d in DATASETS if d in volumes]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.8))
    axes = np.atleast_1d(axes)
    for ax, dataset in zip(axes, names):
        image, target, case_id = volumes[dataset]
        channels = owned_channels(dataset)
        z = best_axial_slice(target, channels)
        overlay(ax, image[..., z], target[..., z], channels)
        ax.set_title(f"{PAPER_NAMES[dataset]}\n{case_id}, slice {z}", fontsize=9)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.text(0.01, 0.01, "radiological view: patient's right on the image's left", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig



def first_training_volumes(cfg: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, tuple]:
    """For Fig. 1: each dataset's first case, preprocessed (read from the cache), as numpy arrays."""
    from fedseg.transforms import IMAGE, LABEL, evaluation_dataset

    firsts: dict[str, dict[str, Any]] = {}
    for record in records:
        firsts.setdefault(record["dataset"], record)
    dataset = evaluation_dataset(cfg, list(firsts.values()))
    volumes = {}
    for index, record in enumerate(firsts.values()):
        case = dataset[index]
        volumes[record["dataset"]] = (np.asarray(case[IMAGE][0]), np.asarray(case[LABEL]), record["case_id"])
    return volumes


#: Seed 000, Table 2 (Dice %, test splits): per channel, and the paper's own "Avg." column, which does not
#: follow from its channels under any obvious definition (STUDY.md); kept as printed.
TABLE2_CHANNELS = ("liver", "liver_tumor", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor", "spleen")
PAPER_TABLE2 = {
    "SL": (67.4, 13.3, 64.2, 19.6, 93.1, 30.2, 48.7, 63.5),
    "FL global model (server)": (0.0, 0.0, 66.9, 30.4, 90.6, 39.3, 0.0, 44.6),
    "FL local model (client)": (84.4, 33.8, 74.3, 38.4, 94.9, 63.7, 72.9, 86.7),
}
AVERAGE_NOTE = ("Avg. (this run) = unweighted mean of the 7 channel columns. The paper's Avg. (63.5, 44.6, 86.7) "
                "is printed as published; it is not the mean of its channels (48.1, 32.5, 66.1).")


def table2(rows: dict[str, pd.Series]) -> pd.DataFrame:
    """Table 2 layout: Dice % per channel for each named row (a Series channel -> mean Dice in [0, 1]),
    with the mean over the 7 channels; the paper's rows follow, marked "(paper)"."""
    out = {}
    for name, means in rows.items():
        values = [100 * float(means.get(c, float("nan"))) for c in TABLE2_CHANNELS]
        out[f"{name} (this run)"] = [*values, float(np.nanmean(values))]
    for name, values in PAPER_TABLE2.items():
        out[f"{name} (paper)"] = list(values)
    columns = [c.replace("_", " ") for c in TABLE2_CHANNELS] + ["Avg."]
    return pd.DataFrame.from_dict(out, orient="index", columns=columns).round(1)


def learning_curves(histories: dict[str, pd.DataFrame]) -> plt.Figure:
    """Training loss and validation mean Dice (owned channels) against step, one line per model."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, history in histories.items():
        if len(history):
            left.plot(history["step"], history["loss"], marker="o", ms=3, label=name)
            right.plot(history["step"], history["val_mean_dice"], marker="o", ms=3, label=name)
    left.set(xlabel="step", ylabel="training loss (mean since last validation)", title="loss")
    right.set(xlabel="step", ylabel="validation Dice, mean of owned channels", title="validation", ylim=(0, 1))
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def cross_task_matrix(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean test Dice (%) of every model (rows) on every dataset's channels (columns)."""
    table = summary.pivot_table(index="model", columns=["dataset", "channel"], values="mean", sort=False)
    return (100 * table).round(1)


def fl_curves(rounds: pd.DataFrame) -> plt.Figure:
    """Per round: the global model's validation Dice on each client (federated evaluation) and each
    client's locally trained model on its own validation split; mean over the client's owned channels."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for kind, ax, title in (("evaluate", left, "global model (server), per client"),
                            ("train", right, "local model after local training (client)")):
        part = rounds[rounds["kind"] == kind]
        for dataset, rows in part.groupby("dataset", sort=False):
            ax.plot(rows["round"], rows["mean_dice"], marker="o", ms=3, label=PAPER_NAMES.get(dataset, dataset))
        ax.set(xlabel="round", title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
    overall = rounds[rounds["kind"] == "global"]
    if len(overall):
        left.plot(overall["round"], overall["mean_dice"], color="k", lw=2, label="mean of 7 channels")
    left.set_ylabel("validation Dice (owned channels)")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def own_task_means(summary: pd.DataFrame, model_of: dict[str, str]) -> pd.Series:
    """Per channel, the mean test Dice of the model `model_of[dataset]` on that dataset's own test split."""
    parts = [summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
             for dataset, model in model_of.items()]
    return pd.concat(parts).groupby("channel")["mean"].mean()
