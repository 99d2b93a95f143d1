"""Tables and figures of the study: Table 1, the dataset fingerprint, Fig. 1, and how they are saved."""

from __future__ import annotations

import json
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
from fedseg.data.layouts import case_files
from fedseg.data.manifest import SPLITS, TABLE1, split_counts
from fedseg.data.transforms import IMAGE, LABEL, evaluation_dataset

#: Row labels of the paper's Table 1.
PAPER_NAMES = {"liver": "MSD liver", "pancreas": "MSD pancreas", "kits19": "KiTS19", "spleen": "MSD spleen",
               "btcv": "BTCV (external)"}


def save_table(table: pd.DataFrame, run_dir: str | Path, name: str, note: str = "") -> Path:
    """Write a table as CSV and Markdown under `run_dir/tables/`; the note goes under the Markdown table."""
    run_folder.tables_dir(run_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(run_folder.table_file(run_dir, name))
    markdown = table.to_markdown() + (f"\n\n{note}\n" if note else "\n")
    run_folder.table_file(run_dir, name, ".md").write_text(markdown)
    return run_folder.table_file(run_dir, name)


def save_figure(fig: plt.Figure, run_dir: str | Path, name: str) -> Path:
    """Save a figure as PNG under `run_dir/figures/`."""
    run_folder.figures_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = run_folder.figure_file(run_dir, name)
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
    """Fig. 1: one axial (top) and one coronal (bottom) slice per dataset, labels in the paper's colours
    (kidney pink, liver red, ...).

    `volumes` maps dataset -> (image (x,y,z) in [0,1], multi-hot target (8,x,y,z), case id), both RAS.
    """
    names = [d for d in DATASETS if d in volumes]
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 7.0), squeeze=False)
    for column, dataset in enumerate(names):
        image, target, case_id = volumes[dataset]
        channels = owned_channels(dataset)
        z = best_axial_slice(target, channels)
        y = best_axial_slice(target.transpose(0, 1, 3, 2), channels)  # the coronal slice with the most label
        overlay(axes[0, column], image[..., z], target[..., z], channels)
        axes[0, column].set_title(f"{PAPER_NAMES[dataset]}\n{case_id}, axial {z}", fontsize=9)
        overlay(axes[1, column], image[:, y, :], target[:, :, y, :], channels)  # rows z (superior up), columns x
        axes[1, column].set_title(f"coronal {y}", fontsize=9)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.text(0.01, 0.01, "radiological view: patient's right on the image's left; coronal: superior up",
             fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


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


#: Shen et al. 2022, Table 2 (Dice %, test splits): per channel, and the paper's own "Avg." column, which does not
#: follow from its channels under any obvious definition (docs/study.md); kept as printed.
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


def sweep_table(run_dir: str | Path, methods: tuple[str, ...]) -> pd.DataFrame:
    """One table of every swept method (`<run_dir>/<method>/tables/table2.csv`): its FL global and FL local
    rows (Dice %, 7 channels and Avg.), the SL row once, and the method's 03 wall time in seconds; then the
    paper's rows where it has them (Shen et al. 2022's Table 2: SL and FedAvg; the other methods' papers report
    other datasets and label sets)."""
    rows = {}
    for method in methods:
        folder = Path(run_dir) / method
        table = pd.read_csv(run_folder.table_file(folder, "table2"), index_col=0)
        seconds = json.loads(run_folder.run_record(folder).read_text())["notebooks"]["03_federated_training"]["wall_s"]
        if not rows and "SL (this run)" in table.index:
            rows["SL"] = {**table.loc["SL (this run)"].to_dict(), "03 wall time (s)": np.nan}
        for kind in ("FL global model (server)", "FL local model (client)"):
            rows[f"{method}: {kind}"] = {**table.loc[f"{kind} (this run)"].to_dict(), "03 wall time (s)": seconds}
    columns = [c.replace("_", " ") for c in TABLE2_CHANNELS] + ["Avg."]
    for name, values in PAPER_TABLE2.items():
        if name == "SL" or any(m == "fedavg" or m.startswith("fedavg-") for m in methods):
            label = "SL" if name == "SL" else f"fedavg: {name}"
            rows[f"{label} (Shen et al. 2022)"] = {**dict(zip(columns, values)), "03 wall time (s)": np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


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
            ax.plot(rows["round"], rows["mean_dice"], marker="o", ms=3, label=PAPER_NAMES.get(dataset, dataset))
        ax.set(xlabel="round", title=title, ylim=(0, 1))
        ax.grid(alpha=0.3)
    overall = overall.dropna(subset=["mean_dice"])
    if len(overall):
        left.plot(overall["round"], overall["mean_dice"], color="k", lw=2, label="mean of 7 channels")
    left.set_ylabel("validation Dice (owned channels)")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


#: The note under a dilution table (`dilution_summary`), in 03 and in the sweep.
DILUTION_NOTE = ("Per federation and channel, means over the rounds in which the owners moved the channel: how much "
                 "of its owners' update the global model kept (FedAvg with a masked loss: the owners' share of cases), "
                 "how far the other clients moved it, and the cosine between the global and the owners' update "
                 "(below 0: the others pull it towards 'absent').")


#: What a dilution table shows, in each measured column, for a federation that measured none.
NOT_MEASURED = "not measured"


def read_dilution(folders: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Name -> `metrics/fl_dilution.csv` of each federation folder that has one (SegViz keeps its task heads
    as their owners sent them, and a network without an output layer of its own has no head to measure, so
    their federations have none: `unmeasured_dilution`)."""
    paths = {name: run_folder.metrics_file(folder, "fl_dilution.csv") for name, folder in folders.items()}
    return {name: pd.read_csv(path) for name, path in paths.items() if path.exists()}


def unmeasured_dilution(folders: Mapping[str, str | Path]) -> dict[str, str]:
    """Name -> why its federation measured no dilution (`run_folder.dilution_not_measured`: its network, e.g. UNet
    with residual units, has no output layer of its own), for each federation folder that says so."""
    paths = {name: run_folder.dilution_not_measured(folder) for name, folder in folders.items()}
    return {name: path.read_text().strip() for name, path in paths.items() if path.exists()}


def dilution_summary(dilution: Mapping[str, pd.DataFrame], unmeasured: Mapping[str, str] | None = None
                     ) -> pd.DataFrame:
    """Per federation (name -> its `metrics/fl_dilution.csv`) and channel, over the rounds: the owners' share of
    the training cases, the mean of global move / owner move (FedAvg with a masked loss: the share), the mean
    move of the non-owners relative to the owners', and the mean cosine between the global and the owners' update.
    A federation of `unmeasured` (`unmeasured_dilution`) gets one row, "not measured" in every column (the
    reasons go under the table: `dilution_note`)."""
    rows = []
    for name, table in dilution.items():
        for channel, part in table.groupby("channel", sort=False):
            owned = part[part["owner_move"] > 0]
            rows.append({"federation": name, "channel": channel.replace("_", " "),
                         "owners": part["owners"].fillna("").iloc[0] or "-",
                         "owner share": part["owner_share"].iloc[0],
                         "global / owner move": owned["ratio"].mean(),
                         "others / owner move": (owned["others_move"] / owned["owner_move"]).mean(),
                         "cosine(global, owner)": owned["cosine"].mean()})
    columns = ["owners", "owner share", "global / owner move", "others / owner move", "cosine(global, owner)"]
    for name in unmeasured or {}:
        rows.append({"federation": name, "channel": "all channels", **dict.fromkeys(columns, NOT_MEASURED)})
    return pd.DataFrame(rows, columns=["federation", "channel", *columns]).set_index(["federation", "channel"]).round(3)


def dilution_note(unmeasured: Mapping[str, str] | None = None) -> str:
    """`DILUTION_NOTE`, then why each federation of `unmeasured` measured no dilution."""
    reasons = " ".join(f"**{name}: not measured.** {reason}" for name, reason in (unmeasured or {}).items())
    return f"{DILUTION_NOTE} {reasons}" if reasons else DILUTION_NOTE


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


def own_task_means(summary: pd.DataFrame, model_of: dict[str, str]) -> pd.Series:
    """Per channel, the mean test Dice of the model `model_of[dataset]` on that dataset's own test split."""
    parts = [summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
             for dataset, model in model_of.items()]
    return pd.concat(parts).groupby("channel")["mean"].mean()


# --------------------------------------------------------------------------------------------------
# External evaluation (BTCV): Table 3, bars with confidence intervals, Fig. 3 and Fig. 4
# --------------------------------------------------------------------------------------------------

#: Shen et al. 2022, Table 3 (Dice %, BTCV): Liver, Pancreas, Kidney, Spleen and the paper's Avg.
TABLE3_ORGANS = ("liver", "pancreas", "kidney", "spleen")
PAPER_TABLE3 = {
    "SL": (65.8, 57.5, 70.7, 44.6, 60.0),
    "FL global model": (0.0, 62.9, 54.5, 0.0, 29.4),
    "FL local model (ensemble)": (87.7, 71.8, 80.5, 69.9, 77.5),
    "FL local model (processed)": (91.6, 75.4, 80.2, 73.1, 80.1),
}
TABLE3_NOTE = ("Avg. = unweighted mean of the 4 organ columns, for this run and (as docs/study.md says) for the paper; "
               "the paper's SL Avg. is printed as published (60.0; the mean of its organs is 59.7). Dice on the "
               "original BTCV grid; a case where an organ is missing from the prediction counts as Dice 0.")


def table3(dice: pd.DataFrame) -> pd.DataFrame:
    """Table 3 layout: mean Dice % per organ for each method (rows of `dice`: method x organ -> mean in [0, 1]),
    with the mean over the 4 organs; the paper's rows follow, marked "(paper)"."""
    out = {}
    for method, row in dice.iterrows():
        values = [100 * float(row.get(organ, np.nan)) for organ in TABLE3_ORGANS]
        out[f"{method} (this run)"] = [*values, float(np.nanmean(values))]
    for name, values in PAPER_TABLE3.items():
        out[f"{name} (paper)"] = list(values)
    columns = [organ.capitalize() for organ in TABLE3_ORGANS] + ["Avg."]
    return pd.DataFrame.from_dict(out, orient="index", columns=columns).round(1)


def metric_bars(summary: pd.DataFrame, metric: str = "dice", ylabel: str | None = None,
                groups: tuple[str, ...] = TABLE3_ORGANS, title: str = "BTCV") -> plt.Figure:
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


def table3_detail(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method and organ: each metric as "mean ± std [CI low, CI high]", with the cases scored and missed
    (prediction empty where the organ is present). `summary` as `metrics.summarise` returns it."""
    def cell(row: pd.Series) -> str:
        digits = 1 if row["metric"] == "hd95" else 3
        text = f"{row['mean']:.{digits}f} ± {row['std']:.{digits}f}"
        return text + (f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]" if pd.notna(row["ci_low"]) else "")

    names = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}
    part = summary.assign(value=summary.apply(cell, axis=1))
    table = part.pivot(index=["method", "organ"], columns="metric", values="value")
    table = table[[m for m in names if m in table.columns]].rename(columns=names)
    counts = part.drop_duplicates(["method", "organ"]).set_index(["method", "organ"])
    table["scored"], table["missed"] = counts["n_scored"], counts["n_pred_empty"]
    order = list(dict.fromkeys(summary["method"]))
    table = table.reindex(sorted(table.index, key=lambda k: (order.index(k[0]), TABLE3_ORGANS.index(k[1])
                                                                if k[1] in TABLE3_ORGANS else 9)))
    return table.reset_index().set_index("method")


def table2_cases(baselines: pd.DataFrame | None, federated: pd.DataFrame) -> pd.DataFrame:
    """Table 2's rows per test case, long (method, case_id, organ = channel, dice), for confidence intervals:
    SL and FL local on each task's own test split with that task's model, FL global on every task's split."""
    parts = []
    for frame, method, own in ((baselines, "SL", "sl-"), (federated, "FL global model (server)", None),
                               (federated, "FL local model (client)", "fl-local-")):
        if frame is None:
            continue
        chosen = frame[frame["model"] == (frame["dataset"].radd(own) if own else "fl-global")]
        parts.append(chosen.assign(method=method, organ=chosen["channel"])[["method", "case_id", "organ", "dice"]])
    return pd.concat(parts, ignore_index=True)


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
        row[0].set_title(f"{PAPER_NAMES[task]} {panel['case_id']}\nground truth", fontsize=8)
        for ax, name in zip(row[1:], names):
            overlay(ax, panel["image"][..., z], panel["predictions"][name][..., z], channels)
            ax.set_title(name, fontsize=8)
    legend = [Patch(color=COLOURS[c], label=c.replace("_", " ")) for c in COLOURS]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def canonical(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI's array in RAS (nibabel's closest canonical orientation) and its voxel size in mm."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


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
