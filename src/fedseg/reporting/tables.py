"""The study's tables, built from the files a run wrote (or the data), each beside the paper's rows where the paper
has the table, and how they are saved (`save_table`: CSV and Markdown under `<run>/tables/`, a note under it).

- 01: `table1` (Table 1: cases per dataset and split, this run's and the paper's), `fingerprint` (per dataset:
  shape, voxel size, orientation, intensity range, label values).
- 02 and 03: `cross_task_matrix` (every model's Dice on every dataset's channels), `own_task_means` (a Table 2
  row: each dataset's model on its own test split), `table2` (Table 2: Dice per channel, the paper's rows below,
  `AVERAGE_NOTE` under it); the dilution table, `dilution_summary` (how far each channel's head moves in the global
  model; read from the federations by `read_dilution`, those that measured none by `unmeasured_dilution`, the note
  `dilution_note`).
- The sweep: `sweep_table` (every swept method's Table 2 rows and 03 wall time, with Shen et al. 2022's rows).
- 04: `table3` (Table 3: Dice per organ on BTCV, the paper's rows below, `TABLE3_NOTE` under it), `table3_detail`
  (Dice, NSD and HD95 with bootstrap CIs, cases scored and missed).
- 05: `table2_cases` (Table 2's rows per test case, for the confidence intervals of 05's bars).

The paper's rows are `fedseg.published`'s; the figures are `fedseg.reporting.figures`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fedseg import run_folder
from fedseg.data.labels import owned_channels
from fedseg.data.layouts import case_files
from fedseg.data.manifest import SPLITS, TABLE1, split_counts
from fedseg.published import (
    SHEN_2022,
    SHEN_DATASET_NAMES,
    SHEN_TABLE2,
    SHEN_TABLE2_CHANNELS,
    SHEN_TABLE3,
    SHEN_TABLE3_ORGANS,
    mean_as_printed,
)


def _listed(values) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


#: The note under a Table 2: how this run's Avg. is defined, and that the paper's is printed as published.
AVERAGE_NOTE = ("Avg. (this run) = unweighted mean of the 7 channel columns. The paper's Avg. "
                f"({_listed(row[-1] for row in SHEN_TABLE2.values())}) is printed as published; it is not the mean "
                f"of its channels ({_listed(mean_as_printed(row[:-1]) for row in SHEN_TABLE2.values())}).")
#: The note under a Table 3: Avg. is the mean of the organs, but for the paper's SL row, printed as published.
TABLE3_NOTE = ("Avg. = unweighted mean of the 4 organ columns, for this run and (as docs/study.md says) for the paper; "
               f"the paper's SL Avg. is printed as published ({SHEN_TABLE3['SL'][-1]:.1f}; the mean of its organs is "
               f"{mean_as_printed(SHEN_TABLE3['SL'][:-1]):.1f}). Dice on the original BTCV grid; a case where an "
               "organ is missing from the prediction counts as Dice 0.")


def save_table(table: pd.DataFrame, run_dir: str | Path, name: str, note: str = "") -> Path:
    """Write a table as CSV and Markdown under `run_dir/tables/`; the note goes under the Markdown table."""
    run_folder.tables_dir(run_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(run_folder.table_file(run_dir, name))
    markdown = table.to_markdown() + (f"\n\n{note}\n" if note else "\n")
    run_folder.table_file(run_dir, name, ".md").write_text(markdown)
    return run_folder.table_file(run_dir, name)


def table1(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cases per dataset and split in this run, with the paper's Table 1 beside (train/val/test)."""
    run = split_counts(manifest)
    rows = []
    for dataset in run.index:
        paper = TABLE1[dataset]
        row = {"dataset": SHEN_DATASET_NAMES[dataset]}
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
            "dataset": SHEN_DATASET_NAMES[dataset], "cases": len(cases),
            "median shape": "×".join(str(int(v)) for v in np.median(shapes, axis=0)),
            "median spacing (mm)": "×".join(f"{v:.2f}" for v in np.median(spacings, axis=0)),
            "orientation": ", ".join(sorted(orientations)),
            "intensity p0.5–p99.5": f"{np.median(low):.0f} to {np.median(high):.0f}",
            "label values": ", ".join(str(v) for v in sorted(values)),
            "channels annotated": ", ".join(owned_channels(dataset)),
        })
    return pd.DataFrame(rows).set_index("dataset")


def cross_task_matrix(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean test Dice (%) of every model (rows) on every dataset's channels (columns)."""
    table = summary.pivot_table(index="model", columns=["dataset", "channel"], values="mean", sort=False)
    return (100 * table).round(1)


def own_task_means(summary: pd.DataFrame, model_of: dict[str, str]) -> pd.Series:
    """Per channel, the mean test Dice of the model `model_of[dataset]` on that dataset's own test split."""
    parts = [summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
             for dataset, model in model_of.items()]
    return pd.concat(parts).groupby("channel")["mean"].mean()


def table2(rows: dict[str, pd.Series]) -> pd.DataFrame:
    """Table 2 layout: Dice % per channel for each named row (a Series channel -> mean Dice in [0, 1]),
    with the mean over the 7 channels; the paper's rows follow, marked "(paper)"."""
    out = {}
    for name, means in rows.items():
        values = [100 * float(means.get(c, float("nan"))) for c in SHEN_TABLE2_CHANNELS]
        out[f"{name} (this run)"] = [*values, float(np.nanmean(values))]
    for name, values in SHEN_TABLE2.items():
        out[f"{name} (paper)"] = list(values)
    columns = [c.replace("_", " ") for c in SHEN_TABLE2_CHANNELS] + ["Avg."]
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
    columns = [c.replace("_", " ") for c in SHEN_TABLE2_CHANNELS] + ["Avg."]
    for name, values in SHEN_TABLE2.items():
        if name == "SL" or any(m == "fedavg" or m.startswith("fedavg-") for m in methods):
            label = "SL" if name == "SL" else f"fedavg: {name}"
            rows[f"{label} ({SHEN_2022})"] = {**dict(zip(columns, values)), "03 wall time (s)": np.nan}
    return pd.DataFrame.from_dict(rows, orient="index")


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


def table3(dice: pd.DataFrame) -> pd.DataFrame:
    """Table 3 layout: mean Dice % per organ for each method (rows of `dice`: method x organ -> mean in [0, 1]),
    with the mean over the 4 organs; the paper's rows follow, marked "(paper)"."""
    out = {}
    for method, row in dice.iterrows():
        values = [100 * float(row.get(organ, np.nan)) for organ in SHEN_TABLE3_ORGANS]
        out[f"{method} (this run)"] = [*values, float(np.nanmean(values))]
    for name, values in SHEN_TABLE3.items():
        out[f"{name} (paper)"] = list(values)
    columns = [organ.capitalize() for organ in SHEN_TABLE3_ORGANS] + ["Avg."]
    return pd.DataFrame.from_dict(out, orient="index", columns=columns).round(1)


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
    table = table.reindex(sorted(table.index, key=lambda k: (order.index(k[0]), SHEN_TABLE3_ORGANS.index(k[1])
                                                             if k[1] in SHEN_TABLE3_ORGANS else 9)))
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
