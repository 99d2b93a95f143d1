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
- The notebooks' mechanism cells: `label_channels_figure` (01: a label map's values into the 8 channels, owned or
  unknown), `one_step_figure` (02: one training step's gradient per channel under a masked and a literal loss),
  `ensemble_figure` (04: one BTCV slice through the ensemble, the largest-component rule and the fusion; `as_ras`).

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
    FOREGROUND,
    LABEL_MAPS,
    owned_channels,
)
from fedseg.data.transforms import IMAGE, LABEL, evaluation_dataset
from fedseg.published import SHEN_DATASET_NAMES, SHEN_TABLE3_ORGANS
from fedseg.train.inference import FUSION_ORDER


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
#: The CT window of every overlay (W400 L40: abdominal soft tissue), as (lowest, highest) HU.
CT_WINDOW_HU = (-160.0, 240.0)


def ct_display(hu: np.ndarray) -> np.ndarray:
    """CT values in HU scaled to [0, 1] in the `CT_WINDOW_HU` window, for `overlay`."""
    low, high = CT_WINDOW_HU
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0, 1)


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
    overlay(ax2d, ct_display(hu[..., z]), multihot[..., z], drawn)
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


# ---- The notebooks' mechanism cells: one label map (01), one training step (02), one BTCV case (04) ----

def _value_colour(dataset: str, value: int) -> tuple[float, float, float]:
    """The colour of a label value: that of the last channel it switches on (a tumour's, not its organ's)."""
    channels = LABEL_MAPS[dataset].get(int(value), ())
    return COLOURS[channels[-1]] if value and channels else (0.0, 0.0, 0.0)


def label_channels_figure(sites: Mapping[str, Mapping[str, Any]]) -> plt.Figure:
    """01's mechanism: a row per dataset, one axial slice of its label map as the file stores it (integer values),
    then the 8 channels of its multi-hot target (`labels.to_multihot`) in the paper's colours. A channel the
    dataset does not own (`labels.owned_mask`) is drawn grey with a "?": its target is 0 (background's is the
    unlabelled voxels) but means "not labelled here", never "absent".

    `sites[dataset]` = {"label": (x, y) ints, "target": (8, x, y), "owned": (8,) bool, "case_id": str}, RAS.
    """
    fig, axes = plt.subplots(len(sites), 1 + len(CHANNELS), figsize=(1.2 * (1 + len(CHANNELS)), 1.35 * len(sites) + 1),
                             squeeze=False, layout="constrained")
    for row, (dataset, site) in zip(axes, sites.items()):
        label = np.asarray(site["label"]).astype(int)
        values = sorted({0, *LABEL_MAPS[dataset]})
        palette = ListedColormap([_value_colour(dataset, v) for v in range(max(values) + 1)])
        row[0].imshow(radiological(label), cmap=palette, vmin=-0.5, vmax=max(values) + 0.5, interpolation="nearest")
        row[0].set_ylabel(f"{dataset}\n{site['case_id']}", fontsize=8)
        mapping = [f"{v} → {' + '.join(c.replace('_', ' ') for c in LABEL_MAPS[dataset][v])}" for v in values if v]
        row[0].set_xlabel("\n".join(mapping), fontsize=7)
        for ax, channel in zip(row[1:], CHANNELS):
            index = CHANNEL_INDEX[channel]
            mask = radiological(np.asarray(site["target"][index]) > 0)
            if site["owned"][index]:
                ax.imshow(mask, cmap=ListedColormap(["black", COLOURS[channel]]), vmin=0, vmax=1,
                          interpolation="nearest")
            else:
                ax.imshow(mask, cmap=ListedColormap(["#e6e6e6", "#c8c8c8"]), vmin=0, vmax=1, interpolation="nearest")
                ax.text(0.5, 0.5, "?", transform=ax.transAxes, ha="center", va="center", fontsize=18, color="#555555")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, channel in zip(axes[0, 1:], CHANNELS):
        ax.set_title(channel.replace("_", "\n"), fontsize=8)
    axes[0, 0].set_title("label map\n(values)", fontsize=8)
    fig.suptitle("A label map's values → the 8 channels (to_multihot). Coloured: the site owns the channel "
                 "(owned_mask, trained);\ngrey ?: not owned, target 0 = unknown (masked losses skip it, literal "
                 "losses read it as 'absent'). " + RADIOLOGICAL_NOTE.split(";")[0], fontsize=9)
    return fig


def _log_bars(ax: plt.Axes, values: Mapping[str, pd.Series], ylabel: str) -> None:
    """Grouped bars per channel on a log axis; an exact zero is written '0' at the bottom (a log axis has none)."""
    channels = list(next(iter(values.values())).index)
    width = 0.8 / len(values)
    positive = [v for series in values.values() for v in series if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    for i, (name, series) in enumerate(values.items()):
        x = np.arange(len(channels)) + (i - (len(values) - 1) / 2) * width
        heights = series.to_numpy(dtype=float)
        ax.bar(x, np.where(heights > 0, heights, np.nan), width, color=f"C{i}", label=name)
        for xi, h in zip(x, heights):
            if h == 0:
                ax.text(xi, floor * 1.3, "0", ha="center", va="bottom", fontsize=8, color=f"C{i}", fontweight="bold")
    ax.set_yscale("log")
    ax.set_ylim(floor, 3 * max(positive) if positive else 1.0)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def one_step_figure(owned: pd.Series, gradients: Mapping[str, pd.Series], losses: Mapping[str, tuple[float, float]],
                    head_moves: Mapping[str, pd.Series] | None = None, title: str = "") -> plt.Figure:
    """02's mechanism: one training step on one batch under each loss (a colour each). Per channel: the norm of the
    loss's gradient at the logits and, when given, how far the step moved the channel's output-layer weights (log
    axes, an exact 0 written as such, the channels the batch's site owns shaded); then the batch's loss before and
    after the step (`losses[loss] = (before, after)`). `owned`, `gradients[loss]`, `head_moves[loss]` are indexed by
    channel."""
    panels = 2 + (head_moves is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), width_ratios=[3] * (panels - 1) + [2],
                             layout="constrained")
    bars = [(axes[0], gradients, "‖∂loss/∂logits‖ of the channel")]
    if head_moves is not None:
        bars.append((axes[1], head_moves, "‖Δ output-layer weights‖ after the step"))
    channels = list(owned.index)
    for ax, values, ylabel in bars:
        for x, is_owned in enumerate(owned):
            if is_owned:
                ax.axvspan(x - 0.5, x + 0.5, color="tab:green", alpha=0.12, lw=0)
        _log_bars(ax, values, ylabel)
        ax.set_xticks(np.arange(len(channels)), [c.replace("_", "\n") for c in channels], fontsize=7)
    axes[0].legend(fontsize=8, loc="upper right", title="loss (green: owned)", title_fontsize=8)
    ax = axes[-1]
    for i, (name, (before, after)) in enumerate(losses.items()):
        ax.plot([0, 1], [before, after], marker="o", color=f"C{i}", label=name)
        for x, value in ((0, before), (1, after)):
            ax.annotate(f"{value:.4f}", (x, value), textcoords="offset points", xytext=(0, 5), ha="center",
                        fontsize=7, color=f"C{i}")
    ax.set_xticks([0, 1], ["before", "after"], fontsize=8)
    ax.set_xlim(-0.4, 1.4)
    ax.margins(y=0.25)
    ax.set_ylabel("loss on this batch", fontsize=8)
    ax.set_title("one optimizer step", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def as_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An array on a NIfTI's grid (spatial axes last three, any channel axes before) in RAS, as `canonical` reads the
    file: nibabel's closest canonical orientation of `affine`."""
    orientation = nib.orientations.io_orientation(affine)
    spatial = np.moveaxis(np.asarray(array), range(-3, 0), range(3))
    return np.moveaxis(nib.orientations.apply_orientation(spatial, orientation), range(3), range(-3, 0))


def ensemble_figure(image_path: str | Path, probabilities: Mapping[str, tuple[str, np.ndarray]], ensemble: np.ndarray,
                    processed: np.ndarray, fused: np.ndarray, truth: Mapping[str, np.ndarray],
                    title: str = "") -> plt.Figure:
    """04's mechanism on one axial slice of one BTCV case, all on the file's grid (shown in RAS, radiological view):
    top, each client model's probability for its organ channel (`probabilities[model] = (channel, (X, Y, Z))`,
    contour at 0.5); bottom, the ensemble's mask (8, X, Y, Z), the same after the largest-component rule
    (`processed`; voxels it removed outlined in white), the label map fused in the paper's order (`fused`, values
    = channel index; voxels where two channels were on, decided by the order, outlined in white) and the truth
    (`truth[organ]`, BTCV's four organs). The slice is the one through most of the truth's organs, then with the most
    organ voxels, then the most voxels the rule and the order changed."""
    affine = nib.load(str(image_path)).affine
    hu, _ = canonical(image_path)
    ensemble, processed = as_ras(ensemble, affine).astype(bool), as_ras(processed, affine).astype(bool)
    fused = as_ras(fused, affine)
    removed = (ensemble[1:] & ~processed[1:]).any(axis=0)
    overlap = processed[1:].sum(axis=0) > 1
    organs = {organ: as_ras(mask, affine).astype(bool) for organ, mask in truth.items()}
    # the slice through most of the truth's organs (then the most organ voxels, then most voxels changed)
    present = sum(mask.any(axis=(0, 1)).astype(float) for mask in organs.values())
    voxels = sum(mask.sum(axis=(0, 1)) for mask in organs.values())
    changed = (removed | overlap).sum(axis=(0, 1))
    z = int(np.lexsort((changed, voxels, present))[-1])
    ct = ct_display(hu[..., z])
    columns = max(4, len(probabilities))
    fig, axes = plt.subplots(2, columns, figsize=(2.3 * columns, 5.6), squeeze=False, layout="constrained")
    for ax, (model, (channel, probability)) in zip(axes[0], probabilities.items()):
        p = radiological(as_ras(probability, affine)[..., z])
        ax.imshow(radiological(ct), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        shown = ax.imshow(np.ma.masked_where(p < 0.05, p), cmap="inferno", vmin=0, vmax=1, alpha=0.7,
                          interpolation="nearest")
        if (p > 0.5).any() and (p <= 0.5).any():
            ax.contour(p, levels=[0.5], colors=[COLOURS[channel]], linewidths=1.2)
        ax.set_title(f"{model} model\nP({channel.replace('_', ' ')})", fontsize=8)
        ax.set_axis_off()
    for ax in axes[0, len(probabilities):]:
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[0, len(probabilities) - 1], fraction=0.05, label="probability")
    fused_multihot = np.stack([fused[..., z] == c for c in range(len(CHANNELS))])
    order = " < ".join(c.replace("_", " ") for c in FUSION_ORDER)
    panels = [(ensemble[..., z], None, "ensemble\n(each channel from its owner)"),
              (processed[..., z], removed[..., z], "largest components (kidney: 2)\n(white: removed)"),
              (fused_multihot, overlap[..., z], "fused label map\n(white: set by the order)")]
    for ax, (mask, outline, name) in zip(axes[1], panels):
        overlay(ax, ct, mask, FOREGROUND)
        if outline is not None and outline.any():
            ax.contour(radiological(outline).astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(name, fontsize=8)
    truth_multihot = np.zeros((len(CHANNELS), *ct.shape), dtype=bool)
    for organ, mask in organs.items():
        truth_multihot[CHANNEL_INDEX[organ]] = mask[..., z]
    overlay(axes[1, 3], ct, truth_multihot, tuple(organs))
    axes[1, 3].set_title("truth (BTCV's four organs)", fontsize=8)
    for ax in axes[1, 4:]:
        ax.set_axis_off()
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=7, frameon=False,
               title=f"fusion order, a later label overrides an earlier one: {order}", title_fontsize=8)
    fig.suptitle(f"{title} axial slice {z}, {RADIOLOGICAL_NOTE.split(';')[0]}".strip(), fontsize=9)
    return fig
