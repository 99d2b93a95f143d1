"""The papers' qualitative claims, each decided from the numbers a run folder holds.

Every claim is a row: the paper, the claim, the federation it was tested on, the numbers that decide it,
a bootstrap 95% CI where there are cases, and a verdict computed by the rule written beside it:

- **held**: the comparison the claim makes comes out as claimed (for "A > B": the CI of the mean paired
  difference lies above 0; for "fails on exactly these channels": the set of channels below 10 Dice is that set);
- **not held**: the run holds the numbers and they do not show it;
- **not tested at this scale**: the run folder lacks the experiment (e.g. `fedseg nodes` did not run in it).

Differences are paired by case. Where a claim pools several channels or organs, the statistic is the
unweighted mean over them of the mean paired difference, and the bootstrap resamples the cases of each
channel (organ) independently (a stratified percentile bootstrap, `scipy.stats.bootstrap`, seeded).
Nothing here is typed from a result: change the run's numbers and the verdicts change
(`tests/test_claims.py` builds run folders both ways).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedseg import run_folder
from fedseg.data.labels import TRAIN_DATASETS, owned_channels
from fedseg.data.transforms import CT, MRI
from fedseg.evaluate.external import GLOBAL, LOCAL, LOCAL_PP, SL
from fedseg.reporting.report import save_table

HELD, NOT_HELD, NOT_TESTED = "held", "not held", "not tested at this scale"
#: A channel "fails" below this Dice (%), the threshold the claims of Shen et al. 2022 are read with.
FAIL_BELOW = 10.0
#: The channels on which Shen et al. 2022's FedAvg global model scored 0.0 (its Table 2).
PAPER_FAILED = ("liver", "liver_tumor", "spleen")
SHEN, SEGVIZ, FEDGIN = "Shen et al. 2022", "Kanhere et al. (SegViz)", "FedGIN"
COLUMNS = ["paper", "claim", "tested on", "evidence", "estimate", "ci_low", "ci_high", "verdict", "rule"]
NOTE = (f"Verdicts are computed from this run's per-case scores. 'A > B': held when the bootstrap 95% CI of the "
        f"mean paired difference (cases paired; channels or organs pooled by an unweighted mean, cases resampled "
        f"within each) lies above 0. 'Fails': mean Dice below {FAIL_BELOW:.0f}%. Not tested: the run folder holds "
        "no such experiment. Estimates in Dice points (%).")


def stratified_mean_difference(groups: Mapping[str, np.ndarray], n_boot: int = 2000, seed: int = 0,
                               confidence: float = 0.95) -> tuple[float, float, float]:
    """The unweighted mean over groups of each group's mean (e.g. per-case paired differences per channel), and
    its percentile bootstrap CI resampling each group's cases independently. NaN CI if a group has < 2 cases."""
    samples = [np.asarray(v, dtype=float) for v in groups.values() if len(v)]
    if not samples:
        return np.nan, np.nan, np.nan
    estimate = float(np.mean([s.mean() for s in samples]))
    if any(len(s) < 2 for s in samples):
        return estimate, np.nan, np.nan
    if all(np.ptp(s) == 0 for s in samples):  # no spread: every resample gives the estimate
        return estimate, estimate, estimate
    from scipy.stats import bootstrap

    def statistic(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([x.mean(axis=axis) for x in xs], axis=0)

    result = bootstrap(tuple(samples), statistic, n_resamples=n_boot, confidence_level=confidence, paired=False,
                       vectorized=True, method="percentile", rng=np.random.default_rng(seed))
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def _greater(paper: str, claim: str, tested_on: str, groups: Mapping[str, np.ndarray], what: str,
             n_boot: int, seed: int, unit: str = "channels") -> dict[str, Any]:
    """A row for "A > B" from per-case differences A - B (Dice points) per group."""
    estimate, low, high = stratified_mean_difference(groups, n_boot, seed)
    cases = sum(len(v) for v in groups.values())
    verdict = HELD if np.isfinite(low) and low > 0 else NOT_HELD
    return {"paper": paper, "claim": claim, "tested on": tested_on,
            "evidence": f"{what}: {estimate:+.1f} points [{low:+.1f}, {high:+.1f}] "
                        f"({len(groups)} {unit}, {cases} paired scores)",
            "estimate": estimate, "ci_low": low, "ci_high": high, "verdict": verdict,
            "rule": "held if the CI lies above 0"}


def _not_tested(paper: str, claim: str, why: str) -> dict[str, Any]:
    return {"paper": paper, "claim": claim, "tested on": "-", "evidence": why, "estimate": np.nan,
            "ci_low": np.nan, "ci_high": np.nan, "verdict": NOT_TESTED, "rule": "-"}


def _own_scores(scores: pd.DataFrame, model_of: Mapping[str, str]) -> pd.DataFrame:
    """Per-case Dice (%) of `model_of[dataset]` on its own dataset's test cases and owned channels."""
    parts = [scores[(scores["model"] == model) & (scores["dataset"] == dataset)
                    & scores["channel"].isin(owned_channels(dataset))] for dataset, model in model_of.items()]
    out = pd.concat(parts).dropna(subset=["dice"])
    return out.assign(dice=out["dice"] * 100)


def _paired(a: pd.DataFrame, b: pd.DataFrame, group: str, value: str = "dice") -> dict[str, np.ndarray]:
    """Per group, the per-case differences a - b on the cases both scored."""
    merged = a.merge(b, on=[group, "case_id"], suffixes=("_a", "_b"))
    return {name: (g[f"{value}_a"] - g[f"{value}_b"]).to_numpy() for name, g in merged.groupby(group, sort=False)}


def federation_label(folder: Path) -> str:
    """"fedavg, loss dice_ce": method and loss of the federation whose files are in `folder`, from its resolved
    configuration (`fl/config.json`), else from its `run.json` (the profile, then 03's parameters over it)."""
    config, record = run_folder.fl_config(folder), run_folder.run_record(folder)
    if config.exists():
        cfg = json.loads(config.read_text())
        method, loss = cfg.get("federated", {}).get("method"), cfg.get("train", {}).get("loss")
    elif record.exists():
        run = json.loads(record.read_text())
        profile = run.get("profile_config", {})
        params = run.get("notebooks", {}).get("03_federated_training", {}).get("parameters", {})
        method = params.get("method") or profile.get("federated", {}).get("method") or "fedavg"
        loss = params.get("loss") or profile.get("train", {}).get("loss")
    else:
        return "FL"
    return f"{method or 'fedavg'}, loss {loss or '?'}"


def shen_test_split_claims(sl_scores: pd.DataFrame | None, fl_scores: pd.DataFrame, tested_on: str,
                           n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Shen et al. 2022 on the test splits: FL local > SL on average; the FL global model fails (< 10 Dice) on
    liver, liver tumor and spleen and not elsewhere."""
    datasets = [d for d in TRAIN_DATASETS if (fl_scores["dataset"] == d).any()]
    rows = []
    local = _own_scores(fl_scores, {d: f"fl-local-{d}" for d in datasets})
    if sl_scores is None:
        rows.append(_not_tested(SHEN, "FL local > SL on average (test splits)", "no SL scores in this run"))
    else:
        sl = _own_scores(sl_scores, {d: f"sl-{d}" for d in datasets})
        rows.append(_greater(SHEN, "FL local > SL on average (test splits)", tested_on,
                             _paired(local, sl, "channel"), "FL local - SL, mean over channels", n_boot, seed))
    glob = _own_scores(fl_scores, {d: "fl-global" for d in datasets})
    means = glob.groupby("channel", sort=False)["dice"].mean()
    failed = sorted(c for c, v in means.items() if v < FAIL_BELOW)
    expected = sorted(c for c in PAPER_FAILED if c in means.index)
    values = ", ".join(f"{c.replace('_', ' ')} {v:.1f}" for c, v in means.items())
    rows.append({"paper": SHEN, "claim": "the FL global model fails (< 10 Dice) on liver, liver tumor and spleen, "
                 "and not elsewhere", "tested on": tested_on,
                 "evidence": f"fails on: {', '.join(c.replace('_', ' ') for c in failed) or 'none'} "
                             f"(FL global: {values})",
                 "estimate": float(len(failed)), "ci_low": np.nan, "ci_high": np.nan,
                 "verdict": HELD if failed == expected and expected else NOT_HELD,
                 "rule": "held if the channels below 10 Dice are exactly these"})
    return rows


def _btcv_organ(scores: pd.DataFrame, method: str) -> pd.DataFrame:
    out = scores[scores["method"] == method].dropna(subset=["dice"])
    return out.assign(dice=out["dice"] * 100)


def shen_btcv_claims(btcv: pd.DataFrame, tested_on: str, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Shen et al. 2022 on BTCV: processed FL local ensemble > ensemble > FL global; FL local > SL (ensembles)."""
    present = set(btcv["method"])
    rows = []
    chain = [(LOCAL_PP, LOCAL), (LOCAL, GLOBAL)]
    if all(m in present for pair in chain for m in pair):
        parts = [stratified_mean_difference(_paired(_btcv_organ(btcv, a), _btcv_organ(btcv, b), "organ"), n_boot, seed)
                 for a, b in chain]
        held = all(np.isfinite(low) and low > 0 for _, low, _ in parts)
        evidence = "; ".join(f"{a} - {b}: {e:+.1f} [{lo:+.1f}, {hi:+.1f}]" for (a, b), (e, lo, hi) in zip(chain, parts))
        rows.append({"paper": SHEN, "claim": "on BTCV, the post-processed FL local ensemble > the ensemble > the FL "
                     "global model", "tested on": tested_on, "evidence": f"{evidence} (mean over organs)",
                     "estimate": min(e for e, _, _ in parts), "ci_low": min(lo for _, lo, _ in parts),
                     "ci_high": min(hi for _, _, hi in parts), "verdict": HELD if held else NOT_HELD,
                     "rule": "held if both CIs lie above 0"})
    else:
        rows.append(_not_tested(SHEN, "on BTCV, the post-processed FL local ensemble > the ensemble > the FL global "
                                "model", "no BTCV scores of these methods in this run"))
    if LOCAL in present and SL in present:
        rows.append(_greater(SHEN, "FL local > SL on BTCV (ensembles)", tested_on,
                             _paired(_btcv_organ(btcv, LOCAL), _btcv_organ(btcv, SL), "organ"),
                             "FL local - SL, mean over organs", n_boot, seed, unit="organs"))
    else:
        rows.append(_not_tested(SHEN, "FL local > SL on BTCV (ensembles)", "no BTCV scores of both in this run"))
    return rows


def segviz_claims(nodes: pd.DataFrame | None, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """SegViz (Kanhere et al.): SegViz > conventional FL at each node set; conventional FL degrades as nodes are
    added."""
    first, second = "SegViz > conventional FL at each node set", "conventional FL degrades as nodes are added"
    if nodes is None or nodes.empty:
        why = "`python -m fedseg nodes` did not run in this folder"
        return [_not_tested(SEGVIZ, first, why), _not_tested(SEGVIZ, second, why)]
    scored = nodes.dropna(subset=["dice"]).assign(dice=lambda d: d["dice"] * 100)
    sets = sorted((s for s in scored["setup"].unique() if s.endswith("-node")), key=lambda s: int(s.split("-")[0]))
    parts, evidence = [], []
    for setup in sets:
        part = scored[scored["setup"] == setup]
        result = stratified_mean_difference(_paired(part[part["model"] == "SegViz"],
                                                    part[part["model"] == "Conventional FL"], "organ"), n_boot, seed)
        parts.append(result)
        evidence.append(f"{setup} {result[0]:+.1f} [{result[1]:+.1f}, {result[2]:+.1f}]")
    held = bool(parts) and all(np.isfinite(low) and low > 0 for _, low, _ in parts)
    rows = [{"paper": SEGVIZ, "claim": first, "tested on": "BTCV, node sets " + ", ".join(sets),
             "evidence": "SegViz - conventional FL, mean over the set's organs: " + "; ".join(evidence),
             "estimate": min(e for e, _, _ in parts) if parts else np.nan,
             "ci_low": min(lo for _, lo, _ in parts) if parts else np.nan,
             "ci_high": min(hi for _, _, hi in parts) if parts else np.nan,
             "verdict": HELD if held else NOT_HELD, "rule": "held if every node set's CI lies above 0"}]
    fl = scored[scored["model"] == "Conventional FL"]
    per_case = fl.groupby(["setup", "case_id"])["dice"].mean()  # each case's mean over the set's organs
    steps, evidence = [], []
    for before, after in zip(sets, sets[1:]):
        drop = (per_case[after] - per_case[before]).dropna().to_numpy()
        result = stratified_mean_difference({"cases": drop}, n_boot, seed)
        steps.append(result)
        evidence.append(f"{before} → {after}: {result[0]:+.1f} [{result[1]:+.1f}, {result[2]:+.1f}]")
    held = bool(steps) and all(np.isfinite(high) and high < 0 for _, _, high in steps)
    rows.append({"paper": SEGVIZ, "claim": second, "tested on": "BTCV, node sets " + ", ".join(sets),
                 "evidence": "conventional FL, change of the per-case mean over the set's organs: "
                             + "; ".join(evidence),
                 "estimate": max((e for e, _, _ in steps), default=np.nan),
                 "ci_low": max((lo for _, lo, _ in steps), default=np.nan),
                 "ci_high": max((hi for _, _, hi in steps), default=np.nan),
                 "verdict": HELD if held else NOT_HELD, "rule": "held if every step's CI lies below 0"})
    return rows


def fedgin_claims(contrast: pd.DataFrame | None, mri_like: Sequence[str], n_boot: int = 2000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """FedGIN: GIN raises cross-contrast Dice (the FL global model with vs without GIN, on each channel tested in
    the contrast its owner did not train on)."""
    claim = "GIN raises cross-contrast Dice (FL global model, fedgin vs fedavg)"
    if contrast is None or contrast.empty:
        return [_not_tested(FEDGIN, claim, "`python -m fedseg contrast` did not run in this folder")]

    trained = {c: (MRI if d in mri_like else CT) for d in TRAIN_DATASETS for c in owned_channels(d)}
    cross = contrast[contrast["contrast"] != contrast["channel"].map(trained)].dropna(subset=["dice"])
    cross = cross.assign(dice=cross["dice"] * 100, case_id=cross["case_id"] + "/" + cross["contrast"])
    gin, avg = (cross[cross["model"] == f"{m}-global"] for m in ("fedgin", "fedavg"))
    return [_greater(FEDGIN, claim, f"test cases in the other contrast (MRI-like: {', '.join(mri_like)})",
                     _paired(gin, avg, "channel"), "fedgin - fedavg cross-contrast Dice, mean over channels",
                     n_boot, seed)]


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def federation_folders(run_dir: Path) -> list[Path]:
    """The run folder and each sub-folder (a compared loss, a swept method) holding FL test scores."""
    folders = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir())
    return [f for f in folders if run_folder.metrics_file(f, "fl_test_dice_per_case.csv").exists()]


def claims_table(run_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every claim, decided from `run_dir`'s files (and its sub-runs' FL scores: one set of test-split claims per
    federation)."""
    run_dir = Path(run_dir)
    metrics = run_folder.metrics_dir(run_dir)
    sl = _read(metrics / "test_dice_per_case.csv")
    rows: list[dict[str, Any]] = []
    folders = federation_folders(run_dir)
    for folder in folders:
        where = "" if folder == run_dir else f" (`{folder.name}/`)"  # a sub-run: a compared loss, a swept method
        rows += shen_test_split_claims(sl, pd.read_csv(run_folder.metrics_file(folder, "fl_test_dice_per_case.csv")),
                                       f"test splits, {federation_label(folder)}{where}", n_boot, seed)
    if not folders:
        for claim in ("FL local > SL on average (test splits)",
                      "the FL global model fails (< 10 Dice) on liver, liver tumor and spleen, and not elsewhere"):
            rows.append(_not_tested(SHEN, claim, "no federation in this run folder"))
    btcv = _read(metrics / "btcv_per_case.csv")
    if btcv is None:
        for claim in ("on BTCV, the post-processed FL local ensemble > the ensemble > the FL global model",
                      "FL local > SL on BTCV (ensembles)"):
            rows.append(_not_tested(SHEN, claim, "04 (BTCV) did not run in this folder"))
    else:
        rows += shen_btcv_claims(btcv, f"BTCV, {federation_label(run_dir)}", n_boot, seed)
    rows += segviz_claims(_read(metrics / "segviz_nodes_per_case.csv"), n_boot, seed)
    record = run_folder.run_record(run_dir)
    cfg = json.loads(record.read_text()).get("profile_config", {}) if record.exists() else {}
    mri_like = tuple(cfg.get("data", {}).get("phantom", {}).get("mri_like") or ())
    rows += fedgin_claims(_read(metrics / "contrast_per_case.csv"), mri_like, n_boot, seed)
    return pd.DataFrame(rows, columns=COLUMNS)


def save_claims(run_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """`claims_table` written as `tables/claims.{csv,md}` (the README shows the markdown)."""
    table = claims_table(run_dir, n_boot, seed)
    shown = table[["paper", "claim", "tested on", "evidence", "verdict"]].set_index("paper")
    save_table(shown, run_dir, "claims", note=NOTE)
    table.to_csv(run_folder.table_file(run_dir, "claims"), index=False)
    return table
