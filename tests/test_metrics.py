"""External-evaluation metrics on small masks with hand-computed values, and the statistics over cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedseg.evaluate.metrics import (
    DEFAULT_TOLERANCE_MM,
    ORGANS,
    paired_test,
    score_case,
    score_masks,
    summarise,
)

SHAPE = (10, 10, 10)
SPACING = (2.5, 2.0, 2.0)  # anisotropic, mm
N = 4  # cube edge in voxels


def cube(shift: int = 0, axis: int = 0) -> np.ndarray:
    """A 4x4x4 cube at voxels 2..5 on every axis, moved by `shift` voxels along `axis`."""
    mask = np.zeros(SHAPE, dtype=bool)
    start = [2, 2, 2]
    start[axis] += shift
    mask[tuple(slice(s, s + N) for s in start)] = True
    return mask


# Boundary voxels (a 6-neighbour outside) of a 4-cube: 4^3 - 2^3 = 56. For the cube shifted by one voxel
# along an axis with spacing s (the other spacings being >= 2 mm here), the distances of one cube's 56
# boundary voxels to the other's boundary are, counted by hand:
#   36 voxels on both boundaries: the 3 overlapping slices x the 12-voxel ring of each slice -> 0;
#   16 voxels of the leading (or trailing) face, not overlapped -> s;
#    4 interior voxels of the other end face -> min(s, in-plane spacing), the ring being one voxel away.
# Symmetric in both directions. So HD95 = s (the top 16/56 > 5% are s) and NSD = (#distances <= tol) / 56.
BOUNDARY = N**3 - (N - 2) ** 3
BOTH = (N - 1) * (N**2 - (N - 2) ** 2)


def test_hand_counts_are_consistent():
    assert (BOUNDARY, BOTH) == (56, 36)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dice_of_shifted_cube_equals_counted_overlap(axis):
    a, b = cube(), cube(1, axis)
    expected = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert expected == pytest.approx(2 * 48 / 128)
    assert score_masks(b, a, SPACING, 1.0)["dice"] == pytest.approx(expected)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_shifted_cube_is_the_shift_in_mm_along_that_axis(axis):
    result = score_masks(cube(1, axis), cube(), SPACING, 1.0)
    assert result["hd95"] == pytest.approx(SPACING[axis])


@pytest.mark.parametrize("spacing, expected", [((2.5, 2.0, 2.0), 5.0), ((1.0, 0.5, 0.5), 2.0)])
def test_hd95_of_two_voxel_shift_scales_with_spacing(spacing, expected):
    # Leading face 2 voxels away: the 16 + 16 leading-face voxels (of 2 x 4 x 4 non-overlapped) are at 2 s.
    assert score_masks(cube(2, 0), cube(), spacing, 1.0)["hd95"] == pytest.approx(expected)


@pytest.mark.parametrize("tolerance, expected", [
    (2.5, 1.0),                      # tolerance = the shift: every boundary voxel within it
    (3.0, 1.0),                      # above the shift
    (2.2, (BOTH + 4) / BOUNDARY),    # the 4 end-face voxels (2.0 mm) in, the 16 leading-face voxels (2.5 mm) out
    (1.0, BOTH / BOUNDARY),          # only the voxels on both boundaries
])
def test_nsd_of_shifted_cube_at_tolerances(tolerance, expected):
    result = score_masks(cube(1, 0), cube(), SPACING, tolerance)
    assert result["nsd"] == pytest.approx(expected, rel=1e-6)
    assert (result["nsd"] < 1) == (tolerance < SPACING[0])


def test_identical_masks():
    result = score_masks(cube(), cube(), SPACING, 1.0)
    assert result == {"dice": pytest.approx(1.0), "nsd": pytest.approx(1.0), "hd95": pytest.approx(0.0),
                      "pred_empty": False, "truth_empty": False}


def test_empty_prediction_is_scored_as_worst_case():
    result = score_masks(np.zeros(SHAPE, dtype=bool), cube(), SPACING, 1.0)
    diagonal = np.sqrt((10 * 2.5) ** 2 + (10 * 2.0) ** 2 + (10 * 2.0) ** 2)  # sqrt(1425) mm
    assert result["dice"] == 0.0 and result["nsd"] == 0.0
    assert result["hd95"] == pytest.approx(diagonal)
    assert result["pred_empty"] is True and result["truth_empty"] is False


@pytest.mark.parametrize("prediction", [np.zeros(SHAPE, dtype=bool), cube()], ids=["pred-empty", "pred-not-empty"])
def test_empty_truth_is_not_scored(prediction):
    result = score_masks(prediction, np.zeros(SHAPE, dtype=bool), SPACING, 1.0)
    assert all(np.isnan(result[m]) for m in ("dice", "nsd", "hd95"))
    assert result["truth_empty"] is True
    assert result["pred_empty"] is (not prediction.any())


def test_score_masks_rejects_bad_inputs():
    with pytest.raises(ValueError):
        score_masks(cube(), cube()[:-1], SPACING, 1.0)
    with pytest.raises(ValueError):
        score_masks(cube(), cube(), (1.0, 1.0), 1.0)
    with pytest.raises(ValueError):
        score_masks(cube(), cube(), SPACING, -1.0)


def test_default_tolerances_cover_the_organs():
    assert ORGANS == ("liver", "spleen", "pancreas", "kidney")
    assert set(DEFAULT_TOLERANCE_MM) == set(ORGANS)
    assert all(t > 0 for t in DEFAULT_TOLERANCE_MM.values())


def test_score_case_rows_per_organ_with_their_own_tolerance():
    truths = {"liver": cube(), "spleen": cube(), "pancreas": cube(), "kidney": np.zeros(SHAPE, dtype=bool)}
    predictions = {"liver": cube(1, 0), "spleen": cube(1, 0), "kidney": cube()}  # no pancreas predicted
    tolerances = {"liver": 1.0, "spleen": 2.5, "pancreas": 1.0, "kidney": 1.0}
    rows = {row["organ"]: row for row in score_case(predictions, truths, SPACING, tolerances)}
    assert list(rows) == list(truths)
    assert set(rows["liver"]) == {"organ", "dice", "nsd", "hd95", "pred_empty", "truth_empty"}
    assert rows["liver"]["nsd"] == pytest.approx(BOTH / BOUNDARY, rel=1e-6)
    assert rows["spleen"]["nsd"] == pytest.approx(1.0)
    assert rows["pancreas"]["pred_empty"] and rows["pancreas"]["dice"] == 0.0
    assert rows["kidney"]["truth_empty"] and np.isnan(rows["kidney"]["dice"])
    assert not rows["kidney"]["pred_empty"]


def test_score_case_defaults_to_default_tolerances():
    row, = score_case({"liver": cube(1, 0)}, {"liver": cube()}, SPACING)
    expected = score_masks(cube(1, 0), cube(), SPACING, DEFAULT_TOLERANCE_MM["liver"])
    assert row["nsd"] == pytest.approx(expected["nsd"])


def scores_table() -> pd.DataFrame:
    """Two methods, two organs, five cases; B misses the liver of c3 and nobody has a spleen in c4."""
    a_liver = [0.90, 0.85, 0.80, 0.95, 0.70]
    b_liver = [0.88, 0.80, 0.00, 0.90, 0.72]
    a_spleen = [0.80, 0.75, 0.60, np.nan, 0.90]
    b_spleen = [0.70, 0.70, 0.65, np.nan, 0.85]
    rows = []
    for method, liver, spleen in (("A", a_liver, a_spleen), ("B", b_liver, b_spleen)):
        for i in range(5):
            for organ, dice in (("liver", liver[i]), ("spleen", spleen[i])):
                rows.append({"method": method, "case_id": f"c{i}", "organ": organ, "dice": dice,
                             "nsd": dice, "hd95": 10 * (1 - dice) if not np.isnan(dice) else np.nan,
                             "pred_empty": dice == 0.0, "truth_empty": bool(np.isnan(dice))})
    return pd.DataFrame(rows)


def test_summarise_mean_std_counts():
    scores = scores_table()
    table = summarise(scores, n_boot=500).set_index(["method", "organ", "metric"])
    assert len(table) == 2 * 2 * 3
    for (method, organ), group in scores.groupby(["method", "organ"]):
        values = group["dice"].dropna().to_numpy()
        row = table.loc[(method, organ, "dice")]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert row["n_scored"] == len(values)
    assert table.loc[("B", "liver", "dice"), "n_pred_empty"] == 1
    assert table.loc[("A", "liver", "dice"), "n_pred_empty"] == 0
    assert table.loc[("A", "spleen", "nsd"), "n_truth_empty"] == 1
    assert table.loc[("A", "spleen", "nsd"), "n_scored"] == 4
    assert table.loc[("B", "liver", "hd95"), "mean"] == pytest.approx(np.mean([1.2, 2.0, 10.0, 1.0, 2.8]))


def test_summarise_ci_contains_mean_and_is_reproducible():
    scores = scores_table()
    first, again = summarise(scores, n_boot=500, seed=3), summarise(scores, n_boot=500, seed=3)
    pd.testing.assert_frame_equal(first, again)
    assert (first["ci_low"] <= first["mean"]).all() and (first["mean"] <= first["ci_high"]).all()
    assert (first["ci_low"] < first["ci_high"]).all()
    # The same percentile bootstrap run directly with scipy and the same seed.
    values = scores.query("method == 'A' and organ == 'liver'")["dice"].to_numpy()
    direct = stats.bootstrap((values,), np.mean, n_resamples=500, method="percentile",
                             rng=np.random.default_rng(3)).confidence_interval
    row = first.set_index(["method", "organ", "metric"]).loc[("A", "liver", "dice")]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((direct.low, direct.high))


def test_summarise_with_fewer_than_two_scored_cases_gives_nan_ci():
    scores = scores_table().query("case_id in ['c3', 'c4']")  # spleen: c3 NaN, so one scored case
    table = summarise(scores, by=("method", "organ"), metrics=("dice",), n_boot=200)
    spleen = table[table["organ"] == "spleen"]
    assert (spleen["n_scored"] == 1).all()
    assert spleen["ci_low"].isna().all() and spleen["ci_high"].isna().all() and spleen["std"].isna().all()
    assert spleen["mean"].notna().all()


def test_paired_test_known_differences_and_wilcoxon():
    scores = scores_table().sample(frac=1.0, random_state=1)  # pairing must be by case_id, not by row order
    result = paired_test(scores, "A", "B", metric="dice").set_index("organ")
    liver_diff = np.array([0.02, 0.05, 0.80, 0.05, -0.02])
    assert result.loc["liver", "n"] == 5
    assert result.loc["liver", "mean_diff"] == pytest.approx(liver_diff.mean())
    a = np.array([0.90, 0.85, 0.80, 0.95, 0.70])
    b = np.array([0.88, 0.80, 0.00, 0.90, 0.72])
    assert result.loc["liver", "p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert result.loc["liver", "ci_low"] <= liver_diff.mean() <= result.loc["liver", "ci_high"]
    # Spleen: c3 has no ground truth, so 4 pairs.
    assert result.loc["spleen", "n"] == 4
    assert result.loc["spleen", "mean_diff"] == pytest.approx(np.mean([0.10, 0.05, -0.05, 0.05]))
    assert result.loc["spleen", "p_value"] == pytest.approx(
        stats.wilcoxon([0.80, 0.75, 0.60, 0.90], [0.70, 0.70, 0.65, 0.85]).pvalue)
    assert (result["note"] == "").all()
    reverse = paired_test(scores, "B", "A").set_index("organ")
    assert reverse.loc["liver", "mean_diff"] == pytest.approx(-liver_diff.mean())


def test_paired_test_too_few_pairs_gives_nan_without_error():
    scores = scores_table().query("case_id == 'c0'")
    result = paired_test(scores, "A", "B")
    assert (result["n"] == 1).all()
    assert result["p_value"].isna().all() and result["ci_low"].isna().all()
    assert (result["note"] == "fewer than 2 paired cases").all()
    assert result.set_index("organ").loc["liver", "mean_diff"] == pytest.approx(0.02)


def test_paired_test_all_zero_differences_gives_nan_without_error():
    scores = scores_table()
    same = pd.concat([scores[scores["method"] == "A"], scores[scores["method"] == "A"].assign(method="A2")])
    result = paired_test(same, "A", "A2")
    assert result["p_value"].isna().all()
    assert (result["note"] == "all differences are zero").all()
    assert (result["mean_diff"] == 0).all()
