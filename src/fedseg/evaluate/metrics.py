"""Segmentation metrics and statistics of the external evaluation on BTCV (liver, spleen, pancreas, kidney).

Per case and organ (`score_masks`, `score_case`), on binary 3D masks with the physical voxel spacing
(mm, same axis order as the arrays):

- dice: MONAI `compute_dice`;
- nsd: normalised surface Dice at a per-organ tolerance in mm, MONAI `compute_surface_dice`
  (boundary voxels of each mask within the tolerance of the other's boundary, both directions);
- hd95: symmetric 95th-percentile Hausdorff distance in mm, MONAI `compute_hausdorff_distance`.

Empty masks (MONAI returns NaN or inf for these; the study's convention is applied here instead):

- ground truth empty: all three metrics NaN, `truth_empty` True. The organ is not scored for that case
  (it is absent or was not annotated), whatever the prediction; `pred_empty` still records whether
  something was predicted, so false-positive organs stay visible.
- prediction empty, ground truth not: dice 0, nsd 0, hd95 = the diagonal of the volume's field of view in
  mm, sqrt(sum((shape_i * spacing_i)^2)), an upper bound on any distance in the image; `pred_empty` True.
  A missed organ is scored as the worst result, never dropped from the mean.
- both non-empty: MONAI's values.

Statistics over cases (`summarise`, `paired_test`) take the long-form scores table with columns
method, case_id, organ, dice, nsd, hd95, pred_empty, truth_empty (one row per method, case and organ).
NaN metrics (ground truth empty) are left out of means, CIs and tests. Confidence intervals are
percentile bootstraps over cases (`scipy.stats.bootstrap`) with a fixed seed; p-values are Wilcoxon
signed-rank tests on the cases both methods scored (`scipy.stats.wilcoxon`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import stats

ORGANS: tuple[str, ...] = ("liver", "spleen", "pancreas", "kidney")

# NSD tolerance in mm per organ, from the official evaluation of the MICCAI FLARE 2022 abdominal CT challenge
# (github.com/JunMa11/FLARE, FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py: liver 5, spleen 3, pancreas 5,
# left and right kidney 3). FLARE 2021 used 1 mm for all four organs. These are defaults only: pass
# `tolerances=` to `score_case` (or `tolerance_mm=` to `score_masks`) to use others, and report which.
DEFAULT_TOLERANCE_MM: dict[str, float] = {"liver": 5.0, "spleen": 3.0, "pancreas": 5.0, "kidney": 3.0}

METRICS: tuple[str, ...] = ("dice", "nsd", "hd95")


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view in mm, sqrt(sum((n_i * s_i)^2)): the hd95 given to a missed organ."""
    # Hand-written: a convention of this study, not a library metric.
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)) ** 2)))


def score_masks(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                tolerance_mm: float) -> dict[str, Any]:
    """Dice, NSD (at `tolerance_mm`) and HD95 (mm) of one organ's binary 3D masks.

    `spacing` is the voxel size in mm along the arrays' three axes. Returns
    {"dice", "nsd", "hd95", "pred_empty", "truth_empty"}. Conventions (see the module docstring):
    empty truth -> all NaN, truth_empty True; empty prediction with a non-empty truth -> dice 0, nsd 0,
    hd95 = `volume_diagonal_mm`, pred_empty True; otherwise MONAI's values with physical spacing.
    """
    pred = np.asarray(prediction).astype(bool)
    true = np.asarray(truth).astype(bool)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"prediction and truth must be 3D masks of one shape, got {pred.shape} and {true.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")

    pred_empty, truth_empty = not pred.any(), not true.any()
    if truth_empty:
        return {"dice": np.nan, "nsd": np.nan, "hd95": np.nan, "pred_empty": pred_empty, "truth_empty": True}
    if pred_empty:
        return {"dice": 0.0, "nsd": 0.0, "hd95": volume_diagonal_mm(pred.shape, spacing),
                "pred_empty": True, "truth_empty": False}

    # MONAI wants (batch, channel, *spatial); the single channel is the organ, so include_background=True.
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(true[None, None].astype(np.float32))
    dice = compute_dice(y_pred, y, include_background=True)
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally; silence only that warning.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=True,
                                   spacing=spacing)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    return {"dice": float(dice.item()), "nsd": float(nsd.item()), "hd95": float(hd95.item()),
            "pred_empty": False, "truth_empty": False}


def score_case(predictions: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray], spacing: Sequence[float],
               tolerances: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per organ of `truths` (organ, dice, nsd, hd95, pred_empty, truth_empty) for one case.

    `predictions` and `truths` map organ name -> binary 3D mask on the same grid; an organ missing from
    `predictions` is an empty prediction. `tolerances` (mm) defaults to `DEFAULT_TOLERANCE_MM`.
    """
    tolerances = DEFAULT_TOLERANCE_MM if tolerances is None else tolerances
    rows = []
    for organ, truth in truths.items():
        if organ not in tolerances:
            raise KeyError(f"no NSD tolerance for organ {organ!r}; pass it in `tolerances`")
        prediction = predictions.get(organ)
        if prediction is None:
            prediction = np.zeros(np.shape(truth), dtype=bool)
        rows.append({"organ": organ, **score_masks(prediction, truth, spacing, tolerances[organ])})
    return rows


def _bootstrap_mean_ci(values: np.ndarray, n_boot: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean (scipy); NaN, NaN with fewer than 2 values."""
    if len(values) < 2:
        return np.nan, np.nan
    result = stats.bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarise(scores: pd.DataFrame, by: Sequence[str] = ("method", "organ"), metrics: Sequence[str] = METRICS,
              n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Per group and metric, over cases: mean, std, bootstrap CI of the mean, and counts.

    Long format, one row per group and metric: *by, metric, mean, std (ddof=1), ci_low, ci_high,
    n_scored (cases with a non-NaN value), n_pred_empty (scored cases whose prediction was empty: missed
    organs, included in the mean as the worst value), n_truth_empty (cases with no ground truth, not scored).
    Pivot it for a wide table, e.g. `.pivot(index=["method", "organ"], columns="metric", values="mean")`.
    The CI is a percentile bootstrap over cases (`scipy.stats.bootstrap`, `n_boot` resamples, generator
    seeded with `seed`: the same seed gives the same CI); it is NaN with fewer than 2 scored cases.
    """
    by = list(by)
    rows = []
    for key, group in scores.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        # Scores without the empty flags (e.g. Dice alone, NaN where the truth is empty) leave those counts unknown.
        truth_empty = group["truth_empty"].astype(bool) if "truth_empty" in group else group[metrics[0]].isna()
        n_pred_empty = (int((group["pred_empty"].astype(bool) & ~truth_empty).sum()) if "pred_empty" in group
                        else np.nan)
        for metric in metrics:
            values = group[metric].dropna().to_numpy(dtype=float)
            low, high = _bootstrap_mean_ci(values, n_boot, seed, confidence)
            rows.append({**dict(zip(by, key)), "metric": metric,
                         "mean": float(np.mean(values)) if len(values) else np.nan,
                         "std": float(np.std(values, ddof=1)) if len(values) > 1 else np.nan,
                         "ci_low": low, "ci_high": high, "n_scored": len(values),
                         "n_pred_empty": n_pred_empty, "n_truth_empty": int(truth_empty.sum())})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "std", "ci_low", "ci_high",
                                       "n_scored", "n_pred_empty", "n_truth_empty"])


def paired_test(scores: pd.DataFrame, method_a: str, method_b: str, metric: str = "dice",
                n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Per organ, `method_a` vs `method_b` on the cases both scored (non-NaN `metric`), paired by case_id.

    Columns: organ, n, mean_diff (mean of a - b), ci_low, ci_high (percentile bootstrap of the mean
    difference, as in `summarise`), p_value (two-sided Wilcoxon signed-rank, `scipy.stats.wilcoxon` with
    its defaults: zero differences dropped), note. p_value (and the CI for n < 2) is NaN, with the reason
    in `note`, when fewer than 2 cases are paired or all differences are zero; otherwise note is "".
    """
    key = ["case_id", "organ"]
    sides = []
    for method in (method_a, method_b):
        side = scores.loc[scores["method"] == method, [*key, metric]].dropna(subset=[metric])
        if side.duplicated(key).any():
            raise ValueError(f"method {method!r} has more than one row for some (case_id, organ)")
        sides.append(side)
    paired = sides[0].merge(sides[1], on=key, suffixes=("_a", "_b"))
    organs = pd.unique(scores.loc[scores["method"].isin([method_a, method_b]), "organ"])
    rows = []
    for organ in organs:
        pair = paired[paired["organ"] == organ]
        a, b = pair[f"{metric}_a"].to_numpy(dtype=float), pair[f"{metric}_b"].to_numpy(dtype=float)
        diff = a - b
        low, high = _bootstrap_mean_ci(diff, n_boot, seed, confidence)
        p_value, note = np.nan, ""
        if len(diff) < 2:
            note = "fewer than 2 paired cases"
        elif np.all(diff == 0):
            note = "all differences are zero"
        else:
            p_value = float(stats.wilcoxon(a, b).pvalue)
        rows.append({"organ": organ, "n": len(diff), "mean_diff": float(np.mean(diff)) if len(diff) else np.nan,
                     "ci_low": low, "ci_high": high, "p_value": p_value, "note": note})
    return pd.DataFrame(rows, columns=["organ", "n", "mean_diff", "ci_low", "ci_high", "p_value", "note"])
