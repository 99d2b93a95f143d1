"""The budget-response study's report (`python -m fedseg budget`): Dice against training budget per channel and
method, the cost of every point, the papers' claims at each budget side by side, and per claim whether the trend
says more budget would change its verdict.

Everything is read from the points' run folders (their run.json, tables and per-case scores), so `--report-only`
rebuilds it from whatever folders a study holds (a point whose folder has no run.json yet is left out). Written
into the study folder: `budget.csv` (one row per point, split, model, federation and channel), `budget_cost.csv`
(wall seconds and CPU-hours per point and part), `budget_validation.csv` (the SL models' last validation Dice per
point: what the finer voxel is judged on; kept for a point whose checkpoints are gone), `budget.md`, `budget.png`,
`claims_by_scale.md` and `.csv`.

**Cost.** A point's CPU-hours are the wall seconds of what trained it times the cores of the machine it ran on
(run.json's `host.cpus`; 2 on the reference machine, which 02 and 03 keep about 1.9 of busy): the SL row 02 (which
trains the four SL models, the central model and the localiser), a federation its 03. A budget point's total adds
every notebook under its folder (the chain, the sweep's federations, the node sets' and the contrast study's
notebooks) and the work done outside notebooks (the node sets' central models and BTCV scoring,
`metrics/segviz_nodes_time.csv`; the contrast study's scoring, `metrics/contrast_time.csv`). A notebook run again
after an interruption counts once, its last run.

**The trend rule** (`trend`, written under the claims): a claim's verdicts at the two largest budgets at the base
voxel decide it; "may change with more budget" when (1) the verdict differs between them, or (2) for an "A > B"
claim, its estimate moved toward the other verdict by more than the half-width of its 95% CI at the larger budget,
or (3) for "fails on exactly these channels", the set of channels below 10 Dice differs; otherwise "stable"; "not
decidable" when the claim was not tested at both. A claim over several comparisons (each node set; each step of
nodes; both inequalities of a chain) applies (2) to each comparison on its own, matched by name across the two
budgets: held, it may change when any part may; not held, when every part not held at the larger budget may (a held
part cannot change its verdict). Two budgets are a slope, not a test: "stable" says that the last
step of budget did not move the claim by more than its own uncertainty, not that no budget would.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fedseg import run_folder
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.reporting import claims

FEDERATED, BASELINES = run_folder.FEDERATED, run_folder.BASELINES
SL, GLOBAL, LOCAL = "SL", "FL global", "FL local"
TABLE2_ROWS = {SL: "SL (this run)", GLOBAL: "FL global model (server) (this run)",
               LOCAL: "FL local model (client) (this run)"}
#: BTCV rows of 04 (`metrics/btcv_summary.csv`) shown, as (model, whose federation: the chain's or none).
BTCV_ROWS = {"SL (ensemble)": SL, "FL global model": GLOBAL, "FL local model (ensemble)": LOCAL}
AVERAGE = "Avg."
#: The convergence targets for the SL models on the test splits (Dice %): what a model trained to convergence on
#: this phantom should reach (organs 90, the pancreas 75, the liver and kidney tumours 50; the pancreas tumour has
#: none). The report says how far each budget point's SL model is from each.
TARGETS = {"liver": 90.0, "kidney": 90.0, "spleen": 90.0, "pancreas": 75.0, "liver tumor": 50.0,
           "kidney tumor": 50.0}
STABLE, MAY_CHANGE, UNDECIDED = "stable", "may change with more budget", "not decidable"
TREND_RULE = (
    "Trend rule: from the claim's verdicts at the two largest budgets at the base voxel. 'May change with more "
    "budget' when the verdict differs between them; or, for an 'A > B' claim (estimate and 95% CI), when its estimate "
    "moved toward the other verdict by more than the CI's half-width at the larger budget (the number of further "
    "steps of the same budget factor at which the deciding CI bound would reach 0, moving at that rate, is given); "
    "a claim over several comparisons (node sets, steps, a chain of inequalities) applies this to each comparison on "
    "its own: held, it may change when any part may; not held, when every part not held at the larger budget may; "
    "or, for 'fails on exactly these channels', when the set of channels below 10 Dice changed. Otherwise 'stable'; "
    "'not decidable' when the claim was not tested at both. Two budgets give a slope, not a test: 'stable' means the "
    "last step of budget moved the claim by less than its own uncertainty, not that no budget would.")


def _record(folder: Path) -> dict[str, Any]:
    path = run_folder.run_record(folder)
    return json.loads(path.read_text()) if path.exists() else {}


def _wall(record: Mapping[str, Any], notebook: str) -> float:
    entry = record.get("notebooks", {}).get(notebook) or {}
    return float(entry.get("wall_s") or np.nan)


def _cpus(record: Mapping[str, Any]) -> int:
    return int((record.get("host") or {}).get("cpus") or 1)


def cpu_hours(wall_s: float, cpus: int) -> float:
    """Wall seconds on a machine of `cpus` cores as CPU-hours (the cores held, busy or not)."""
    return wall_s * cpus / 3600.0


def point_dice(point: Mapping[str, Any]) -> pd.DataFrame:
    """Long rows of one point: Dice (%) per split (test: Table 2 of the point and of each of its federations;
    BTCV: 04's ensemble and global rows, the chain's federation), model, federation and channel, with the wall
    seconds and CPU-hours of the notebook that trained the model (02 for SL, the federation's 03)."""
    folder = Path(point["folder"])
    root = _record(folder)
    rows: list[dict[str, Any]] = []

    def add(split: str, model: str, federation: str, values: Mapping[str, float], record: Mapping[str, Any],
            notebook: str) -> None:
        wall = _wall(record, notebook)
        for channel, dice in values.items():
            rows.append({"split": split, "model": model, "federation": federation, "channel": channel,
                         "dice": float(dice), "wall_s": wall, "cpu_hours": cpu_hours(wall, _cpus(record))})

    table2 = run_folder.table_file(folder, "table2")
    if table2.exists():
        table = pd.read_csv(table2, index_col=0)
        if TABLE2_ROWS[SL] in table.index:
            add("test", SL, "-", table.loc[TABLE2_ROWS[SL]].to_dict(), root, BASELINES)
    chain_federation = "-"
    for folders, _ in claims.distinct_federations(folder) if folder.is_dir() else []:
        federation, record = claims.federation_label(folders[0]), _record(folders[0])
        if folder in folders:
            chain_federation = federation
        path = run_folder.table_file(folders[0], "table2")
        if not path.exists():
            continue
        table = pd.read_csv(path, index_col=0)
        for model in (GLOBAL, LOCAL):
            if TABLE2_ROWS[model] in table.index:
                add("test", model, federation, table.loc[TABLE2_ROWS[model]].to_dict(), record, FEDERATED)
    btcv = run_folder.metrics_file(folder, "btcv_summary.csv")
    if btcv.exists():
        summary = pd.read_csv(btcv)
        summary = summary[summary["metric"] == "dice"]
        for method, model in BTCV_ROWS.items():
            part = summary[summary["method"] == method]
            if part.empty:
                continue
            values = {organ: 100 * v for organ, v in zip(part["organ"], part["mean"])}
            values[AVERAGE] = float(np.mean(list(values.values())))
            add("BTCV", model, "-" if model == SL else chain_federation, values, root,
                BASELINES if model == SL else FEDERATED)
    out = pd.DataFrame(rows, columns=["split", "model", "federation", "channel", "dice", "wall_s", "cpu_hours"])
    meta = {"point": point["label"], "scale": point["scale"], "spacing_mm": point.get("spacing_mm"),
            "sl_steps": point["steps"], "client_steps": point["rounds"] * point["local_steps"]}
    return out.assign(**meta)[[*meta, *out.columns]].assign(folder=folder.name)


VALIDATION_COLUMNS = ["point", "scale", "spacing_mm", "sl_steps", "model", "channel", "val_dice", "step", "train_s",
                      "val_s"]


def point_validation(point: Mapping[str, Any]) -> pd.DataFrame:
    """The SL models' validation Dice (%) per channel at the end of their budget (the last row of each
    `checkpoints/sl-<dataset>/history.csv`), with the model's training and validation seconds: what a setting is
    chosen on (test splits only report). Empty where the point's checkpoints were not kept."""
    folder, rows = Path(point["folder"]), []
    for dataset in TRAIN_DATASETS:
        path = run_folder.model_dir(folder, f"sl-{dataset}") / "history.csv"
        if not path.exists():
            continue
        last = pd.read_csv(path).iloc[-1]
        for column in (c for c in last.index if c.startswith("dice_")):
            rows.append({"point": point["label"], "scale": point["scale"], "spacing_mm": point.get("spacing_mm"),
                         "sl_steps": point["steps"], "model": f"sl-{dataset}",
                         "channel": column.removeprefix("dice_").replace("_", " "),
                         "val_dice": 100 * float(last[column]), "step": int(last["step"]),
                         "train_s": float(last["train_s"]), "val_s": float(last["val_s"])})
    return pd.DataFrame(rows, columns=VALIDATION_COLUMNS)


def voxel_comparison(validation: pd.DataFrame, dice: pd.DataFrame,
                     points: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Each point at a finer voxel against the base voxel's point at the same budget: per channel the SL models'
    validation Dice (%) at both and the difference, then the mean over channels; the test Dice of SL beside it
    (reported, not chosen on); and each side's SL training and validation seconds (summed over the four models)."""
    by_scale = {p["scale"]: p["label"] for p in points if not p.get("spacing_mm")}
    val = validation.pivot_table(index="channel", columns="point", values="val_dice", sort=False)
    test = dice[(dice["split"] == "test") & (dice["model"] == SL)].pivot_table(
        index="channel", columns="point", values="dice", sort=False)
    per_model = validation.groupby(["point", "model"])[["train_s", "val_s"]].first()  # a row per channel
    seconds = per_model.groupby(level="point").sum()
    rows: list[dict[str, Any]] = []
    for point in (p for p in points if p.get("spacing_mm")):
        fine, base = point["label"], by_scale.get(point["scale"])
        if base is None or not {base, fine} <= set(val.columns):
            continue
        channels = []
        for channel in val.index:
            b, f = val.loc[channel, base], val.loc[channel, fine]
            tb, tf = (test.loc[channel, c] if channel in test.index and c in test.columns else np.nan
                      for c in (base, fine))
            channels.append({"budget": base, "finer voxel": fine, "channel": channel, "val (base)": b,
                             "val (finer)": f, "val finer - base": f - b, "test (base)": tb, "test (finer)": tf})
        means = pd.DataFrame(channels)[["val (base)", "val (finer)", "val finer - base", "test (base)",
                                        "test (finer)"]].mean().to_dict()
        rows += [*channels, {"budget": base, "finer voxel": fine, "channel": "mean over channels", **means,
                             "SL train s (base, finer)": f"{seconds.loc[base, 'train_s']:.0f}, "
                                                         f"{seconds.loc[fine, 'train_s']:.0f}",
                             "SL validation s (base, finer)": f"{seconds.loc[base, 'val_s']:.0f}, "
                                                              f"{seconds.loc[fine, 'val_s']:.0f}"}]
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    seconds = ["SL train s (base, finer)", "SL validation s (base, finer)"]
    return out.round(1).assign(**{c: out[c].fillna("") for c in seconds})  # given once, on the mean's row


def _records_under(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = sorted(folder.rglob(run_folder.run_record("").name))
    return [(path.parent, json.loads(path.read_text())) for path in found]


def point_cost(point: Mapping[str, Any]) -> dict[str, Any]:
    """Wall seconds and CPU-hours of everything a point's folder holds, by part: the chain (its own notebooks), the
    sweep (its federations beside the chain's), the node sets and the contrast study (notebooks and scoring)."""
    folder = Path(point["folder"])
    contrast = Path(point.get("contrast") or folder / "contrast")
    parts = {"chain": 0.0, "sweep": 0.0, "nodes": 0.0, "contrast": 0.0}
    hours = dict.fromkeys(parts, 0.0)
    cpus = _cpus(_record(folder)) if run_folder.run_record(folder).exists() else 1
    if not folder.is_dir():
        return {**{f"{k}_s": v for k, v in parts.items()}, "total_s": 0.0, "cpu_hours": 0.0, "cpus": cpus}

    def part_of(path: Path) -> str:
        relative = path.relative_to(folder).parts
        if not relative:
            return "chain"
        if path == contrast or contrast in path.parents:
            return "contrast"
        return "nodes" if relative[0].startswith("nodes-") else "sweep"

    for path, record in _records_under(folder):
        seconds = sum(float(e.get("wall_s") or 0) for e in record.get("notebooks", {}).values())
        part = part_of(path)
        parts[part] += seconds
        hours[part] += cpu_hours(seconds, _cpus(record))
    extra = {"nodes": run_folder.metrics_file(folder, "segviz_nodes_time.csv"),
             "contrast": run_folder.metrics_file(contrast, "contrast_time.csv")}
    for part, path in extra.items():
        if path.exists():
            timing = pd.read_csv(path)
            if part == "nodes":  # the federations are notebooks, counted above; the rest is not
                timing = timing[timing["model"].isin(["Central aggregation", "BTCV scoring"])]
            seconds = float(timing["wall_s"].sum())
            parts[part] += seconds
            hours[part] += cpu_hours(seconds, cpus)
    return {**{f"{k}_s": round(v, 1) for k, v in parts.items()}, "total_s": round(sum(parts.values()), 1),
            "cpu_hours": sum(hours.values()), "cpus": cpus}


def point_claims(point: Mapping[str, Any], n_flips: int = claims.N_FLIPS, seed: int = 0) -> pd.DataFrame:
    """The claims table of a point's folder (`claims.claims_table`), its FedGIN row decided from the contrast
    study in the point's `contrast/` sub-folder (its own profile: some clients MRI-like) when that ran."""
    folder = Path(point["folder"])
    table = claims.claims_table(folder, n_flips, seed)
    contrast = Path(point.get("contrast") or folder / "contrast")
    scores = run_folder.metrics_file(contrast, "contrast_per_case.csv")
    if scores.exists():
        cfg = _record(contrast).get("profile_config", {})
        mri_like = tuple(cfg.get("data", {}).get("phantom", {}).get("mri_like") or ())
        fedgin = pd.DataFrame(claims.fedgin_claims(pd.read_csv(scores), mri_like, n_flips, seed),
                              columns=claims.COLUMNS)
        fedgin["tested on"] = fedgin["tested on"] + f" (`{contrast.name}/`)"
        table = pd.concat([table[table["paper"] != claims.FEDGIN], fedgin], ignore_index=True)
    return table


def claim_subject(row: Mapping[str, Any]) -> str:
    """What a claims row is about beyond its claim, to match it across points: the federation of a test-split
    claim of Shen et al. ("fedavg, loss dice_ce"), else nothing (one row per claim)."""
    on = str(row.get("tested on", ""))
    if row.get("paper") == claims.SHEN and on.startswith("test splits, "):
        return re.sub(r" \((also )?`.*$", "", on.removeprefix("test splits, "))
    return ""


def claim_kind(rules: Sequence[str]) -> int | None:
    """+1 for "A > B" (held when the CI lies above 0), -1 for a claimed decrease (below 0), None for "fails on
    exactly these channels" (no CI), from the claim's rule at any point where it was tested."""
    rule = next((r for r in rules if isinstance(r, str) and r != "-"), "")
    if "exactly these" in rule:
        return None
    return -1 if "below 0" in rule else 1


def failing_channels(evidence: str) -> frozenset[str]:
    """The channels a "fails on" row lists (`claims.shen_test_split_claims`'s evidence)."""
    found = re.match(r"fails on: (.*?) \(FL global", str(evidence))
    names = found.group(1) if found else ""
    return frozenset() if names in ("", "none") else frozenset(n.strip() for n in names.split(","))


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _movement(l1: str, b1: float, r1: Mapping[str, Any], l2: str, b2: float, r2: Mapping[str, Any],
              kind: int) -> dict[str, Any] | None:
    """How one comparison's estimate moved from budget `l1` to `l2` against its CI half-width at `l2`
    (`TREND_RULE`), or None when either budget has no interval for it."""
    e1, e2, low, high = r1["estimate"], r2["estimate"], r2["ci_low"], r2["ci_high"]
    if not _finite(e1, e2, low, high):
        return None
    change, half = e2 - e1, (high - low) / 2
    held = r2["verdict"] == claims.HELD
    toward = (kind * change < 0) if held else (kind * change > 0)
    other = claims.NOT_HELD if held else claims.HELD
    out = {"change": change, "half": half, "may": toward and abs(change) > half,
           "side": f"toward {other}" if toward else f"away from {other}"}
    moved = f"the estimate moved {change:+.1f} points from {l1} to {l2}"
    if out["may"]:
        bound = kind * (low if kind > 0 else high)  # > 0 exactly when held
        factor = b2 / b1 if b1 else float("nan")
        out["text"] = (f"{moved}, toward {other} by more than the CI half-width ({half:.1f}) at {l2}; at that rate "
                       f"the deciding CI bound ({kind * bound:+.1f}) reaches 0 after about "
                       f"{abs(bound) / abs(change):.1f} more x{factor:.3g} steps of budget")
    else:
        out["text"] = f"{moved} ({out['side']}), within the CI half-width ({half:.1f}) at {l2}"
    return out


def _parts_trend(l1: str, b1: float, r1: Mapping[str, Any], l2: str, b2: float, r2: Mapping[str, Any],
                 kind: int) -> str:
    """The trend of a claim over several comparisons, each part (a node set, a step, one inequality of a chain)
    followed on its own, matched by name across the two budgets. A held claim fails when any part fails, so it
    may change when any part may; a claim not held turns held only when every part not held at the larger budget
    does, so it may change when each of those may (its held parts cannot change its verdict)."""
    before = {p["name"]: p for p in claims.parts_of(r1)}
    held = r2["verdict"] == claims.HELD
    deciding = [p for p in claims.parts_of(r2) if held or p["verdict"] != claims.HELD]
    moves, unmatched = [], []
    for part in deciding:
        move = _movement(l1, b1, before[part["name"]], l2, b2, part, kind) if part["name"] in before else None
        (unmatched if move is None else moves).append((part["name"], move))
    if not moves:
        return f"{UNDECIDED}: no deciding part of the claim has an interval at both {l1} and {l2}"
    left = f" (no interval at both: {', '.join(n for n, _ in unmatched)})" if unmatched else ""
    other = claims.NOT_HELD if held else claims.HELD
    if held and any(move["may"] for _, move in moves):
        return f"{MAY_CHANGE}: " + "; ".join(f"{n}: {m['text']}" for n, m in moves if m["may"]) + left
    if not held and all(move["may"] for _, move in moves) and not unmatched:
        return f"{MAY_CHANGE}: " + "; ".join(f"{n}: {m['text']}" for n, m in moves) + left
    if held:
        which = "no part moved"
    else:
        which = (f"the part not held at {l2} did not move" if len(moves) == 1
                 else f"the parts not held at {l2} did not all move")
    return (f"{STABLE}: {which} toward {other} by more than its own CI half-width at {l2} (from {l1}: "
            + "; ".join(f"{name} {move['change']:+.1f} points, {move['side']}, half-width {move['half']:.1f}"
                        for name, move in moves) + ")" + left)


def trend(cells: Sequence[tuple[str, float, Mapping[str, Any] | None]], kind: int | None) -> str:
    """The trend of one claim (`TREND_RULE`) from `cells`: (label, budget, claims row or None) at the base voxel,
    in increasing budget. A claim over several comparisons (a `parts` column) is followed part by part, so its
    weakest part at one budget is not compared with another part at the next."""
    cells = sorted(cells, key=lambda c: c[1])
    if len(cells) < 2:
        return f"{UNDECIDED}: one budget"
    (l1, b1, r1), (l2, b2, r2) = cells[-2:]
    untested = [label for label, _, row in cells[-2:] if row is None or row["verdict"] == claims.NOT_TESTED]
    if untested:
        return f"{UNDECIDED}: not tested at {' and '.join(untested)}"
    v1, v2 = r1["verdict"], r2["verdict"]
    if v1 != v2:
        return f"{MAY_CHANGE}: {v1} at {l1}, {v2} at {l2}"
    if kind is None:
        f1, f2 = failing_channels(r1["evidence"]), failing_channels(r2["evidence"])
        if f1 != f2:
            return (f"{MAY_CHANGE}: the channels below 10 Dice changed from {l1} to {l2} "
                    f"({', '.join(sorted(f1)) or 'none'} → {', '.join(sorted(f2)) or 'none'})")
        return f"{STABLE}: the same channels below 10 Dice at {l1} and {l2}"
    if claims.parts_of(r2):
        return _parts_trend(l1, b1, r1, l2, b2, r2, kind)
    move = _movement(l1, b1, r1, l2, b2, r2, kind)
    if move is None:
        return f"{UNDECIDED}: no interval at {l2}"
    return f"{MAY_CHANGE if move['may'] else STABLE}: {move['text']}"


def _cell(row: Mapping[str, Any] | None, kind: int | None) -> str:
    if row is None:
        return "-"
    verdict = row["verdict"]
    if kind is None and verdict != claims.NOT_TESTED:
        return f"{verdict} ({', '.join(sorted(failing_channels(row['evidence']))) or 'none'} < 10)"
    parts = claims.parts_of(row)
    if parts:  # each comparison's own interval, never one made of bounds from different ones
        return f"{verdict}: " + "; ".join(f"{p['name']} {_numbers(p)}" for p in parts)
    if _finite(row["estimate"], row["ci_low"], row["ci_high"]):
        return f"{verdict} {_numbers(row)}"
    return verdict


def _numbers(row: Mapping[str, Any]) -> str:
    if _finite(row["estimate"], row["ci_low"], row["ci_high"]):
        return f"{row['estimate']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"
    return f"{row['estimate']:+.1f} (no interval)" if _finite(row["estimate"]) else "not tested"


def claims_by_scale(tables: Mapping[str, pd.DataFrame], budgets: Mapping[str, float],
                    base: Sequence[str]) -> pd.DataFrame:
    """The claims of every point side by side: one row per claim (and federation, for the test-split claims),
    one column per point (`tables`' keys, in order) with its verdict and estimate [95% CI] (for "fails on": the
    failing channels), the verdicts as a line, and the trend (`trend`) over the points in `base` (the base voxel's,
    at `budgets`)."""
    rows: dict[tuple[str, str, str], dict[str, Mapping[str, Any]]] = {}
    for label, table in tables.items():
        for row in table.to_dict("records"):
            rows.setdefault((row["paper"], row["claim"], claim_subject(row)), {})[label] = row
    out = []
    for (paper, claim, subject), found in rows.items():
        kind = claim_kind([r["rule"] for r in found.values()])
        line = {"paper": paper, "claim": claim, "federation": subject or "-"}
        line.update({label: _cell(found.get(label), kind) for label in tables})
        line["verdicts"] = ", ".join(f"{found[label]['verdict'] if label in found else '-'} at {label}"
                                     for label in tables)
        line["trend"] = trend([(label, budgets[label], found.get(label)) for label in base], kind)
        out.append(line)
    return pd.DataFrame(out, columns=["paper", "claim", "federation", *tables, "verdicts", "trend"])


def target_gaps(dice: pd.DataFrame) -> pd.DataFrame:
    """Per point, the SL model's test Dice on each channel with a convergence target (`TARGETS`) and its distance
    from it ("87.8 (-2.2)"; "(met)" at or above), and how many targets it meets."""
    sl = dice[(dice["split"] == "test") & (dice["model"] == SL) & dice["channel"].isin(list(TARGETS))]
    rows = []
    for point, part in sl.groupby("point", sort=False):
        values = dict(zip(part["channel"], part["dice"]))
        row: dict[str, Any] = {"point": point, "SL steps": int(part["sl_steps"].iloc[0])}
        for channel, target in TARGETS.items():
            if channel in values:
                gap = values[channel] - target
                row[f"{channel} (≥ {target:g})"] = f"{values[channel]:.1f} ({'met' if gap >= 0 else f'{gap:+.1f}'})"
        row["met"] = f"{sum(values[c] >= t for c, t in TARGETS.items() if c in values)} of " \
                     f"{sum(c in values for c in TARGETS)}"
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(side: pd.DataFrame) -> str:
    """The claims at each budget as a short Markdown table (the one the project README shows, so a test can
    rebuild it from `claims_by_scale.csv`): per claim (and federation) the verdict at each point, with the estimate
    [95% CI] of a single comparison and the failing channels of a "fails on" claim (a claim over several
    comparisons: its verdict only; each part's interval is in claims_by_scale.md), and the trend's word."""
    points = [c for c in side.columns if c not in ("paper", "claim", "federation", "verdicts", "trend")]

    def short(cell: Any) -> str:
        text = str(cell)
        return text.split(":", 1)[0] if re.match(rf"({claims.HELD}|{claims.NOT_HELD}): ", text) else text

    rows = [{"paper": r["paper"],
             "claim": r["claim"] + (f" ({r['federation']})" if r["federation"] != "-" else ""),
             **{p: short(r[p]) for p in points}, "trend": str(r["trend"]).split(":", 1)[0]}
            for r in side.to_dict("records")]
    return pd.DataFrame(rows).to_markdown(index=False) if rows else ""


def points_side_by_side(points: Sequence[Mapping[str, Any]], n_flips: int = claims.N_FLIPS,
                        seed: int = 0) -> pd.DataFrame:
    """`claims_by_scale` of budget points (`fedseg.experiments.budget.find_points`, those that ran): each point's
    claims decided from its folder (`point_claims`), the trend over the base voxel's points at their SL steps."""
    tables = {p["label"]: point_claims(p, n_flips, seed) for p in points}
    budgets = {p["label"]: float(p["steps"]) for p in points}
    return claims_by_scale(tables, budgets, [p["label"] for p in points if not p.get("spacing_mm")])


def _method(model: str, federation: str) -> str:
    return model if federation == "-" else f"{model}: {federation}"


def budget_figure(dice: pd.DataFrame) -> plt.Figure:
    """Dice (%) on the test splits against the training steps per model (log x), one panel per channel and the
    mean, one line per model (SL black; each federation a colour, its global model dashed, its local model solid)
    over the base-voxel points; points at another voxel as open squares just right of their budget."""
    test = dice[dice["split"] == "test"]
    channels = list(dict.fromkeys(test["channel"]))
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(channels) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(
        len(channels) / cols)), squeeze=False, sharex=True)
    lines = list(dict.fromkeys(zip(test["model"], test["federation"])))
    federations = list(dict.fromkeys(f for _, f in lines if f != "-"))
    colours = {"-": "black", **{f: plt.cm.tab10(i % 10) for i, f in enumerate(federations)}}
    for ax, channel in zip(axes.flat, channels):
        part = test[test["channel"] == channel]
        for model, federation in lines:
            rows = part[(part["model"] == model) & (part["federation"] == federation)]
            base = rows[rows["spacing_mm"].isna()].sort_values("sl_steps")
            other = rows[rows["spacing_mm"].notna()]
            colour, style = colours[federation], "--" if model == GLOBAL else "-"
            ax.plot(base["sl_steps"], base["dice"], marker="o", ls=style, color=colour,
                    label=_method(model, federation))
            ax.scatter(other["sl_steps"] * 1.08, other["dice"], marker="s", facecolors="none", edgecolors=colour)
        if channel in TARGETS:
            ax.axhline(TARGETS[channel], ls=":", lw=1, color="grey", label="convergence target (SL)")
        ax.set_xscale("log")
        budgets = sorted(set(test["sl_steps"]))
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_title(channel.replace("_", " "))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(channels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("training steps per model (SL) = per client (FL)")
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice (%), test split")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the liver's panel: every line and the target
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle("Dice against training budget (lines: base voxel, FL global dashed; open squares: finer voxel, "
                 "drawn just right of their budget; dotted: the SL convergence target)")
    fig.tight_layout(rect=(0, 0.08 + 0.02 * math.ceil(len(labels) / 4), 1, 0.97))
    return fig


def _dice_table(dice: pd.DataFrame, split: str) -> pd.DataFrame:
    part = dice[dice["split"] == split]
    if part.empty:
        return pd.DataFrame()
    wide = part.pivot_table(index=["point", "model", "federation"], columns="channel", values="dice", sort=False)
    wide = wide[list(dict.fromkeys(part["channel"]))].round(1)
    hours = part.groupby(["point", "model", "federation"], sort=False)["cpu_hours"].first().round(2)
    return wide.assign(**{"CPU-h": hours}).reset_index()


def write_report(study: str | Path, points: Sequence[Mapping[str, Any]], command: str = "",
                 n_flips: int = claims.N_FLIPS, seed: int = 0) -> dict[str, Path]:
    """budget.csv, budget_cost.csv, budget.md, budget.png, claims_by_scale.{md,csv} in `study` from `points`
    (`fedseg.experiments.budget.find_points`)."""
    study = Path(study)
    points = [p for p in points if run_folder.run_record(p["folder"]).exists()]  # a point not started is left out
    dice = pd.concat([point_dice(p) for p in points], ignore_index=True) if points else pd.DataFrame()
    costs = {p["label"]: point_cost(p) for p in points}
    paths = {"csv": study / "budget.csv", "md": study / "budget.md", "png": study / "budget.png",
             "cost_csv": study / "budget_cost.csv", "claims_md": study / "claims_by_scale.md",
             "claims_csv": study / "claims_by_scale.csv"}
    dice.to_csv(paths["csv"], index=False)
    paths["validation_csv"] = study / "budget_validation.csv"
    kept = pd.read_csv(paths["validation_csv"]) if paths["validation_csv"].exists() else pd.DataFrame()
    found = []
    for p in points:  # a point kept without its checkpoints (a committed reference) keeps the rows it had
        rows = point_validation(p)
        if rows.empty and not kept.empty:
            rows = kept[kept["point"] == p["label"]]
        found.append(rows)
    found = [f for f in found if not f.empty]
    validation = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=VALIDATION_COLUMNS)
    validation.to_csv(paths["validation_csv"], index=False)
    side = points_side_by_side(points, n_flips, seed)
    side.to_csv(paths["claims_csv"], index=False)
    shown = side.drop(columns=["verdicts"])
    claims_md = ["# The papers' claims at each budget", "", command and f"`{command}`", "",
                 shown.to_markdown(index=False) if not shown.empty else "(no budget point has run yet)", "",
                 "Each cell: the verdict, then the estimate [95% CI] in Dice points (for 'fails on': the channels "
                 "below 10 Dice), decided by `fedseg.reporting.claims` on that point's folder. " + claims.NOTE, "",
                 TREND_RULE, ""]
    paths["claims_md"].write_text("\n".join(claims_md))
    if not dice.empty and (dice["split"] == "test").any():
        fig = budget_figure(dice)
        fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
        plt.close(fig)
    runs = study / "budget_runs.csv"
    wall = pd.read_csv(runs)["wall_s"].sum() if runs.exists() else float("nan")
    cost_rows = []
    for p in points:
        c = costs[p["label"]]
        cost_rows.append({"point": p["label"], "folder": Path(p["folder"]).name, "voxel (mm)": p["voxel_mm"][0],
                          "SL steps per model": p["steps"],
                          "FL rounds x local steps": f"{p['rounds']} x {p['local_steps']}",
                          **{f"{k} (s)": c[f"{k}_s"] for k in ("chain", "sweep", "nodes", "contrast")},
                          "total (s)": c["total_s"], "cores": c["cpus"], "CPU-h": round(c["cpu_hours"], 2)})
    pd.DataFrame(cost_rows).to_csv(paths["cost_csv"], index=False)
    total_hours = sum(c["cpu_hours"] for c in costs.values())
    total_s = sum(c["total_s"] for c in costs.values())
    lines = ["# Budget response: Dice against training budget", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "Rule: at scale k every training budget of the base profile is multiplied by k (each SL model's steps, the "
        "central model's, the localiser's); the federation keeps its rounds and each client trains steps // rounds "
        "local steps per round, so every FL client trains as many steps as its SL model at every scale (the "
        "equal-budget rule). A point at another voxel changes `preprocess.spacing` only (same data, same patch size).",
        "", "## Budget points and their cost", "",
        pd.DataFrame(cost_rows).to_markdown(index=False) if cost_rows else "(none yet)", "",
        f"**Total: {total_hours:.1f} CPU-hours** ({total_s:.0f} s of recorded work; CPU-hours = wall seconds x the "
        "machine's cores, those the runs held, not the ones they kept busy). "
        + (f"Wall time of the `budget` commands themselves: {wall:.0f} s ({wall / 3600:.2f} h, `budget_runs.csv`)."
           if np.isfinite(wall) else ""), "",
        "Parts: the chain (01-05 into the point's folder: SL, central, localiser, FedAvg with the profile's loss, "
        "BTCV), the sweep (the other federations), the node sets (`fedseg nodes`) and the contrast study "
        "(`fedseg contrast`, in `contrast/`). Each Dice row's CPU-h below is the notebook that trained it "
        "(02 for SL, the federation's 03).", ""]
    for split, title in (("test", "Dice (%) on the test splits"),
                         ("BTCV", "Dice (%) on BTCV (the chain's federation; SL and FL local: ensembles)")):
        table = _dice_table(dice, split) if not dice.empty else pd.DataFrame()
        if not table.empty:
            lines += [f"## {title}", "", table.to_markdown(index=False), ""]
    gaps = target_gaps(dice) if not dice.empty else pd.DataFrame()
    if not gaps.empty:
        lines += ["## How far SL is from the convergence targets", "",
                  "SL test Dice (%) per channel, and its distance from the target a converged model should reach "
                  "(organs 90, pancreas 75, liver and kidney tumours 50).", "", gaps.to_markdown(index=False), ""]
    finer = voxel_comparison(validation, dice, points) if not dice.empty else pd.DataFrame()
    if not finer.empty:
        lines += ["## The finer voxel against the base voxel at the same budget", "",
                  "The SL models' validation Dice (%) at the end of their budget (the last validation of each "
                  "model's history: what a setting is chosen on), the finer voxel's minus the base voxel's, and "
                  "the SL test Dice beside it (reported, not chosen on). Seconds: the four SL models' training "
                  "and validation, summed, as recorded (under whatever else the machine ran).", "",
                  finer.to_markdown(index=False), ""]
    if paths["png"].exists():
        lines += ["![Dice against training budget](budget.png)", ""]
    lines += ["## The claims at each budget", "",
              "Per claim: its verdict at each point, and the trend over the base voxel's budgets "
              "(the table with every comparison's estimate and interval: [claims_by_scale.md](claims_by_scale.md)).",
              "", summary_table(side), ""]
    for row in side.to_dict("records"):
        subject = f" ({row['federation']})" if row["federation"] != "-" else ""
        lines.append(f"- **{row['paper']}**: {row['claim']}{subject}: {row['verdicts']}. Trend: {row['trend']}.")
    lines += ["", TREND_RULE, ""]
    paths["md"].write_text("\n".join(lines))
    return paths
