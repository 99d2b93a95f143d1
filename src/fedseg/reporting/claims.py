"""The papers' qualitative claims, each decided from the numbers a run folder holds.

Every claim is a row: the paper, the claim, the federation it was tested on, the numbers that decide it,
a 95% confidence interval where there are cases, and a verdict computed by the rule written beside it:

- **held**: the comparison the claim makes comes out as claimed (for "A > B": the 95% CI of the mean paired
  difference lies above 0; for "fails on exactly these channels": the set of channels below 10 Dice is that set);
- **not held**: the run holds the numbers and they do not show it;
- **not tested**: nothing was tested: the run folder lacks the experiment (e.g. `fedseg nodes` did not run in
  it), the experiment lacks one side of the comparison (one node set; a contrast run without fedgin), or the
  comparison has fewer than `MIN_CASES` cases (no test at 2.5% could come out "held" on them).

**The interval.** Differences are paired by case. Where a claim pools several channels or organs, the statistic is
the unweighted mean over them of the mean paired difference. Channels scored on the same case (liver and liver
tumor on the liver test split; the four organs of a BTCV case) move together: the case, with all its channels, is
the unit (whole cases, so their correlation counts); cases of different datasets are independent. The CI inverts
a sign-flip (randomisation) test over whole cases (`flip_interval`): under "the mean difference is delta" each
case's differences are symmetric about delta, so negating whole cases leaves the statistic's law unchanged, which
makes the test exact at any number of cases and any mix of datasets and spreads (every subset of up to 12 cases
enumerated, else `N_FLIPS` random flips, seeded). "Held" needs the CI to exclude 0 on the claimed side, a one-sided
error of at most 2.5%: `simulated_false_held` counts how often zero-mean differences come out "held", and
`benchmarks/claims_calibration.py` prints that rate beside the percentile bootstrap this replaced (which resampled
each channel's cases on their own and, with 2 cases, gave [smallest, largest]: 20-24% "held" at n = 2). No test
is exact for a skewed law (the benchmark shows a left-skewed one); the flip test assumes symmetry, not normality.
A claim that needs every one of several comparisons ("at each node set", "A > B > C") shows each comparison's own
estimate and CI in its evidence; its numeric columns are those of the comparison nearest to failing, and it is
held when all are; its `parts` column lists every comparison's numbers.

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
from fedseg.published import SHEN_2022, SHEN_TABLE2, SHEN_TABLE2_CHANNELS
from fedseg.reporting.tables import save_table

HELD, NOT_HELD, NOT_TESTED = "held", "not held", "not tested"
VERDICTS = (HELD, NOT_HELD, NOT_TESTED)
#: Two-sided confidence of every interval; "held" is a one-sided decision at (1 - CONFIDENCE) / 2 = 2.5%.
CONFIDENCE = 0.95
#: Fewest cases a comparison needs, else it is "not tested": with n cases the smallest one-sided p-value a
#: sign-flip test can give is 2^-n, at most 2.5% from n = 6 on (2^-5 = 3.1%: below 6 nothing could be held).
MIN_CASES = 6
#: Sign flips drawn where there are more subsets of the cases than this (up to 12 cases every subset is used).
N_FLIPS = 4095
#: Correlation of two channels' paired differences on the same case used by the calibration simulation (what
#: liver / liver tumor and the BTCV organs showed).
CORRELATION = 0.32
#: A channel "fails" below this Dice (%), the threshold the claims of Shen et al. 2022 are read with.
FAIL_BELOW = 10.0
#: The channels on which Shen et al. 2022's FedAvg global model failed (its Table 2: 0.0 on liver, liver tumor and
#: spleen).
PAPER_FAILED = tuple(channel for channel, dice in zip(SHEN_TABLE2_CHANNELS, SHEN_TABLE2["FL global model (server)"])
                     if dice < FAIL_BELOW)
SHEN, SEGVIZ, FEDGIN = SHEN_2022, "Kanhere et al. (SegViz)", "FedGIN"
#: A row's columns. `parts`: for a claim over several comparisons, each one's name, estimate, CI and verdict as a
#: JSON list (what `fedseg.reporting.budget` follows part by part along the budget); empty for a single one.
COLUMNS = ["paper", "claim", "tested on", "evidence", "estimate", "ci_low", "ci_high", "verdict", "rule", "parts"]
NOTE = (f"Verdicts are computed from this run's per-case scores. 'A > B': held when the 95% CI of the mean paired "
        f"difference lies above 0 (channels or organs pooled by an unweighted mean; the CI inverts a sign-flip test "
        f"over whole cases, a case's channels flipped together). A claim over several comparisons shows each one's "
        f"own estimate [CI] and is held when all are. 'Fails': mean Dice below {FAIL_BELOW:.0f}%. Not tested: the "
        f"run folder holds no such experiment, or fewer than {MIN_CASES} cases (nothing could be held on them). "
        "Estimates in Dice points (%).")


def sign_flips(cases: int, n_flips: int = N_FLIPS, seed: int = 0) -> np.ndarray:
    """Which cases each flip negates, (flips, cases) booleans: every non-empty subset where there are at most
    `n_flips` of them (an exact test), else `n_flips` random ones (seeded; a Monte Carlo test, as valid)."""
    if 2**cases - 1 <= n_flips:
        return ((np.arange(1, 2**cases)[:, None] >> np.arange(cases)) & 1).astype(bool)
    return np.random.default_rng(seed).random((n_flips, cases)) < 0.5


def flip_interval(u: np.ndarray, a: np.ndarray, flips: np.ndarray,
                  confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate and CI of T = sum_i u_i from a sign-flip (randomisation) test over whole cases, inverted.

    u (..., cases): each case's contribution to the statistic; a (..., cases): how much it moves when every
    difference moves by 1 (sum 1). Under "the mean is delta", each case's differences are symmetric about
    delta, so negating whole cases' centred contributions leaves the statistic's law unchanged. A flip of the
    cases F exceeds the observed statistic iff delta >= delta_F = sum_F u / sum_F a, so the one-sided p-value
    (1 + #{flips at or beyond the observed}) / (flips + 1) is a step function of delta, and the bounds are order
    statistics of the delta_F: the lower bound is above 0 iff the one-sided p-value of 0 is at most
    (1 - confidence) / 2. Leading axes of u and a are batch axes (simulations). -inf/+inf where too few cases
    can reject at all.
    """
    estimate = u.sum(axis=-1)
    size = flips.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = (u @ flips.T) / (a @ flips.T)
    k = int(np.floor((1 - confidence) / 2 * (len(flips) + 1)))  # the k-th smallest delta_F is the lower bound
    if k < 1:
        inf = np.full(estimate.shape, np.inf)
        return estimate, -inf, inf
    low = np.partition(np.where(size > 0, delta, -np.inf), k - 1, axis=-1)[..., k - 1]
    high = -np.partition(np.where(size > 0, -delta, -np.inf), k - 1, axis=-1)[..., k - 1]
    return estimate, low, high


def case_contributions(strata: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """u, a for `flip_interval` from strata (..., cases, channels) of per-case paired differences, NaN where a
    case lacks a channel: the statistic is the unweighted mean over all channels of each channel's mean, and
    case i contributes u_i = sum over its channels c of d_ic / (n_c C), a_i = sum over them of 1 / (n_c C)."""
    total = sum(s.shape[-1] for s in strata)
    us, as_ = [], []
    for stratum in strata:
        stratum = np.asarray(stratum, dtype=float)
        scored = ~np.isnan(stratum)
        counts = scored.sum(axis=-2, keepdims=True)
        us.append((np.where(scored, stratum, 0.0) / counts).sum(axis=-1) / total)
        as_.append((scored / counts).sum(axis=-1) / total)
    return np.concatenate(us, axis=-1), np.concatenate(as_, axis=-1)


def _strata(groups: Mapping[str, np.ndarray | pd.Series]) -> list[np.ndarray]:
    """Arrays (cases, channels) for `case_contributions`: channels given as Series indexed by case id are joined
    where they share cases (whole cases); a plain array is a channel on cases of its own."""
    labelled = {name: v for name, v in groups.items() if isinstance(v, pd.Series) and len(v)}
    strata = [np.asarray(v, dtype=float)[:, None] for v in groups.values() if not isinstance(v, pd.Series) and len(v)]
    names = list(labelled)
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Any, int] = {}
    for i, name in enumerate(names):
        for case in labelled[name].index:
            parent[root(i)] = root(first.setdefault(case, i))
    members: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        members.setdefault(root(i), []).append(name)
    for names_ in members.values():
        strata.append(pd.concat({n: labelled[n] for n in names_}, axis=1).to_numpy(dtype=float))
    return strata


def stratified_mean_difference(groups: Mapping[str, np.ndarray | pd.Series], n_flips: int = N_FLIPS,
                               seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The unweighted mean over groups (channels, organs) of each group's mean paired difference, and its 95%
    CI from a sign-flip test over whole cases (`flip_interval`).

    A group given as a Series indexed by case id shares its cases with every other group holding the same ids
    (their differences on one case are flipped together); a group given as a plain array has cases of its own.
    NaN interval with fewer than `MIN_CASES` cases in all (no flip test could reject).
    """
    strata = _strata(groups)
    if not strata:
        return np.nan, np.nan, np.nan
    u, a = case_contributions(strata)
    estimate = float(u.sum())
    if u.shape[-1] < MIN_CASES:
        return estimate, np.nan, np.nan
    _, low, high = flip_interval(u, a, sign_flips(u.shape[-1], n_flips, seed), confidence)
    return estimate, float(low), float(high)


def simulate_differences(cases: int | Sequence[int], channels: int | Sequence[int] = 1,
                         correlation: float = CORRELATION, sd: Sequence[float] | None = None,
                         distribution: str = "normal", effect: float = 0.0, draws: int = 4000,
                         seed: int = 0) -> list[np.ndarray]:
    """`draws` simulated sets of paired differences (Dice points), one array (draws, cases, channels) per dataset.

    Dataset k has `cases[k]` cases and `channels[k]` channels scored on each (as liver and liver tumor), their
    differences on a case correlated `correlation`, standard deviation `sd[k]` (default 5 to 20 points across
    datasets, so they differ), mean `effect`. `distribution`: "normal", "t3" (heavy tails) or "left-skewed" (a
    centred, mirrored exponential: the skew that makes a one-sided test of "A > B" too liberal).
    """
    cases = [cases] if np.isscalar(cases) else list(cases)
    channels = [channels] * len(cases) if np.isscalar(channels) else list(channels)
    sd = list(np.linspace(5, 20, len(cases))) if sd is None else list(sd)
    rng = np.random.default_rng(seed)

    def noise(size: tuple[int, ...]) -> np.ndarray:
        if distribution == "normal":
            return rng.standard_normal(size)
        if distribution == "t3":
            return rng.standard_t(3, size) / np.sqrt(3.0)
        if distribution == "left-skewed":
            return 1.0 - rng.standard_exponential(size)
        raise ValueError(f"unknown distribution {distribution!r}")

    strata = []
    for n, c, s in zip(cases, channels, sd):
        shared = noise((draws, n, 1))
        strata.append(effect + s * (np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * noise((draws, n, c))))
    return strata


def simulated_false_held(cases: int | Sequence[int], channels: int | Sequence[int] = 1, *, n_flips: int = 1000,
                         seed: int = 0, **simulation: Any) -> float:
    """How often a claim "A > B" comes out "held" (its CI above 0) over `simulate_differences(cases, channels,
    **simulation)`: with effect 0 (the default), the false-"held" rate, nominally at most 2.5%. The same
    computation as the claims (`case_contributions`, `sign_flips`, `flip_interval`), vectorised over the draws;
    0 below `MIN_CASES` cases (not tested, so never held)."""
    u, a = case_contributions(simulate_differences(cases, channels, seed=seed, **simulation))
    if u.shape[-1] < MIN_CASES:
        return 0.0
    _, low, _ = flip_interval(u, a[0], sign_flips(u.shape[-1], n_flips, seed + 1))
    return float(np.mean(low > 0))


def _verdict(low: float, high: float, direction: int = 1) -> str:
    """Held if the interval lies on the claimed side of 0 (direction +1: above, -1: below)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return NOT_TESTED
    return HELD if (low > 0 if direction > 0 else high < 0) else NOT_HELD


def _compare(groups: Mapping[str, pd.Series], n_flips: int, seed: int, direction: int = 1) -> dict[str, Any]:
    """One comparison: estimate, CI, verdict, and its numbers as text ("+3.1 [+0.4, +5.8]")."""
    estimate, low, high = stratified_mean_difference(groups, n_flips, seed)
    verdict = _verdict(low, high, direction)
    case_ids = set().union(*(set(v.index) for v in groups.values())) if groups else set()
    if not groups:
        text = why = "no paired scores"
    elif verdict == NOT_TESTED:
        why = f"{len(case_ids)} paired cases, fewer than {MIN_CASES}"
        text = f"{estimate:+.1f} (not tested: {why})"
    else:
        text, why = f"{estimate:+.1f} [{low:+.1f}, {high:+.1f}]", ""
    return {"estimate": estimate, "ci_low": low, "ci_high": high, "verdict": verdict, "text": text, "why": why,
            "groups": len(groups), "cases": len(case_ids), "scores": sum(len(v) for v in groups.values())}


def _greater(paper: str, claim: str, tested_on: str, groups: Mapping[str, pd.Series], what: str,
             n_flips: int, seed: int, unit: str = "channels") -> dict[str, Any]:
    """A row for "A > B" from per-case differences A - B (Dice points) per group."""
    part = _compare(groups, n_flips, seed)
    if part["groups"] == 0:
        return _not_tested(paper, claim, f"{what}: no case scored by both")
    numbers = (f"{part['estimate']:+.1f} points [{part['ci_low']:+.1f}, {part['ci_high']:+.1f}]"
               if part["verdict"] != NOT_TESTED else f"{part['estimate']:+.1f} points, not tested: {part['why']}")
    return {"paper": paper, "claim": claim, "tested on": tested_on,
            "evidence": f"{what}: {numbers} ({part['groups']} {unit}, {part['cases']} cases, "
                        f"{part['scores']} paired scores)",
            "estimate": part["estimate"], "ci_low": part["ci_low"], "ci_high": part["ci_high"],
            "verdict": part["verdict"], "rule": f"held if the 95% CI lies above 0 (>= {MIN_CASES} cases)"}


def _every(paper: str, claim: str, tested_on: str, parts: Sequence[tuple[str, dict[str, Any]]], what: str,
           direction: int, rule: str) -> dict[str, Any]:
    """A row for a claim that needs every comparison in `parts` to hold: each part's own estimate [CI] in the
    evidence; the numeric columns are the part nearest to failing (lowest lower bound, or highest upper bound
    for a claimed decrease). Not held if a tested part is not held; else not tested if a part was not tested."""
    verdicts = [p["verdict"] for _, p in parts]
    verdict = (NOT_HELD if NOT_HELD in verdicts else NOT_TESTED if NOT_TESTED in verdicts or not parts else HELD)
    tested = [p for _, p in parts if p["verdict"] != NOT_TESTED]
    if tested:
        worst = (min(tested, key=lambda p: p["ci_low"]) if direction > 0 else max(tested, key=lambda p: p["ci_high"]))
        numbers = (worst["estimate"], worst["ci_low"], worst["ci_high"])
    else:
        numbers = (np.nan, np.nan, np.nan)
    listed = [{"name": name.rstrip(":"), **{k: (float(p[k]) if np.isfinite(p[k]) else None)
                                            for k in ("estimate", "ci_low", "ci_high")}, "verdict": p["verdict"]}
              for name, p in parts]
    return {"paper": paper, "claim": claim, "tested on": tested_on,
            "evidence": f"{what}: " + "; ".join(f"{name} {p['text']}" for name, p in parts),
            "estimate": numbers[0], "ci_low": numbers[1], "ci_high": numbers[2], "verdict": verdict, "rule": rule,
            "parts": json.dumps(listed, ensure_ascii=False)}


def parts_of(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The comparisons of a claims row over several (`_every`), from its `parts` column: [] for a single one
    (or a table written before the column existed)."""
    text = row.get("parts")
    return json.loads(text) if isinstance(text, str) and text else []


def _not_tested(paper: str, claim: str, why: str) -> dict[str, Any]:
    return {"paper": paper, "claim": claim, "tested on": "-", "evidence": why, "estimate": np.nan,
            "ci_low": np.nan, "ci_high": np.nan, "verdict": NOT_TESTED, "rule": "-"}


def _own_scores(scores: pd.DataFrame, model_of: Mapping[str, str]) -> pd.DataFrame:
    """Per-case Dice (%) of `model_of[dataset]` on its own dataset's test cases and owned channels."""
    parts = [scores[(scores["model"] == model) & (scores["dataset"] == dataset)
                    & scores["channel"].isin(owned_channels(dataset))] for dataset, model in model_of.items()]
    out = pd.concat(parts).dropna(subset=["dice"])
    return out.assign(dice=out["dice"] * 100)


def _paired(a: pd.DataFrame, b: pd.DataFrame, group: str, value: str = "dice") -> dict[str, pd.Series]:
    """Per group, the per-case differences a - b on the cases both scored, indexed by case id (groups holding
    the same case ids were scored on the same cases)."""
    merged = a.merge(b, on=[group, "case_id"], suffixes=("_a", "_b"))
    return {name: pd.Series((g[f"{value}_a"] - g[f"{value}_b"]).to_numpy(), index=g["case_id"].to_numpy())
            for name, g in merged.groupby(group, sort=False)}


def federation_label(folder: Path) -> str:
    """"fedavg, loss dice_ce": method and loss of the federation whose files are in `folder`, from its resolved
    configuration (`fl/config.json`), else from its `run.json` (the profile, then 03's parameters over it)."""
    cfg, record = run_folder.federation_config(folder), run_folder.run_record(folder)
    if cfg is not None:
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
                           n_flips: int = N_FLIPS, seed: int = 0) -> list[dict[str, Any]]:
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
                             _paired(local, sl, "channel"), "FL local - SL, mean over channels", n_flips, seed))
    claim = "the FL global model fails (< 10 Dice) on liver, liver tumor and spleen, and not elsewhere"
    glob = _own_scores(fl_scores, {d: "fl-global" for d in datasets})
    means = glob.groupby("channel", sort=False)["dice"].mean()
    failed = sorted(c for c, v in means.items() if v < FAIL_BELOW)
    expected = sorted(c for c in PAPER_FAILED if c in means.index)
    if not expected:
        rows.append(_not_tested(SHEN, claim, "no FL global scores on liver, liver tumor or spleen"))
        return rows
    values = ", ".join(f"{c.replace('_', ' ')} {v:.1f}" for c, v in means.items())
    rows.append({"paper": SHEN, "claim": claim, "tested on": tested_on,
                 "evidence": f"fails on: {', '.join(c.replace('_', ' ') for c in failed) or 'none'} "
                             f"(FL global: {values})",
                 "estimate": float(len(failed)), "ci_low": np.nan, "ci_high": np.nan,
                 "verdict": HELD if failed == expected else NOT_HELD,
                 "rule": "held if the channels below 10 Dice are exactly these"})
    return rows


def _btcv_organ(scores: pd.DataFrame, method: str) -> pd.DataFrame:
    out = scores[scores["method"] == method].dropna(subset=["dice"])
    return out.assign(dice=out["dice"] * 100)


def shen_btcv_claims(btcv: pd.DataFrame, tested_on: str, n_flips: int = N_FLIPS,
                     seed: int = 0) -> list[dict[str, Any]]:
    """Shen et al. 2022 on BTCV: processed FL local ensemble > ensemble > FL global; FL local > SL (ensembles)."""
    present = set(btcv["method"])
    rows = []
    chain = [(LOCAL_PP, LOCAL), (LOCAL, GLOBAL)]
    claim = "on BTCV, the post-processed FL local ensemble > the ensemble > the FL global model"
    if all(m in present for pair in chain for m in pair):
        parts = [(f"{a} - {b}:", _compare(_paired(_btcv_organ(btcv, a), _btcv_organ(btcv, b), "organ"), n_flips,
                                          seed)) for a, b in chain]
        rows.append(_every(SHEN, claim, tested_on, parts, "mean over organs, whole cases", 1,
                           "held if both CIs lie above 0"))
    else:
        rows.append(_not_tested(SHEN, claim, "no BTCV scores of these methods in this run"))
    if LOCAL in present and SL in present:
        rows.append(_greater(SHEN, "FL local > SL on BTCV (ensembles)", tested_on,
                             _paired(_btcv_organ(btcv, LOCAL), _btcv_organ(btcv, SL), "organ"),
                             "FL local - SL, mean over organs", n_flips, seed, unit="organs"))
    else:
        rows.append(_not_tested(SHEN, "FL local > SL on BTCV (ensembles)", "no BTCV scores of both in this run"))
    return rows


def segviz_claims(nodes: pd.DataFrame | None, n_flips: int = N_FLIPS, seed: int = 0) -> list[dict[str, Any]]:
    """SegViz (Kanhere et al.): SegViz > conventional FL at each node set; conventional FL degrades as nodes are
    added (on the organs both node sets hold: a set with a harder organ added is not "worse" for it)."""
    first, second = "SegViz > conventional FL at each node set", "conventional FL degrades as nodes are added"
    if nodes is None or nodes.empty:
        why = "`python -m fedseg nodes` did not run in this folder"
        return [_not_tested(SEGVIZ, first, why), _not_tested(SEGVIZ, second, why)]
    scored = nodes.dropna(subset=["dice"]).assign(dice=lambda d: d["dice"] * 100)
    sets = sorted((s for s in scored["setup"].unique() if s.endswith("-node")), key=lambda s: int(s.split("-")[0]))
    if not sets:
        why = "no node set in the SegViz scores"
        return [_not_tested(SEGVIZ, first, why), _not_tested(SEGVIZ, second, why)]
    tested_on = "BTCV, node sets " + ", ".join(sets)
    parts = []
    for setup in sets:
        part = scored[scored["setup"] == setup]
        parts.append((setup, _compare(_paired(part[part["model"] == "SegViz"],
                                              part[part["model"] == "Conventional FL"], "organ"), n_flips, seed)))
    rows = [_every(SEGVIZ, first, tested_on, parts, "SegViz - conventional FL, mean over the set's organs", 1,
                   "held if every node set's CI lies above 0")]
    if len(sets) < 2:
        rows.append(_not_tested(SEGVIZ, second, f"one node set ({sets[0]}): nothing to compare"))
        return rows
    fl = scored[scored["model"] == "Conventional FL"]
    steps = []
    for before, after in zip(sets, sets[1:]):
        change = _paired(fl[fl["setup"] == after], fl[fl["setup"] == before], "organ")
        organs = ", ".join(o.replace("_", " ") for o in change) or "no organ in common"
        steps.append((f"{before} → {after} ({organs}):", _compare(change, n_flips, seed, direction=-1)))
    rows.append(_every(SEGVIZ, second, tested_on, steps,
                       "conventional FL, change of the mean over the organs both sets hold, paired by case", -1,
                       "held if every step's CI lies below 0"))
    return rows


def fedgin_claims(contrast: pd.DataFrame | None, mri_like: Sequence[str], n_flips: int = N_FLIPS,
                  seed: int = 0) -> list[dict[str, Any]]:
    """FedGIN: GIN raises cross-contrast Dice (the FL global model with vs without GIN, on each channel tested in
    the contrast its owner did not train on)."""
    claim = "GIN raises cross-contrast Dice (FL global model, fedgin vs fedavg)"
    if contrast is None or contrast.empty:
        return [_not_tested(FEDGIN, claim, "`python -m fedseg contrast` did not run in this folder")]
    missing = [m for m in ("fedgin", "fedavg") if not (contrast["model"] == f"{m}-global").any()]
    if missing:
        return [_not_tested(FEDGIN, claim, f"the contrast run has no {' or '.join(missing)} global model scores")]
    trained = {c: (MRI if d in mri_like else CT) for d in TRAIN_DATASETS for c in owned_channels(d)}
    cross = contrast[contrast["contrast"] != contrast["channel"].map(trained)].dropna(subset=["dice"])
    cross = cross.assign(dice=cross["dice"] * 100, case_id=cross["case_id"] + "/" + cross["contrast"])
    gin, avg = (cross[cross["model"] == f"{m}-global"] for m in ("fedgin", "fedavg"))
    return [_greater(FEDGIN, claim, f"test cases in the other contrast (MRI-like: {', '.join(mri_like)})",
                     _paired(gin, avg, "channel"), "fedgin - fedavg cross-contrast Dice, mean over channels",
                     n_flips, seed)]


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def federation_folders(run_dir: Path) -> list[Path]:
    """The run folder and each sub-folder (a compared loss, a swept method) holding FL test scores."""
    folders = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir())
    return [f for f in folders if run_folder.metrics_file(f, "fl_test_dice_per_case.csv").exists()]


def distinct_federations(run_dir: Path) -> list[tuple[list[Path], pd.DataFrame]]:
    """`federation_folders`, a federation found twice (the same method and loss, the same per-case test scores:
    the chain's FedAvg and the sweep's `fedavg-dice_ce/`) listed once with every folder that holds it."""
    found: list[tuple[list[Path], pd.DataFrame]] = []
    for folder in federation_folders(run_dir):
        scores = pd.read_csv(run_folder.metrics_file(folder, "fl_test_dice_per_case.csv"))
        same = next((f for f, s in found if federation_label(f[0]) == federation_label(folder) and s.equals(scores)),
                    None)
        if same is None:
            found.append(([folder], scores))
        else:
            same.append(folder)
    return found


def _where(run_dir: Path, folders: Sequence[Path]) -> str:
    """" (`fedavg-dice_ce/`)" for a sub-run; " (also `fedavg-dice_ce/`)" for the run's own federation found again."""
    subs = ", ".join(f"`{f.name}/`" for f in folders if f != run_dir)
    if not subs:
        return ""
    return f" (also {subs})" if run_dir in folders else f" ({subs})"


def claims_table(run_dir: str | Path, n_flips: int = N_FLIPS, seed: int = 0) -> pd.DataFrame:
    """Every claim, decided from `run_dir`'s files (and its sub-runs' FL scores: one set of test-split claims per
    distinct federation). `seed` draws the sign flips where there are too many subsets of the cases to use all."""
    run_dir = Path(run_dir)
    metrics = run_folder.metrics_dir(run_dir)
    sl = _read(run_folder.sl_metrics_file(run_dir, "test_dice_per_case.csv"))
    rows: list[dict[str, Any]] = []
    federations = distinct_federations(run_dir)
    for folders, scores in federations:
        rows += shen_test_split_claims(sl, scores, f"test splits, {federation_label(folders[0])}"
                                                   f"{_where(run_dir, folders)}", n_flips, seed)
    if not federations:
        for claim in ("FL local > SL on average (test splits)",
                      "the FL global model fails (< 10 Dice) on liver, liver tumor and spleen, and not elsewhere"):
            rows.append(_not_tested(SHEN, claim, "no federation in this run folder"))
    btcv = _read(metrics / "btcv_per_case.csv")
    if btcv is None:
        for claim in ("on BTCV, the post-processed FL local ensemble > the ensemble > the FL global model",
                      "FL local > SL on BTCV (ensembles)"):
            rows.append(_not_tested(SHEN, claim, "04 (BTCV) did not run in this folder"))
    else:
        rows += shen_btcv_claims(btcv, f"BTCV, {federation_label(run_dir)}", n_flips, seed)
    rows += segviz_claims(_read(metrics / "segviz_nodes_per_case.csv"), n_flips, seed)
    record = run_folder.run_record(run_dir)
    cfg = json.loads(record.read_text()).get("profile_config", {}) if record.exists() else {}
    mri_like = tuple(cfg.get("data", {}).get("phantom", {}).get("mri_like") or ())
    rows += fedgin_claims(_read(metrics / "contrast_per_case.csv"), mri_like, n_flips, seed)
    return pd.DataFrame(rows, columns=COLUMNS)


def verdicts_in(markdown: str) -> list[str]:
    """The verdict cell of every claims row of a Markdown table (a README's), in order: whole cells, so "held"
    is not found inside "not held"."""
    out = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) >= 2 and cells[0] in (SHEN, SEGVIZ, FEDGIN) and cells[-1] in VERDICTS:
            out.append(cells[-1])
    return out


def save_claims(run_dir: str | Path, n_flips: int = N_FLIPS, seed: int = 0) -> pd.DataFrame:
    """`claims_table` written as `tables/claims.{csv,md}` (the README shows the markdown)."""
    table = claims_table(run_dir, n_flips, seed)
    shown = table[["paper", "claim", "tested on", "evidence", "verdict"]].set_index("paper")
    save_table(shown, run_dir, "claims", note=NOTE)
    table.to_csv(run_folder.table_file(run_dir, "claims"), index=False)
    return table
