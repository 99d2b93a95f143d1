"""The claims table decides each paper's claim from a run folder's scores: build folders whose numbers make
every claim hold, then fail, and check that every verdict follows the numbers, that the intervals are the
sign-flip test's own (whole cases, paired), and that nothing is "held" more often than its nominal 2.5%."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from fedseg.data.labels import TRAIN_DATASETS, owned_channels
from fedseg.evaluate.external import GLOBAL, LOCAL, LOCAL_PP, SL
from fedseg.reporting import claims

CASES = 8
ORGANS = ("liver", "spleen", "pancreas", "kidney")
LEVEL = {"liver": 0.9, "spleen": 0.85, "pancreas": 0.5, "kidney": 0.7}  # a harder organ scores lower


def spread(rng, n=CASES):
    """Per-case Dice that differs a lot between cases (case difficulty): only pairing by case sees small gains."""
    return rng.uniform(0.3, 0.9, n)


def write_run(folder, holds: bool, seed=0, cases=CASES):
    """A run folder with every experiment's per-case scores; `holds` decides which way each comparison goes.
    Every paired difference is noisy (no zero-width interval) and small next to the spread between cases."""
    rng = np.random.default_rng(seed)
    sign = 1 if holds else -1
    metrics = folder / "metrics"
    metrics.mkdir(parents=True)
    sl, fl = [], []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            base = spread(rng, cases)
            fails = channel in claims.PAPER_FAILED if holds else channel in ("pancreas", "kidney")
            glob = rng.uniform(0.0, 0.04, cases) if fails else rng.uniform(0.3, 0.5, cases)
            local = base + sign * 0.04 + rng.normal(0, 0.01, cases)
            for k in range(cases):
                case = f"{dataset}_{k}"
                sl.append({"model": f"sl-{dataset}", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": base[k]})
                fl.append({"model": f"fl-local-{dataset}", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": local[k]})
                fl.append({"model": "fl-global", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": glob[k]})
    pd.DataFrame(sl).to_csv(metrics / "test_dice_per_case.csv", index=False)
    pd.DataFrame(fl).to_csv(metrics / "fl_test_dice_per_case.csv", index=False)
    btcv = []
    for organ in ORGANS:
        glob = spread(rng, cases) - 0.2
        ensemble = glob + sign * 0.2 + rng.normal(0, 0.02, cases)
        for method, values in ((GLOBAL, glob), (LOCAL, ensemble),
                               (LOCAL_PP, ensemble + sign * 0.05 + rng.normal(0, 0.01, cases)),
                               (SL, ensemble - sign * 0.05 + rng.normal(0, 0.01, cases))):
            btcv += [{"method": method, "case_id": f"img{k}", "organ": organ, "dice": values[k]} for k in range(cases)]
    pd.DataFrame(btcv).to_csv(metrics / "btcv_per_case.csv", index=False)
    nodes = []
    difficulty = {organ: rng.normal(0, 0.05, cases) for organ in ORGANS}
    for n, organs in ((2, ORGANS[:2]), (3, ORGANS[:3]), (4, ORGANS)):
        for organ in organs:  # each organ loses 5 points per node added (holds) or gains them
            conventional = LEVEL[organ] + difficulty[organ] - sign * 0.05 * n + rng.normal(0, 0.01, cases)
            for model, values in (("Conventional FL", conventional),
                                  ("SegViz", conventional + sign * 0.05 + rng.normal(0, 0.01, cases))):
                nodes += [{"setup": f"{n}-node", "model": model, "case_id": f"img{k}", "organ": organ,
                           "dice": values[k]} for k in range(cases)]
    pd.DataFrame(nodes).to_csv(metrics / "segviz_nodes_per_case.csv", index=False)
    mri_like = ("liver", "spleen")
    contrast = []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            for tested in ("CT", "MRI"):
                avg = spread(rng, cases) - 0.2
                for model, values in (("fedavg-global", avg),
                                      ("fedgin-global", avg + sign * 0.04 + rng.normal(0, 0.01, cases))):
                    contrast += [{"model": model, "dataset": dataset, "case_id": f"{dataset}_{k}", "channel": channel,
                                  "dice": values[k], "contrast": tested} for k in range(cases)]
    pd.DataFrame(contrast).to_csv(metrics / "contrast_per_case.csv", index=False)
    (folder / "run.json").write_text(json.dumps(
        {"profile_config": {"data": {"phantom": {"mri_like": list(mri_like)}}}}))
    return folder


def edit(folder, name, change):
    """Read metrics/`name`, let `change` edit the frame, write it back."""
    path = folder / "metrics" / name
    frame = change(pd.read_csv(path))
    frame.to_csv(path, index=False)


def row(table, claim_start):
    return table[table["claim"].str.startswith(claim_start)].iloc[0]


@pytest.mark.parametrize("holds", [True, False])
def test_every_verdict_follows_the_runs_numbers(tmp_path, holds):
    folder = write_run(tmp_path / "run", holds)
    table = claims.claims_table(folder)
    assert len(table) == 7
    expected = claims.HELD if holds else claims.NOT_HELD
    assert list(table["verdict"]) == [expected] * 7, table[["claim", "verdict", "evidence"]].to_string()
    assert set(table["paper"]) == {claims.SHEN, claims.SEGVIZ, claims.FEDGIN}
    sl = pd.read_csv(folder / "metrics" / "test_dice_per_case.csv")
    fl = pd.read_csv(folder / "metrics" / "fl_test_dice_per_case.csv")
    local = fl[fl["model"].str.startswith("fl-local")].set_index(["channel", "case_id"])["dice"]
    gain = (local - sl.set_index(["channel", "case_id"])["dice"]).groupby("channel").mean().mean() * 100
    decided = table.dropna(subset=["ci_low"])
    assert len(decided) == 6  # every comparison has an interval, and a real one: it has width
    assert (decided["ci_low"] < decided["estimate"]).all() and (decided["estimate"] < decided["ci_high"]).all()
    first = table.iloc[0]
    assert first["estimate"] == pytest.approx(gain, abs=1e-9) and abs(gain - (4 if holds else -4)) < 1
    assert f"[{first['ci_low']:+.1f}, {first['ci_high']:+.1f}]" in first["evidence"]


def test_the_failed_channels_must_be_exactly_the_papers(tmp_path):
    folder = write_run(tmp_path / "run", True)
    edit(folder, "fl_test_dice_per_case.csv", lambda s: s.assign(dice=s["dice"].mask(
        (s["model"] == "fl-global") & (s["channel"] == "kidney"), 0.01)))  # a fourth channel fails too
    failing = claims.claims_table(folder).iloc[1]
    assert failing["verdict"] == claims.NOT_HELD and "kidney" in failing["evidence"]


def test_a_gain_inside_the_noise_does_not_hold(tmp_path):
    """FL local better on average but not beyond the noise: the CI spans 0, so the claim is not held (an
    interval replaced by the sign of the estimate would say held)."""
    folder = write_run(tmp_path / "run", True)
    rng = np.random.default_rng(1)
    edit(folder, "fl_test_dice_per_case.csv", lambda s: s.assign(dice=s["dice"].mask(
        s["model"].str.startswith("fl-local"), s["dice"] - 0.04 + 0.002 + rng.normal(0, 0.2, len(s)))))
    first = claims.claims_table(folder).iloc[0]
    assert first["ci_low"] < 0 < first["ci_high"] and first["verdict"] == claims.NOT_HELD


def test_pairing_by_case_is_what_makes_a_small_gain_hold(tmp_path):
    """Local = SL + 4 points on every case, with cases 60 points apart: paired, it holds; the same scores
    with the cases shuffled within each channel (pairs broken, means unchanged) do not. An unpaired interval
    gives both the same verdict."""
    folder = write_run(tmp_path / "run", True)
    assert claims.claims_table(folder).iloc[0]["verdict"] == claims.HELD
    rng = np.random.default_rng(2)

    def shuffle(scores):
        local = scores["model"].str.startswith("fl-local")
        for _, index in scores[local].groupby("channel").groups.items():
            scores.loc[index, "case_id"] = rng.permutation(scores.loc[index, "case_id"].to_numpy())
        return scores

    edit(folder, "fl_test_dice_per_case.csv", shuffle)
    unpaired = claims.claims_table(folder).iloc[0]
    assert unpaired["estimate"] == pytest.approx(claims.claims_table(write_run(tmp_path / "again", True))
                                                 .iloc[0]["estimate"])
    assert unpaired["verdict"] == claims.NOT_HELD


def test_the_interval_is_the_sign_flip_tests_own():
    """Held exactly when the one-sided sign-flip p-value of 0, counted by brute force over every flip of whole
    cases, is at most 2.5%; the bounds are where that p-value crosses 2.5%; with 6 cases, [smallest, largest]."""
    rng = np.random.default_rng(3)
    cases = [f"c{i}" for i in range(9)]
    for shift in (0.0, 1.0, 2.5, 4.0):
        common = rng.normal(shift, 3, 9)
        groups = {"liver": pd.Series(common + rng.normal(0, 2, 9), index=cases),
                  "liver_tumor": pd.Series(common + rng.normal(0, 2, 9), index=cases),
                  "spleen": np.asarray(rng.normal(shift, 3, 5))}  # 5 cases of its own
        estimate, low, high = claims.stratified_mean_difference(groups, 2**14)  # every flip: exact
        per_case = np.concatenate([(groups["liver"].to_numpy() + groups["liver_tumor"].to_numpy()) / 9 / 3,
                                   groups["spleen"] / 5 / 3])  # each case's share of the statistic
        weight = np.concatenate([np.full(9, 2 / 9 / 3), np.full(5, 1 / 5 / 3)])

        def p_upper(delta):
            centred = per_case - delta * weight
            flips = np.array(list(itertools.product((1, -1), repeat=14)))
            return np.mean(flips @ centred >= centred.sum() - 1e-12)  # includes the identity: (1 + #) / 2^14

        assert estimate == pytest.approx(per_case.sum())
        assert (low > 0) == (p_upper(0.0) <= 0.025)
        assert p_upper(low - 1e-6) <= 0.025 < p_upper(low + 1e-6)
    d = np.array([3.0, -1.0, 4.0, 1.5, 5.0, 9.0])
    assert claims.stratified_mean_difference({"a": d})[1:] == (d.min(), d.max())


def test_whole_cases_are_the_unit(tmp_path):
    """The four BTCV organs of a case move together: the claim is decided by the cases, not by 4 x the cases.
    Organs that differ by the same amount on each case give the interval of the per-case mean, which here
    spans 0 (resampling each organ's cases on its own shrank it and said held)."""
    per_case = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, -1.0, -2.0])
    ids = [f"img{k}" for k in range(8)]
    rng = np.random.default_rng(4)
    organs = {o: pd.Series(per_case + rng.normal(0, 0.1, 8), index=ids) for o in ORGANS}
    pooled = claims.stratified_mean_difference(organs)
    alone = claims.stratified_mean_difference({"mean": np.mean([v.to_numpy() for v in organs.values()], axis=0)})
    assert pooled == pytest.approx(alone)
    folder = tmp_path / "run"
    (folder / "metrics").mkdir(parents=True)
    rows = []
    for organ, diff in organs.items():
        sl = rng.uniform(40, 80, 8)
        rows += [{"method": SL, "case_id": c, "organ": organ, "dice": s / 100} for c, s in zip(ids, sl)]
        rows += [{"method": LOCAL, "case_id": c, "organ": organ, "dice": (s + d) / 100}
                 for c, s, d in zip(ids, sl, diff)]
    pd.DataFrame(rows).to_csv(folder / "metrics" / "btcv_per_case.csv", index=False)
    btcv = row(claims.claims_table(folder), "FL local > SL on BTCV")
    assert btcv["estimate"] > 0 and btcv["ci_low"] < 0 and btcv["verdict"] == claims.NOT_HELD
    assert "8 cases, 32 paired scores" in btcv["evidence"]


def test_the_false_held_rate_is_at_most_nominal_at_the_profiles_case_counts():
    """Zero-mean differences (channels of a case correlated 0.32, datasets of different spread) come out "held"
    at most 2.5% of the time plus Monte Carlo slack, at the laptop profile's counts (test splits 8, 17, 13, 4
    cases; BTCV and its node sets 8-9) and at the fewest cases tested; and a real gain is found. (Random flips
    from 13 cases on: a Monte Carlo test is as valid as the full one.)"""
    draws = 4000
    slack = 3 * np.sqrt(0.025 * 0.975 / draws)
    for cases, channels, distribution in (([8, 17, 13, 4], [2, 2, 2, 1], "normal"), ([9], [4], "normal"),
                                          ([8], [4], "normal"), ([claims.MIN_CASES], [1], "normal"),
                                          ([8, 17, 13, 4], [2, 2, 2, 1], "t3"), ([9], [4], "t3")):
        rate = claims.simulated_false_held(cases, channels, draws=draws, distribution=distribution,
                                           n_flips=claims.N_FLIPS)
        assert rate <= 0.025 + slack, (cases, channels, distribution, rate)
    assert claims.simulated_false_held([8, 17, 13, 4], [2, 2, 2, 1], draws=1000, effect=8.0) > 0.9
    assert claims.simulated_false_held([9], [4], draws=1000, effect=8.0) > 0.5


def test_one_channels_interval_holds_no_more_often_than_nominal():
    """Through the public function, 600 zero-mean draws at each of the laptop's smallest counts (4: spleen's
    test split; 8, 9: BTCV): the old percentile bootstrap said held in 5-11% of them."""
    rng = np.random.default_rng(5)
    held = [claims.stratified_mean_difference({"d": rng.normal(0, 10, n)}, seed=k)[1] > 0
            for n in (4, 8, 9) for k in range(600)]
    assert np.mean(held) <= 0.025 + 3 * np.sqrt(0.025 * 0.975 / len(held))


def test_fewer_cases_than_a_test_can_reject_with_are_not_tested(tmp_path):
    """Below MIN_CASES no flip test at 2.5% can hold, so the claim is not tested (2 cases used to give
    [smallest, largest] and "held"; 1 case, "not held"); from MIN_CASES on, consistent gains hold."""
    for cases in (1, 2):
        table = claims.claims_table(write_run(tmp_path / f"run{cases}", True, cases=cases))
        for claim in ("on BTCV", "FL local > SL on BTCV", "SegViz > conventional FL", "conventional FL degrades"):
            decided = row(table, claim)
            assert decided["verdict"] == claims.NOT_TESTED, decided.to_dict()
            assert "fewer than 6" in decided["evidence"]
    # the test splits pool 4 datasets x 2 cases = 8 whole cases: enough for the flip test
    assert table.iloc[0]["verdict"] == claims.HELD
    gain = np.arange(1.0, claims.MIN_CASES + 1)
    assert np.isnan(claims.stratified_mean_difference({"d": gain[:-1]})[1])
    assert claims.stratified_mean_difference({"d": gain})[1] > 0


def test_a_channel_with_one_case_does_not_stop_a_pooled_claim(tmp_path):
    """The spleen's test split with one case: the pooled claim is still decided on its 25 cases (the old
    bootstrap gave no interval and printed "not held")."""
    folder = write_run(tmp_path / "run", True)
    for name in ("test_dice_per_case.csv", "fl_test_dice_per_case.csv"):
        edit(folder, name, lambda s: s[(s["dataset"] != "spleen") | (s["case_id"] == "spleen_0")])
    first = claims.claims_table(folder).iloc[0]
    assert first["verdict"] == claims.HELD and "25 cases" in first["evidence"]


def test_degrading_is_judged_on_the_organs_both_node_sets_hold(tmp_path):
    """Every organ scores the same in every node set; adding a harder organ lowers the mean over a set's own
    organs, which is no degradation: not held. Shared organs that lose points: held."""
    folder = write_run(tmp_path / "run", True)
    edit(folder, "segviz_nodes_per_case.csv", lambda s: s.assign(dice=s["organ"].map(LEVEL) + np.random.default_rng(
        6).normal(0, 0.01, len(s)) + s["model"].eq("SegViz") * 0.05))
    degrades = row(claims.claims_table(folder), "conventional FL degrades")
    assert degrades["verdict"] == claims.NOT_HELD and degrades["ci_low"] < 0 < degrades["ci_high"]
    assert "2-node → 3-node (liver, spleen)" in degrades["evidence"]
    assert "3-node → 4-node (liver, spleen, pancreas)" in degrades["evidence"]
    assert row(claims.claims_table(write_run(tmp_path / "drops", True)), "conventional FL degrades")["verdict"] == (
        claims.HELD)


def test_nothing_to_compare_is_not_tested(tmp_path):
    """One node set (no step to compare); a contrast run without fedgin: not tested, not "not held"."""
    folder = write_run(tmp_path / "run", True)
    edit(folder, "segviz_nodes_per_case.csv", lambda s: s[s["setup"] == "4-node"])
    edit(folder, "contrast_per_case.csv", lambda s: s[s["model"] != "fedgin-global"])
    table = claims.claims_table(folder)
    assert row(table, "SegViz > conventional FL")["verdict"] == claims.HELD  # one node set is enough for this one
    assert row(table, "conventional FL degrades")["verdict"] == claims.NOT_TESTED
    assert row(table, "GIN raises")["verdict"] == claims.NOT_TESTED
    assert "no fedgin" in row(table, "GIN raises")["evidence"]


def test_a_compound_rows_numbers_are_one_comparisons_own(tmp_path):
    """"processed > ensemble > global" is two comparisons: the evidence shows each one's own estimate and CI,
    the numeric columns are the one nearest to failing (not the min of bounds from different comparisons)."""
    folder = write_run(tmp_path / "run", True)
    rng = np.random.default_rng(7)

    def widen(scores):  # processed - ensemble: +6 points, wide; ensemble - global: +5 points, narrow
        ensemble = scores[scores["method"] == LOCAL].set_index(["organ", "case_id"])["dice"]
        for method, gain, sd in ((LOCAL_PP, 0.06, 0.06), (GLOBAL, -0.05, 0.002)):
            chosen = scores["method"] == method
            keys = list(zip(scores.loc[chosen, "organ"], scores.loc[chosen, "case_id"]))
            scores.loc[chosen, "dice"] = ensemble.loc[keys].to_numpy() + gain + rng.normal(0, sd, len(keys))
        return scores

    edit(folder, "btcv_per_case.csv", widen)
    table = claims.claims_table(folder)
    chain = row(table, "on BTCV")
    btcv = pd.read_csv(folder / "metrics" / "btcv_per_case.csv")
    parts = []
    for a, b in ((LOCAL_PP, LOCAL), (LOCAL, GLOBAL)):
        part = claims.stratified_mean_difference(claims._paired(claims._btcv_organ(btcv, a),
                                                                claims._btcv_organ(btcv, b), "organ"))
        parts.append(part)
        assert f"{a} - {b}: {part[0]:+.1f} [{part[1]:+.1f}, {part[2]:+.1f}]" in chain["evidence"]
    assert (chain["estimate"], chain["ci_low"], chain["ci_high"]) == pytest.approx(parts[0])
    assert parts[0][1] < parts[1][1] and parts[0][2] > parts[1][2] and chain["verdict"] == claims.HELD
    # the parts column carries each comparison's own numbers (what the budget report follows part by part)
    listed = claims.parts_of(chain)
    assert [p["name"] for p in listed] == [f"{LOCAL_PP} - {LOCAL}", f"{LOCAL} - {GLOBAL}"]
    assert [(p["estimate"], p["ci_low"], p["ci_high"]) for p in listed] == pytest.approx(parts)
    assert claims.parts_of(row(table, "FL local > SL on BTCV")) == []  # a single comparison has none


def test_a_federation_found_twice_is_listed_once(tmp_path):
    """The chain's FedAvg and the sweep's identical `fedavg-dice_ce/` are one federation: one set of rows,
    naming both folders."""
    folder = write_run(tmp_path / "run", True)
    twin = folder / "fedavg-dice_ce"
    (twin / "metrics").mkdir(parents=True)
    (twin / "run.json").write_text((folder / "run.json").read_text())
    for name in ("fl_test_dice_per_case.csv", "test_dice_per_case.csv"):
        (twin / "metrics" / name).write_text((folder / "metrics" / name).read_text())
    table = claims.claims_table(folder)
    assert len(table) == 7
    assert table.iloc[0]["tested on"] == "test splits, fedavg, loss ? (also `fedavg-dice_ce/`)"


def test_claims_without_their_experiment_are_not_tested(tmp_path):
    folder = write_run(tmp_path / "run", True)
    for name in ("btcv_per_case.csv", "segviz_nodes_per_case.csv", "contrast_per_case.csv"):
        (folder / "metrics" / name).unlink()
    table = claims.claims_table(folder)
    assert list(table["verdict"]) == [claims.HELD] * 2 + [claims.NOT_TESTED] * 5


def test_each_federation_of_a_run_gets_its_own_test_split_claims(tmp_path):
    """A compared loss (03) or a swept method in a sub-folder is decided separately, labelled by its config."""
    folder = write_run(tmp_path / "run", True)
    other = folder / "loss-literal_dice_ce"
    (other / "metrics").mkdir(parents=True)
    (other / "fl").mkdir()
    (other / "fl" / "config.json").write_text(json.dumps({"federated": {"method": "fedavg"},
                                                          "train": {"loss": "literal_dice_ce"}}))
    scores = pd.read_csv(folder / "metrics" / "fl_test_dice_per_case.csv")
    scores.loc[scores["model"] == "fl-global", "dice"] = 0.5  # this federation's global model fails nowhere
    scores.to_csv(other / "metrics" / "fl_test_dice_per_case.csv", index=False)
    table = claims.claims_table(folder)
    failing = table[table["claim"].str.startswith("the FL global model fails")]
    assert list(failing["verdict"]) == [claims.HELD, claims.NOT_HELD]
    assert failing.iloc[1]["tested on"] == "test splits, fedavg, loss literal_dice_ce (`loss-literal_dice_ce/`)"


def test_the_readme_shows_each_verdict_in_its_own_cell(tmp_path):
    """The run's README shows every claim's verdict as the last cell of its row, matched as a whole cell:
    "held" is not found inside "not held"."""
    from fedseg.reporting.readme import results_readme

    folder = write_run(tmp_path / "run", False)
    edit(folder, "segviz_nodes_per_case.csv", lambda s: s[s["setup"] == "4-node"])
    readme = results_readme(folder).read_text()
    table = pd.read_csv(folder / "tables" / "claims.csv")
    assert claims.verdicts_in(readme) == list(table["verdict"])
    assert claims.HELD not in claims.verdicts_in(readme) and claims.NOT_TESTED in claims.verdicts_in(readme)
    assert claims.verdicts_in(f"| {claims.SHEN} | a claim | somewhere | numbers | not held |") == ["not held"]


def test_a_federation_is_labelled_from_its_run_record_when_its_fl_folder_is_not_kept(tmp_path):
    """The committed reference keeps run.json, not fl/ (absolute paths): the label comes from 03's parameters
    over the profile."""
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({
        "profile_config": {"federated": {"method": "fedavg"}, "train": {"loss": "dice_ce"}},
        "notebooks": {"03_federated_training": {"parameters": {"method": "ownerfedavg", "loss": "literal_dice_ce"}}}}))
    assert claims.federation_label(folder) == "ownerfedavg, loss literal_dice_ce"
    (folder / "run.json").write_text(json.dumps({"profile_config": {"federated": {"method": "fedavg"},
                                                                     "train": {"loss": "dice_ce"}}}))
    assert claims.federation_label(folder) == "fedavg, loss dice_ce"
    assert claims.federation_label(tmp_path / "nothing") == "FL"
