"""The study's figures, drawn with matplotlib from arrays and from the files a run wrote, labels in the paper's
colours, and how they are saved (`save_figure`: PNG under `<run>/figures/`).

- 01: `figure1` (Fig. 1: an axial and a coronal slice per dataset; its volumes read by `first_training_volumes`),
  `anatomy_figure` (the synthetic patients' organ volumes and vertebral levels against published adult anatomy).
- 02 and 03: `learning_curves` (loss and validation Dice of the SL and central models), `fl_curves` (per round:
  the global model on each client, each client's local model), `dilution_figure` (how far each channel's head
  moves in the global model, per round and federation).
- 04 and 05: `metric_bars` (mean per organ or channel and method with bootstrap CIs: BTCV's Dice and NSD, the test
  splits' Dice), `figure3` (Fig. 3: a BTCV case's fused prediction, a slice and 3D surfaces), `figure4` (Fig. 4: a
  test case per task, ground truth and each model's prediction).

The drawing blocks they share: `radiological` and `overlay` (an axial slice in radiological view with the label
channels), `best_axial_slice`, `canonical` (a NIfTI in RAS). The tables are `fedseg.reporting.tables`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from fedseg import run_folder
from fedseg.data import phantom
from fedseg.data.labels import (
    CHANNEL_INDEX,
    CHANNELS,
    COLOURS,
    DATASETS,
    owned_channels,
)
from fedseg.data.transforms import IMAGE, LABEL, evaluation_dataset
from fedseg.published import SHEN_DATASET_NAMES, SHEN_TABLE3_ORGANS


def save_figure(fig: plt.Figure, run_dir: str | Path, name: str) -> Path:
    """Save a figure as PNG under `run_dir/figures/`."""
    run_folder.figures_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = run_folder.figure_file(run_dir, name)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


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


def canonical(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI's array in RAS (nibabel's closest canonical orientation) and its voxel size in mm."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


#: Fig. 1's width per dataset (inches): five datasets make 9 inches, 900 pixels at the notebook's 100 dpi, so a
#: notebook cell shows it near its own size and its 10-point text stays legible (not shrunk to a third).
FIGURE1_COLUMN_INCHES = 1.8
RADIOLOGICAL_NOTE = "radiological view: the patient's right on the image's left, anterior up; coronal: superior up"


def figure1(volumes: dict[str, tuple[np.ndarray, np.ndarray, str]]) -> plt.Figure:
    """Fig. 1: one axial (top) and one coronal (bottom) slice per dataset, labels in the paper's colours
    (kidney pink, liver red, ...), in radiological view (said under the legend).

    `volumes` maps dataset -> (image (x,y,z) in [0,1], multi-hot target (8,x,y,z), case id), both RAS. Each row is
    as tall as its tallest slice, so no blank band is left between the panels and the legend.
    """
    names = [d for d in DATASETS if d in volumes]
    slices = {}
    for dataset in names:
        image, target, _ = volumes[dataset]
        channels = owned_channels(dataset)
        z = best_axial_slice(target, channels)
        y = best_axial_slice(target.transpose(0, 1, 3, 2), channels)  # the coronal slice with the most label
        slices[dataset] = (z, y)
    # height / width of each panel as drawn: axial (y, x), coronal (z, x)
    axial_aspect = max(volumes[d][0].shape[1] / volumes[d][0].shape[0] for d in names)
    coronal_aspect = max(volumes[d][0].shape[2] / volumes[d][0].shape[0] for d in names)
    width = FIGURE1_COLUMN_INCHES * len(names)
    height = FIGURE1_COLUMN_INCHES * (axial_aspect + coronal_aspect) + 1.5  # + titles and the legend
    fig, axes = plt.subplots(2, len(names), figsize=(max(width, 5.0), height), squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": (axial_aspect, coronal_aspect)})
    for column, dataset in enumerate(names):
        image, target, case_id = volumes[dataset]
        channels = owned_channels(dataset)
        z, y = slices[dataset]
        overlay(axes[0, column], image[..., z], target[..., z], channels)
        axes[0, column].set_title(f"{SHEN_DATASET_NAMES[dataset]}\n{case_id}, axial {z}", fontsize=10)
        overlay(axes[1, column], image[:, y, :], target[:, :, y, :], channels)  # rows z (superior up), columns x
        axes[1, column].set_title(f"coronal {y}", fontsize=10)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="outside lower center", ncol=4, fontsize=10, frameon=False,
               title=RADIOLOGICAL_NOTE, title_fontsize=9, handlelength=1.2, columnspacing=1.2)
    return fig


def first_training_volumes(cfg: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, tuple]:
    """For Fig. 1: each dataset's first case, preprocessed (read from the cache), as numpy arrays."""
    firsts: dict[str, dict[str, Any]] = {}
    for record in records:
        firsts.setdefault(record["dataset"], record)
    dataset = evaluation_dataset(cfg, list(firsts.values()))
    volumes = {}
    for index, record in enumerate(firsts.values()):
        case = dataset[index]
        volumes[record["dataset"]] = (np.asarray(case[IMAGE][0]), np.asarray(case[LABEL]), record["case_id"])
    return volumes


def anatomy_figure(patients: pd.DataFrame) -> plt.Figure:
    """The synthetic patients' organ volumes and vertebral levels (`phantom.anatomy_table(...).attrs["patients"]`),
    one histogram per quantity, the published adult range shaded."""
    quantities = [q for q in phantom.PUBLISHED_RANGES if q in patients]
    fig, axes = plt.subplots(2, 4, figsize=(14, 5.4))
    for ax, quantity in zip(axes.flat, quantities):
        low, high = phantom.PUBLISHED_RANGES[quantity]
        if quantity.endswith("(vertebra)"):  # a vertebra's level spans half a vertebra either side of its centre
            low, high = low - 0.5, high + 0.5
        ax.axvspan(low, high, color="tab:green", alpha=0.15, lw=0, label="published")
        ax.hist(patients[quantity], bins=12, color="tab:blue", alpha=0.8, label=f"phantom ({len(patients)})")
        ax.set_title(quantity, fontsize=9)
        if quantity.endswith("(vertebra)"):
            ticks = np.arange(-3, 6)
            ax.set_xticks(ticks, [phantom.vertebra(t) for t in ticks], fontsize=8)
    for ax in axes.flat[len(quantities):]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Synthetic patients against published adult anatomy (green: the published range)", fontsize=10)
    fig.tight_layout()
    return fig


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


def fl_curves(rounds: pd.DataFrame) -> plt.Figure:
    """Per round: the global model's validation Dice on each client (federated evaluation) and each
    client's locally trained model on its own validation split; mean over the client's owned channels.
    A federation validated every k-th round (`federated.val_every`) has points on those rounds only, and the
    figure says which."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    overall = rounds[rounds["kind"] == "global"]
    validated = overall.dropna(subset=["mean_dice"])["round"].tolist()
    if len(validated) < len(overall):
        fig.suptitle(f"validated after {len(validated)} of {len(overall)} rounds (every k-th and the last: "
                     f"{', '.join(str(r) for r in validated[:8])}{' ...' if len(validated) > 8 else ''}); "
                     "the bests are chosen among these", fontsize=9)
    for kind, ax, title in (("evaluate", left, "global model (server), per client"),
                            ("train", right, "local model after local training (client)")):
        part = rounds[rounds["kind"] == kind].dropna(subset=["mean_dice"])
        for dataset, rows in part.groupby("dataset", sort=False):
            ax.plot(rows["round"], rows["mean_dice"], marker="o", ms=3, label=SHEN_DATASET_NAMES.get(dataset, dataset))
        ax.set(xlabel="round", title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
    overall = overall.dropna(subset=["mean_dice"])
    if len(overall):
        left.plot(overall["round"], overall["mean_dice"], color="k", lw=2, label="mean of 7 channels")
    left.set_ylabel("validation Dice (owned channels)")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def dilution_figure(dilution: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Per federation (a column): top, how far each channel's output weights moved in the global model as a
    fraction of their owners' update, per round, with the owners' share of cases dashed (FedAvg's dilution when
    the other clients leave the channel alone); bottom, the cosine between the global and the owners' update
    (below 0: the other clients pull the channel the other way)."""
    fig, axes = plt.subplots(2, len(dilution), figsize=(5.5 * len(dilution) + 1.3, 6.4), squeeze=False, sharex=True)
    for column, (name, table) in enumerate(dilution.items()):
        top, bottom = axes[0, column], axes[1, column]
        for index, (channel, part) in enumerate(table[table["owner_move"] > 0].groupby("channel", sort=False)):
            color = f"C{index}"
            top.plot(part["round"], part["ratio"], marker="o", ms=3, color=color, label=channel.replace("_", " "))
            top.axhline(part["owner_share"].iloc[0], color=color, ls="--", lw=1)
            bottom.plot(part["round"], part["cosine"], marker="o", ms=3, color=color)
        top.set(title=name, ylabel="global move / owners' move", yscale="log")
        bottom.set(xlabel="round", ylabel="cosine(global, owners' update)", ylim=(-1.05, 1.05))
        bottom.axhline(0, color="k", lw=0.8)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="channel\n(dashed: owners'\nshare of cases)",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    return fig


def metric_bars(summary: pd.DataFrame, metric: str = "dice", ylabel: str | None = None,
                groups: tuple[str, ...] = SHEN_TABLE3_ORGANS, title: str = "BTCV") -> plt.Figure:
    """Grouped bars: mean of `metric` per organ or channel (`groups`) and method (bars), error bars = the
    bootstrap CI. `summary` is long: method, organ, metric, mean, ci_low, ci_high (`metrics.summarise`).
    """
    part = summary[summary["metric"] == metric]
    methods = list(dict.fromkeys(part["method"]))
    organs = [o for o in groups if o in set(part["organ"])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(organs) * max(1, len(methods)) / 3), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        rows = part[part["method"] == method].set_index("organ").reindex(organs)
        x = np.arange(len(organs)) + (i - (len(methods) - 1) / 2) * width
        low = (rows["mean"] - rows["ci_low"]).clip(lower=0).fillna(0)
        high = (rows["ci_high"] - rows["mean"]).clip(lower=0).fillna(0)
        ax.bar(x, rows["mean"], width, yerr=[low, high], capsize=3, label=method)
    ax.set_xticks(np.arange(len(organs)), [o.replace("_", " ").capitalize() for o in organs])
    ax.set_ylabel(ylabel or metric)
    if metric in ("dice", "nsd"):
        ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title}: {ylabel or metric}, mean over cases, error bars = bootstrap 95% CI", fontsize=10)
    fig.tight_layout()
    return fig


def figure4(panels: dict[str, dict[str, Any]]) -> plt.Figure:
    """Fig. 4: for each task an axial slice of a test case: ground truth, then each model's prediction.

    `panels[task]` = {"image": (x,y,z) in [0,1], "truth": (8,x,y,z), "predictions": {name: (8,x,y,z)},
    "case_id": str}, all RAS on the same grid. Only the task's own channels are drawn.
    """
    tasks = list(panels)
    names = list(next(iter(panels.values()))["predictions"]) if panels else []
    fig, axes = plt.subplots(len(tasks), 1 + len(names), figsize=(2.6 * (1 + len(names)), 2.7 * len(tasks)),
                             squeeze=False)
    for row, task in zip(axes, tasks):
        panel = panels[task]
        channels = owned_channels(task)
        z = best_axial_slice(panel["truth"], channels)
        overlay(row[0], panel["image"][..., z], panel["truth"][..., z], channels)
        row[0].set_title(f"{SHEN_DATASET_NAMES[task]} {panel['case_id']}\nground truth", fontsize=8)
        for ax, name in zip(row[1:], names):
            overlay(ax, panel["image"][..., z], panel["predictions"][name][..., z], channels)
            ax.set_title(name, fontsize=8)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def figure3(image_path: str | Path, fused_path: str | Path, title: str = "", step: int = 2) -> plt.Figure:
    """Fig. 3: a BTCV axial slice with the fused prediction, and a 3D surface rendering of each structure.

    The surfaces are marching cubes (scikit-image) on the fused label map, every `step` voxels, drawn with
    matplotlib in the paper's colours, in millimetres (the voxel size is taken into account).
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes


    hu, _ = canonical(image_path)
    fused, spacing = canonical(fused_path)
    fused = np.rint(fused).astype(np.int16)
    multihot = np.stack([fused == c for c in range(len(CHANNELS))])
    drawn = tuple(c for c in COLOURS if multihot[CHANNEL_INDEX[c]].any())
    fig = plt.figure(figsize=(10, 4.6))
    ax2d = fig.add_subplot(1, 2, 1)
    z = best_axial_slice(multihot, drawn) if drawn else hu.shape[2] // 2
    overlay(ax2d, np.clip((hu[..., z] + 160) / 400, 0, 1), multihot[..., z], drawn)  # window W400 L40
    ax2d.set_title(f"{title} axial slice {z}", fontsize=9)
    ax3d = fig.add_subplot(1, 2, 2, projection="3d")
    for name in drawn:
        mask = multihot[CHANNEL_INDEX[name]]
        if mask.sum() < 8:
            continue
        padded = np.pad(mask, 1).astype(np.float32)
        verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing, step_size=step)
        mesh = Poly3DCollection(verts[faces], alpha=0.9 if name.endswith("tumor") else 0.45, linewidths=0)
        mesh.set_facecolor(COLOURS[name])
        ax3d.add_collection3d(mesh)
    extent = np.array(fused.shape) * np.array(spacing)
    ax3d.set(xlim=(extent[0], 0), ylim=(0, extent[1]), zlim=(0, extent[2]), xlabel="R→L (mm)",
             ylabel="P→A (mm)", zlabel="I→S (mm)")
    ax3d.set_box_aspect(tuple(extent))
    ax3d.view_init(elev=15, azim=-80)
    ax3d.set_title("3D surfaces (marching cubes)", fontsize=9)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in drawn]
    fig.legend(handles=legend, loc="lower center", ncol=max(1, len(legend)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
