"""The budget-response study (`python -m fedseg budget`): the derived profiles keep the equal-budget rule at every
scale, the trend rule and the side-by-side claims follow their written rules, the report reads what the folders
hold, and a rerun skips every finished piece (runners mocked: nothing trains here; the slow tests read one
end-to-end run of the smoke profile, which also holds the contrast study's real run)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedseg import run, run_folder
from fedseg.config import PROFILE_FILE, load_profile
from fedseg.data.labels import TRAIN_DATASETS, owned_channels
from fedseg.experiments import budget, contrast
from fedseg.experiments import nodes as node_sets
from fedseg.reporting import budget as budget_report
from fedseg.reporting import claims
from fedseg.run import budget as budget_runner
from fedseg.run import cli, studies
from fedseg.train.training import central_budget

# ---- the derived profiles ----

@pytest.mark.parametrize("name", ["smoke", "laptop"])
@pytest.mark.parametrize("scale", [1, 3, 10])
def test_every_budget_scales_and_each_client_trains_as_many_steps_as_its_sl_model(name, scale):
    base = load_profile(name)
    derived = budget.budget_profile(base, scale)
    assert derived["train"]["steps"] == base["train"]["steps"] * scale
    assert derived["localiser"]["steps"] == base["localiser"]["steps"] * scale
    assert central_budget(derived["train"], 4) == central_budget(base["train"], 4) * scale
    rounds, local = budget.rounds_and_local_steps(derived)
    assert rounds == base["federated"]["rounds"]  # rounds kept, local steps scaled
    assert budget.client_budget(derived) == rounds * local == derived["train"]["steps"]  # the equal-budget rule
    # the same data: name, phantom and voxel untouched, so the same synthetic root and cache
    assert derived["name"] == base["name"] and derived["data"] == base["data"]
    assert derived["preprocess"] == base["preprocess"] and derived["model"] == base["model"]
    assert derived[budget.KEY] == {"base": name, "scale": scale, "base_steps": base["train"]["steps"],
                                   "spacing_mm": None, "rounds": "kept"}
    assert base["train"]["steps"] == load_profile(name)["train"]["steps"]  # the base is not modified


def test_a_finer_voxel_changes_the_spacing_only_and_rounds_can_scale_instead():
    base = load_profile("laptop")
    fine = budget.budget_profile(base, 3, spacing=3.0)
    assert fine["preprocess"]["spacing"] == [3.0, 3.0, 3.0]
    assert {k: v for k, v in fine["preprocess"].items() if k != "spacing"} == {
        k: v for k, v in base["preprocess"].items() if k != "spacing"}
    assert fine["train"] == budget.budget_profile(base, 3)["train"]
    scaled = budget.budget_profile(base, 10, scale_rounds=True)
    assert budget.rounds_and_local_steps(scaled) == (90, 100)  # 10x the rounds, the same local steps
    assert budget.client_budget(scaled) == scaled["train"]["steps"] == 9000
    assert scaled["federated"]["val_every"] == 10  # validated as often as at 1x
    smoke = budget.budget_profile(load_profile("smoke"), 3)  # a profile validating every n steps: as often as at 1x
    assert smoke["train"]["val_every"] == 3 * load_profile("smoke")["train"]["val_every"]


def test_scales_and_profiles_that_break_the_rule_are_refused():
    assert budget.check_scales(["10", 1, 3, 3]) == (1, 3, 10)
    for bad in ([], [0, 1], ["x"]):
        with pytest.raises(ValueError, match="positive whole numbers"):
            budget.check_scales(bad)
    base = load_profile("laptop")
    base["train"]["steps"] = 905  # 9 rounds x 100 local steps = 900 != 905
    with pytest.raises(ValueError, match="equal"):
        budget.budget_profile(base, 3)


def test_points_are_found_from_their_profiles_base_voxel_first(tmp_path):
    base = load_profile("laptop")
    for scale, spacing in ((10, None), (3, 3.0), (1, None), (3, None)):
        folder = tmp_path / budget.point_name(scale, spacing)
        folder.mkdir()
        (folder / PROFILE_FILE).write_text(yaml.safe_dump(budget.budget_profile(base, scale, spacing)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / PROFILE_FILE).write_text(yaml.safe_dump(base))  # not a budget point
    points = budget.find_points(tmp_path)
    assert [p["folder"].name for p in points] == ["scale-1", "scale-3", "scale-10", "scale-3-3mm"]
    assert [p["label"] for p in points] == ["1x", "3x", "10x", "3x (3 mm)"]
    assert [p["steps"] for p in points] == [900, 2700, 9000, 2700]
    assert points[2]["rounds"] == 9 and points[2]["local_steps"] == 1000


# ---- the trend rule and the claims side by side ----

def claim_row(verdict, estimate=np.nan, low=np.nan, high=np.nan, rule="held if the 95% CI lies above 0",
              evidence="", claim="FL local > SL on average (test splits)", on="test splits, fedavg, loss dice_ce",
              paper=claims.SHEN):
    return {"paper": paper, "claim": claim, "tested on": on, "evidence": evidence, "estimate": estimate,
            "ci_low": low, "ci_high": high, "verdict": verdict, "rule": rule}


def test_a_changed_verdict_or_an_estimate_moving_beyond_its_interval_may_change():
    held, not_held = claims.HELD, claims.NOT_HELD
    cells = lambda a, b: [("1x", 900, claim_row(*a)), ("3x", 2700, claim_row(*b))]  # noqa: E731
    assert budget_report.trend(cells((not_held, -3, -5, -1), (held, 2, 0.5, 3.5)), 1).startswith(
        "may change with more budget: not held at 1x, held at 3x")
    # not held both times, but 4 points closer to 0, more than the half-width 2: may change, 1.5 more x3 steps
    text = budget_report.trend(cells((not_held, -8, -10, -6), (not_held, -4, -7, -3)), 1)
    assert text.startswith("may change with more budget") and "+4.0 points" in text
    assert "CI half-width (2.0)" in text and "about 1.8 more x3 steps" in text  # bound -7 / 4 points per step
    # moving toward 0 but within the half-width, or away from it: stable
    assert budget_report.trend(cells((not_held, -5, -8, -2), (not_held, -4, -7, -1)), 1).startswith("stable")
    assert budget_report.trend(cells((not_held, -4, -6, -2), (not_held, -9, -11, -7)), 1).startswith(
        "stable: the estimate moved -5.0 points from 1x to 3x (away from held)")
    # held, and moving away from not held by much: stable; toward it by much: may change
    assert budget_report.trend(cells((held, 3, 1, 5), (held, 9, 7, 11)), 1).startswith("stable")
    assert budget_report.trend(cells((held, 12, 10, 14), (held, 5, 3, 7)), 1).startswith("may change")
    # a claimed decrease (held below 0): an estimate rising toward 0 is moving toward "not held"
    assert budget_report.trend(cells((held, -12, -14, -10), (held, -5, -7, -3)), -1).startswith("may change")
    assert budget_report.trend(cells((held, -5, -7, -3), (held, -12, -14, -10)), -1).startswith("stable")


def test_only_the_two_largest_budgets_decide_and_untested_ones_are_not_decidable():
    rows = [("1x", 900, claim_row(claims.HELD, 5, 2, 8)), ("3x", 2700, claim_row(claims.NOT_HELD, -1, -3, 1)),
            ("10x", 9000, claim_row(claims.NOT_HELD, -1.5, -3.5, 0.5))]
    assert budget_report.trend(rows, 1).startswith("stable")  # 1x's "held" is history, not the trend
    assert budget_report.trend(rows[::-1], 1).startswith("stable")  # ordered by budget, not by position
    assert budget_report.trend(rows[:1], 1) == "not decidable: one budget"
    assert budget_report.trend([rows[0], ("3x", 2700, None)], 1) == "not decidable: not tested at 3x"
    untested = ("3x", 2700, claim_row(claims.NOT_TESTED))
    assert budget_report.trend([rows[0], untested], 1) == "not decidable: not tested at 3x"


def test_the_failing_channels_claim_changes_when_its_set_does():
    rule = "held if the channels below 10 Dice are exactly these"
    row = lambda failed: claim_row(claims.NOT_HELD, len(failed), rule=rule,  # noqa: E731
                                   evidence=f"fails on: {', '.join(failed) or 'none'} (FL global: liver 50.0)")
    assert budget_report.failing_channels(row(["liver tumor", "spleen"])["evidence"]) == {"liver tumor", "spleen"}
    assert budget_report.failing_channels(row([])["evidence"]) == frozenset()
    assert budget_report.claim_kind(["-", rule]) is None
    same = [("1x", 1, row(["spleen", "kidney tumor"])), ("3x", 3, row(["kidney tumor", "spleen"]))]
    assert budget_report.trend(same, None).startswith("stable: the same channels")
    changed = [("1x", 1, row(["spleen", "kidney tumor"])), ("3x", 3, row(["kidney tumor"]))]
    assert budget_report.trend(changed, None).startswith("may change with more budget: the channels below 10")


def compound(verdict, *parts, claim="SegViz > conventional FL at each node set"):
    """A claims row over several comparisons: (name, estimate, low, high, verdict) per part, the numeric columns
    the part nearest to failing, as `claims._every` writes it."""
    listed = [{"name": n, "estimate": e, "ci_low": lo, "ci_high": hi, "verdict": v} for n, e, lo, hi, v in parts]
    worst = min(listed, key=lambda p: p["ci_low"])
    out = claim_row(verdict, worst["estimate"], worst["ci_low"], worst["ci_high"], claim=claim,
                    paper=claims.SEGVIZ, on="BTCV, node sets", rule="held if every node set's CI lies above 0")
    return {**out, "parts": json.dumps(listed)}


def test_a_claim_over_several_comparisons_follows_each_part_not_its_weakest_at_each_budget():
    held = claims.HELD
    # 1x: the 2-node set is the weakest (+10); 3x: the 3-node set (+12). Weakest against weakest moved +2 points
    # (stable), but the 3-node set itself fell 18 points, more than its half-width 4: the claim may change.
    at_1x = compound(held, ("2-node", 10, 5, 15, held), ("3-node", 30, 25, 35, held))
    at_3x = compound(held, ("2-node", 20, 15, 25, held), ("3-node", 12, 8, 16, held))
    text = budget_report.trend([("1x", 900, at_1x), ("3x", 2700, at_3x)], 1)
    assert text.startswith("may change with more budget: 3-node: the estimate moved -18.0 points")
    assert "2-node" not in text  # it moved away from "not held": not the reason
    # every part within its own half-width: stable, each part's movement given
    calm = compound(held, ("2-node", 11, 6, 16, held), ("3-node", 29, 24, 34, held))
    text = budget_report.trend([("1x", 900, at_1x), ("3x", 2700, calm)], 1)
    assert text.startswith("stable: no part moved toward not held") and "3-node -1.0 points" in text
    # the side-by-side cell shows each part's own interval, not one made of bounds from different parts
    side = budget_report.claims_by_scale({"1x": pd.DataFrame([at_1x]), "3x": pd.DataFrame([at_3x])},
                                         {"1x": 900, "3x": 2700}, ["1x", "3x"])
    assert side.loc[0, "3x"] == "held: 2-node +20.0 [+15.0, +25.0]; 3-node +12.0 [+8.0, +16.0]"
    # a part found at one budget only is named, and decides nothing
    grown = compound(held, ("2-node", 20, 15, 25, held), ("4-node", 2, 1, 3, held))
    text = budget_report.trend([("1x", 900, at_1x), ("3x", 2700, grown)], 1)
    assert text.startswith("stable") and text.endswith("(no interval at both: 4-node)")


def test_the_short_claims_table_keeps_single_intervals_and_drops_compound_ones():
    held = claims.HELD
    parts = compound(held, ("2-node", 20, 15, 25, held), ("3-node", 12, 8, 16, held))
    single = claim_row(claims.NOT_HELD, -3, -5, -1)
    tables = {"1x": pd.DataFrame([single, parts]), "3x": pd.DataFrame([single, parts])}
    side = budget_report.claims_by_scale(tables, {"1x": 900, "3x": 2700}, ["1x", "3x"])
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in budget_report.summary_table(side).splitlines()[2:]]
    assert rows[0][1:] == ["FL local > SL on average (test splits) (fedavg, loss dice_ce)",
                           "not held -3.0 [-5.0, -1.0]", "not held -3.0 [-5.0, -1.0]", "stable"]
    # a claim over several comparisons: its verdict only (each part's own interval is in the long table)
    assert rows[1][1:] == ["SegViz > conventional FL at each node set", "held", "held", "stable"]


def test_a_claim_not_held_may_change_only_when_every_part_not_held_moves_toward_held():
    held, not_held = claims.HELD, claims.NOT_HELD
    before = compound(not_held, ("a > b", -6, -9, -3, not_held), ("b > c", 20, 15, 25, held),
                      ("c > d", -6, -9, -3, not_held))
    # the held part collapsing toward "not held" cannot change a verdict that is already "not held"
    collapse = compound(not_held, ("a > b", -6, -9, -3, not_held), ("b > c", 5, 1, 9, held),
                        ("c > d", -6, -9, -3, not_held))
    text = budget_report.trend([("1x", 1, before), ("3x", 3, collapse)], 1)
    assert text.startswith("stable: the parts not held at 3x did not all move toward held") and "b > c" not in text
    # one of the two parts not held moving toward held is not enough; both are
    one = compound(not_held, ("a > b", -1, -3, 1, not_held), ("b > c", 20, 15, 25, held),
                   ("c > d", -6, -9, -3, not_held))
    assert budget_report.trend([("1x", 1, before), ("3x", 3, one)], 1).startswith("stable")
    both = compound(not_held, ("a > b", -1, -3, 1, not_held), ("b > c", 20, 15, 25, held),
                    ("c > d", -1, -3, 1, not_held))
    text = budget_report.trend([("1x", 1, before), ("3x", 3, both)], 1)
    assert text.startswith("may change with more budget: a > b: the estimate moved +5.0") and "c > d:" in text


def test_the_claims_side_by_side_match_rows_across_points_and_leave_the_finer_voxel_out_of_the_trend():
    segviz = "conventional FL degrades as nodes are added"
    down = "held if every step's CI lies below 0"

    def table(estimate, verdict, degrade, also):
        return pd.DataFrame([
            claim_row(verdict, estimate, estimate - 1, estimate + 1,
                      on="test splits, fedavg, loss dice_ce" + (" (also `fedavg-dice_ce/`)" if also else "")),
            claim_row(claims.NOT_HELD, -6, -7, -5,
                      on="test splits, ownerfedavg, loss dice_ce (`ownerfedavg-dice_ce/`)"),
            claim_row(*degrade, rule=down, claim=segviz, paper=claims.SEGVIZ, on="BTCV, node sets 2-node, 3-node"),
        ], columns=claims.COLUMNS)

    untested = (claims.NOT_TESTED, np.nan, np.nan, np.nan)
    untested_row = claim_row(*untested, claim=segviz, paper=claims.SEGVIZ, on="-", rule="-")
    tables = {"1x": table(-5, claims.NOT_HELD, (claims.HELD, -4, -6, -2), True),
              "3x": table(-1, claims.NOT_HELD, (claims.HELD, -4.5, -6, -3), False),
              "10x": pd.concat([table(2, claims.HELD, untested, False).iloc[:2], pd.DataFrame([untested_row])]),
              "3x (3 mm)": table(3, claims.HELD, untested, False)}
    side = budget_report.claims_by_scale(tables, {"1x": 900, "3x": 2700, "10x": 9000, "3x (3 mm)": 2700},
                                         ["1x", "3x", "10x"])
    assert list(side.columns) == ["paper", "claim", "federation", "1x", "3x", "10x", "3x (3 mm)", "verdicts", "trend"]
    assert list(side["federation"]) == ["fedavg, loss dice_ce", "ownerfedavg, loss dice_ce", "-"]
    fedavg, owner, degrade = side.to_dict("records")
    assert fedavg["1x"] == "not held -5.0 [-6.0, -4.0]" and fedavg["10x"] == "held +2.0 [+1.0, +3.0]"
    assert fedavg["verdicts"] == "not held at 1x, not held at 3x, held at 10x, held at 3x (3 mm)"
    assert fedavg["trend"] == "may change with more budget: not held at 3x, held at 10x"
    assert owner["trend"].startswith("stable") and owner["3x (3 mm)"].startswith("not held")
    assert degrade["1x"].startswith("held") and degrade["10x"] == claims.NOT_TESTED
    assert degrade["trend"] == "not decidable: not tested at 10x"


# ---- the report from a study's folders ----

def write_point(study, scale, seed=0, spacing=None, cases=7, wall=(20.0, 300.0, 200.0)):
    """A budget point's folder as the chain and the sweep leave it: profile.yaml, run.json with wall times,
    Table 2 and per-case test scores (SL, the chain's FedAvg, one swept federation), BTCV's summary."""
    rng = np.random.default_rng(seed)
    folder = study / budget.point_name(scale, spacing)
    folder.mkdir(parents=True)
    profile = budget.budget_profile(load_profile("laptop"), scale, spacing)
    (folder / PROFILE_FILE).write_text(yaml.safe_dump(profile))
    host = {"cpus": 2}
    notebooks = {n: {"status": "ok", "wall_s": w * (scale if n != run.CHAIN[0] else 1)}
                 for n, w in zip(run.CHAIN, wall)}
    (folder / "run.json").write_text(json.dumps({"notebooks": notebooks, "host": host, "profile_config": profile}))
    sl, fl, sub_fl = [], [], []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            for k in range(cases):
                case, base = f"{dataset}_{k}", rng.uniform(0.3, 0.9)
                sl.append({"model": f"sl-{dataset}", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": base})
                for rows, gain in ((fl, -0.05 + 0.01 * scale), (sub_fl, -0.1)):
                    rows.append({"model": f"fl-local-{dataset}", "dataset": dataset, "case_id": case,
                                 "channel": channel, "dice": base + gain + rng.normal(0, 0.01)})
                    rows.append({"model": "fl-global", "dataset": dataset, "case_id": case, "channel": channel,
                                 "dice": rng.uniform(0.2, 0.4)})
    columns = ["liver", "liver tumor", "pancreas", "pancreas tumor", "kidney", "kidney tumor", "spleen", "Avg."]

    def table2(where, offset):
        (where / "tables").mkdir(parents=True, exist_ok=True)
        pd.DataFrame([np.full(8, 50.0 + scale), np.full(8, 10.0 + offset), np.full(8, 40.0 + offset + scale)],
                     index=list(budget_report.TABLE2_ROWS.values()), columns=columns).to_csv(
            where / "tables" / "table2.csv")

    (folder / "metrics").mkdir()
    pd.DataFrame(sl).to_csv(folder / "metrics" / "test_dice_per_case.csv", index=False)
    pd.DataFrame(fl).to_csv(folder / "metrics" / "fl_test_dice_per_case.csv", index=False)
    pd.DataFrame([{"method": m, "organ": o, "metric": "dice", "mean": 0.5} for m in budget_report.BTCV_ROWS
                  for o in ("liver", "pancreas", "kidney", "spleen")]).to_csv(
        folder / "metrics" / "btcv_summary.csv", index=False)
    table2(folder, 0)
    sweep = folder / "fedavg-literal_dice_ce"
    (sweep / "metrics").mkdir(parents=True)
    pd.DataFrame(sub_fl).to_csv(sweep / "metrics" / "fl_test_dice_per_case.csv", index=False)
    (sweep / "run.json").write_text(json.dumps({
        "notebooks": {run_folder.FEDERATED: {"status": "ok", "wall_s": 210.0 * scale,
                                             "parameters": {"method": "fedavg", "loss": "literal_dice_ce"}}},
        "host": host, "profile_config": profile}))
    table2(sweep, -5)
    return folder


def test_the_report_says_how_far_each_sl_model_is_from_its_convergence_target():
    rows = [{"point": point, "sl_steps": steps, "split": split, "model": model, "channel": channel, "dice": dice}
            for point, steps, liver, tumour in (("1x", 900, 85.4, 16.3), ("3x", 2700, 91.0, 50.0))
            for split, model, channel, dice in (("test", "SL", "liver", liver), ("test", "SL", "liver tumor", tumour),
                                                ("test", "SL", "pancreas tumor", 2.0),  # no target: not shown
                                                ("test", "FL global", "liver", 10.0), ("BTCV", "SL", "liver", 1.0))]
    gaps = budget_report.target_gaps(pd.DataFrame(rows)).set_index("point")
    assert list(gaps.columns) == ["SL steps", "liver (≥ 90)", "liver tumor (≥ 50)", "met"]
    assert gaps.loc["1x", "liver (≥ 90)"] == "85.4 (-4.6)" and gaps.loc["1x", "liver tumor (≥ 50)"] == "16.3 (-33.7)"
    assert gaps.loc["3x", "liver (≥ 90)"] == "91.0 (met)" and gaps.loc["3x", "liver tumor (≥ 50)"] == "50.0 (met)"
    assert list(gaps["met"]) == ["0 of 2", "2 of 2"]


def test_the_report_gives_dice_and_cost_per_point_and_the_claims_at_each_budget(tmp_path):
    for scale in (1, 3):
        write_point(tmp_path, scale, seed=scale)
    nodes_time = tmp_path / "scale-1" / "metrics" / "segviz_nodes_time.csv"
    pd.DataFrame([{"setup": "2-node", "model": "Central aggregation", "wall_s": 36.0},
                  {"setup": "2-node", "model": "Conventional FL", "wall_s": 999.0},  # a notebook: counted via run.json
                  {"setup": "all", "model": "BTCV scoring", "wall_s": 36.0}]).to_csv(nodes_time, index=False)
    (tmp_path / budget.point_name(3, 3.0)).mkdir()  # a point not run yet: its folder holds only the profile
    (tmp_path / budget.point_name(3, 3.0) / PROFILE_FILE).write_text(
        yaml.safe_dump(budget.budget_profile(load_profile("laptop"), 3, 3.0)))
    paths = budget_report.write_report(tmp_path, budget.find_points(tmp_path), command="python -m fedseg budget",
                                       n_flips=200)
    dice = pd.read_csv(paths["csv"])
    sl = dice[(dice["split"] == "test") & (dice["model"] == "SL") & (dice["channel"] == "liver")]
    assert list(sl["point"]) == ["1x", "3x"] and list(sl["dice"]) == [51.0, 53.0]
    assert list(sl["sl_steps"]) == [900, 2700] and list(sl["client_steps"]) == [900, 2700]
    assert sl["cpu_hours"].tolist() == pytest.approx([300 * 2 / 3600, 900 * 2 / 3600])  # 02's wall x 2 cores
    local = dice[(dice["split"] == "test") & (dice["model"] == "FL local") & (dice["channel"] == "Avg.")]
    assert set(local["federation"]) == {"fedavg, loss dice_ce", "fedavg, loss literal_dice_ce"}
    swept = local[local["federation"] == "fedavg, loss literal_dice_ce"]
    assert swept["cpu_hours"].tolist() == pytest.approx([210 * 2 / 3600, 630 * 2 / 3600])
    btcv = dice[dice["split"] == "BTCV"]
    assert set(btcv["channel"]) == {"liver", "pancreas", "kidney", "spleen", "Avg."} and (btcv["dice"] == 50).all()
    assert set(btcv.loc[btcv["model"] != "SL", "federation"]) == {"fedavg, loss dice_ce"}
    text = paths["md"].read_text()
    cost = pd.read_csv(paths["cost_csv"]).set_index("point")
    # 1x: chain 20 + 300 + 200, sweep 210, nodes 72 (not the notebook's 999); 3x: 20 + 900 + 600, sweep 630
    assert list(cost.index) == ["1x", "3x"]  # the 3 mm point has not started: left out
    assert cost[["chain (s)", "sweep (s)", "nodes (s)", "contrast (s)", "total (s)"]].loc["1x"].tolist() == [
        520, 210, 72, 0, 802]
    assert cost.loc["3x", "total (s)"] == 2150
    assert cost["CPU-h"].tolist() == [round(802 / 1800, 2), round(2150 / 1800, 2)]
    assert f"**Total: {(802 + 2150) / 1800:.1f} CPU-hours**" in text and "python -m fedseg budget" in text
    assert "| 3x      |       2700 | 53.0 (-37.0)" in text  # SL liver against its convergence target of 90
    assert paths["png"].stat().st_size > 10_000
    side = pd.read_csv(paths["claims_csv"])
    assert {"1x", "3x", "trend"} <= set(side.columns) and "3x (3 mm)" not in side.columns
    mine = side[(side["claim"] == "FL local > SL on average (test splits)")]
    assert list(mine["federation"]) == ["fedavg, loss dice_ce", "fedavg, loss literal_dice_ce"]
    assert mine["3x"].str.match(r"(not )?held [+-]\d+\.\d \[").all()
    assert all(f"- **{claims.SHEN}**: FL local > SL on average (test splits) ({f})" in text for f in mine["federation"])
    assert budget_report.TREND_RULE in text and budget_report.TREND_RULE in paths["claims_md"].read_text()
    assert "not tested at 1x, not tested at 3x" in text  # SegViz: no node sets in these folders


def write_histories(folder, liver, spleen, train_s=100.0, val_s=10.0):
    """SL models' `history.csv` (two validations each; the last decides) for the liver and spleen tasks."""
    for dataset, values in (("liver", {"dice_liver": liver, "dice_liver_tumor": liver / 4}),
                            ("spleen", {"dice_spleen": spleen})):
        out = run_folder.model_dir(folder, f"sl-{dataset}")
        out.mkdir(parents=True)
        pd.DataFrame([{"step": 450, "loss": 1.0, "val_mean_dice": 0.0, "lr": 1e-3, "train_s": train_s / 2,
                       "val_s": val_s / 2, **dict.fromkeys(values, 0.0)},
                      {"step": 900, "loss": 0.5, "val_mean_dice": 0.5, "lr": 0.0, "train_s": train_s,
                       "val_s": val_s, **values}]).to_csv(out / "history.csv", index=False)


def test_the_finer_voxel_is_judged_on_the_validation_splits_at_the_same_budget(tmp_path):
    write_point(tmp_path, 3, seed=3)
    write_point(tmp_path, 3, seed=4, spacing=3.0)
    write_histories(tmp_path / "scale-3", liver=0.80, spleen=0.70)
    write_histories(tmp_path / "scale-3-3mm", liver=0.84, spleen=0.60, train_s=250.0, val_s=40.0)
    points = budget.find_points(tmp_path)
    paths = budget_report.write_report(tmp_path, points, n_flips=50)
    validation = pd.read_csv(paths["validation_csv"])
    assert len(validation) == 6 and set(validation["step"]) == {900}  # the last validation, not the first
    finer = budget_report.voxel_comparison(validation, pd.read_csv(paths["csv"]), points).set_index("channel")
    assert finer.loc["liver", "val finer - base"] == pytest.approx(4.0)
    assert finer.loc["spleen", "val finer - base"] == pytest.approx(-10.0)
    assert finer.loc["liver tumor", "val (finer)"] == pytest.approx(21.0)
    mean = finer.loc["mean over channels"]
    assert mean["val finer - base"] == pytest.approx((4.0 + 1.0 - 10.0) / 3, abs=0.05)
    assert mean["SL train s (base, finer)"] == "200, 500" and mean["SL validation s (base, finer)"] == "20, 80"
    text = paths["md"].read_text()
    assert "## The finer voxel against the base voxel at the same budget" in text
    # kept without checkpoints (the committed reference): the rows written before are reused, not lost
    for folder in ("scale-3", "scale-3-3mm"):
        for model in run_folder.checkpoints_dir(tmp_path / folder).iterdir():
            (model / "history.csv").unlink()
    again = budget_report.write_report(tmp_path, points, n_flips=50)
    assert pd.read_csv(again["validation_csv"]).equals(validation)
    assert "## The finer voxel against the base voxel" in again["md"].read_text()


def test_the_contrast_study_of_a_point_decides_its_fedgin_claim(tmp_path):
    folder = write_point(tmp_path, 1)
    contrast = folder / budget.CONTRAST
    (contrast / "metrics").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            for tested in ("CT", "MRI"):
                for k in range(8):
                    base = rng.uniform(0.1, 0.5)
                    rows += [{"model": "fedavg-global", "dataset": dataset, "case_id": f"{dataset}_{k}",
                              "channel": channel, "dice": base, "contrast": tested},
                             {"model": "fedgin-global", "dataset": dataset, "case_id": f"{dataset}_{k}",
                              "channel": channel, "dice": base + 0.05 + rng.normal(0, 0.01), "contrast": tested}]
    pd.DataFrame(rows).to_csv(contrast / "metrics" / "contrast_per_case.csv", index=False)
    profile = {"data": {"phantom": {"mri_like": ["liver", "spleen"]}}}
    (contrast / "run.json").write_text(json.dumps({"notebooks": {}, "profile_config": profile}))
    table = budget_report.point_claims(budget.find_points(tmp_path)[0], n_flips=500)
    fedgin = table[table["paper"] == claims.FEDGIN]
    assert len(fedgin) == 1 and fedgin["verdict"].iloc[0] == claims.HELD
    assert "`contrast/`" in fedgin["tested on"].iloc[0]


# ---- running and resuming, runners mocked ----

@pytest.fixture
def mocked(monkeypatch, tmp_path):
    """run_budget with every runner replaced by one that records its call and writes what a finished run leaves
    (run.json entries, checkpoints, the files the skip checks read)."""
    calls = []

    def ok(folder, *notebooks, parameters=None):
        record_path = run_folder.run_record(folder)
        record = json.loads(record_path.read_text()) if record_path.exists() else {"notebooks": {}}
        for name in notebooks:
            record["notebooks"][name] = {"status": "ok", "wall_s": 1.0, "parameters": parameters or {}}
        record.update(host={"cpus": 2}, profile_config=load_profile("smoke"))
        folder.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record))

    def touch(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    def chain(profile, run_name, params, only, results, log_output):
        folder = results / run_name
        calls.append(("chain", run_name, only, params["compare_loss"]))
        assert os.path.isfile(profile) and profile.endswith(PROFILE_FILE)
        name = next(n for n in run.CHAIN if n.startswith(only))
        ok(folder, name, parameters={"compare_loss": ""})
        if name == run_folder.FEDERATED:
            touch(run_folder.checkpoint(folder, "fl-global"))
        if name == run_folder.BASELINES:
            touch(run_folder.checkpoint(folder, "central"))
        return folder

    def sweep(profile, *, federations, run_name, results, params, log_output):
        calls.append(("sweep", run_name, tuple(federations)))
        for method, loss in federations:
            ok(results / run_name / f"{method}-{loss}", run_folder.FEDERATED)
        touch(run_folder.table_file(results / run_name, "sweep_methods"))

    def nodes(profile, nodes, *, run_name, results, params, log_output):
        folder = results / run_name
        calls.append(("nodes", run_name, nodes))
        for n in nodes:
            touch(node_sets.central_checkpoint(folder, n))
            for method in node_sets.FL_ROWS.values():
                target = node_sets.federation_dir(folder, n, method)
                calls.append(("nodes federation", run_name, n, method, target.relative_to(folder).as_posix()))
                ok(target, run_folder.FEDERATED)
                touch(run_folder.checkpoint(target, "fl-global"))
        run_folder.metrics_dir(folder).mkdir(exist_ok=True)
        rows = [f"{node_sets.setup_name(n)},{model},img1,liver,0.5" for n in nodes
                for model in (node_sets.CENTRAL, *node_sets.FL_ROWS)]
        run_folder.metrics_file(folder, "segviz_nodes_per_case.csv").write_text(
            "setup,model,case_id,organ,dice\n" + "\n".join(rows) + "\n")

    def contrast(profile, mri_like, methods, *, run_name, results, params, log_output):
        calls.append(("contrast", results.name, run_name))
        for method in methods:
            ok(results / run_name / method, run_folder.FEDERATED)
        scores = run_folder.metrics_file(results / run_name, "contrast_per_case.csv")
        scores.parent.mkdir(parents=True, exist_ok=True)
        scores.write_text("model,dataset,case_id,channel,dice,contrast\n")

    # where run_budget looks them up
    monkeypatch.setattr(budget_runner, "run_chain", chain)
    monkeypatch.setattr(budget_runner, "run_sweep", sweep)
    monkeypatch.setattr(budget_runner, "run_nodes", nodes)
    monkeypatch.setattr(budget_runner, "run_contrast", contrast)
    return calls


def test_a_study_runs_each_piece_once_and_a_rerun_skips_every_finished_one(tmp_path, mocked):
    kwargs = {"fine_scale": 2, "fine_spacing": 6.0, "run_name": "study", "results": tmp_path}
    report = run.run_budget("smoke", (1, 2, 4), command="python -m fedseg budget --profile smoke", **kwargs)
    study = tmp_path / "study"
    assert report == study / "budget.md" and report.exists() and (study / "claims_by_scale.md").exists()
    folders = ["scale-1", "scale-2", "scale-4", "scale-2-6mm"]
    chain = [c for c in mocked if c[0] == "chain"]
    assert chain == [("chain", f, n, "") for f in folders for n in run.CHAIN]  # 03's compared federation off
    assert [c[1] for c in mocked if c[0] == "sweep"] == folders
    assert {c[2] for c in mocked if c[0] == "sweep"} == {budget.SWEEP}
    # node sets and contrast study at the two smallest scales, base voxel only
    assert [c[1] for c in mocked if c[0] == "nodes"] == ["scale-1", "scale-2"]
    assert [c[1:] for c in mocked if c[0] == "contrast"] == [("scale-1", "contrast"), ("scale-2", "contrast")]
    # the 4-node FedAvg is the chain's own federation: not trained again
    four = {c[3]: c[4] for c in mocked if c[0] == "nodes federation" and c[1] == "scale-1" and c[2] == 4}
    assert four == {"fedavg": ".", "segviz": "nodes-4/segviz"}
    for folder, scale, spacing in zip(folders, (1, 2, 4, 2), (None, None, None, 6.0)):
        written = yaml.safe_load((study / folder / PROFILE_FILE).read_text())
        assert written == budget.budget_profile(load_profile("smoke"), scale, spacing)
    mocked.clear()
    run.run_budget("smoke", (1, 2, 4), **kwargs)  # everything finished: nothing runs again
    assert mocked == []
    runs = pd.read_csv(study / run.BUDGET_RUNS)
    assert list(runs["status"]) == ["ok", "ok"] and runs["command"].iloc[0].endswith("--profile smoke")
    assert "python -m fedseg budget --profile smoke" in report.read_text()  # the command that trained it


def test_an_interrupted_study_resumes_at_the_first_unfinished_piece(tmp_path, mocked, monkeypatch):
    kwargs = {"fine_scale": None, "nodes_scales": (), "contrast_scales": (), "run_name": "s", "results": tmp_path}
    sweep = budget_runner.run_sweep  # the mocked one

    def broken(*args, run_name, **rest):
        if run_name == "scale-2":
            raise run.ChainError("03 failed")
        return sweep(*args, run_name=run_name, **rest)

    monkeypatch.setattr(budget_runner, "run_sweep", broken)
    with pytest.raises(run.ChainError):
        run.run_budget("smoke", (1, 2), **kwargs)
    assert pd.read_csv(tmp_path / "s" / run.BUDGET_RUNS)["status"].tolist() == ["failed"]
    monkeypatch.setattr(budget_runner, "run_sweep", sweep)
    mocked.clear()
    run.run_budget("smoke", (1, 2), **kwargs)
    assert mocked == [("sweep", "scale-2", budget.SWEEP)]  # scale-1 and scale-2's chain were finished


def test_a_folder_run_with_another_profile_is_refused_before_anything_runs(tmp_path, mocked):
    kwargs = {"fine_scale": None, "nodes_scales": (), "contrast_scales": (), "run_name": "s", "results": tmp_path}
    run.run_budget("smoke", (1, 2), **kwargs)
    mocked.clear()
    with pytest.raises(ValueError, match=r"scale-1 was run with another profile \(budget.rounds: 'kept' there, "
                       r"'scaled' now\)"):
        run.run_budget("smoke", (1, 2), scale_rounds=True, **kwargs)
    with pytest.raises(ValueError, match="not among --scales"):
        run.run_budget("smoke", (1, 2), **{**kwargs, "nodes_scales": (3,)})
    assert mocked == []
    other = tmp_path / "t" / "scale-1"
    other.mkdir(parents=True)
    (other / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds another run"):
        run.run_budget("smoke", (1,), **{**kwargs, "run_name": "t"})


def test_the_sweep_runs_exactly_the_federations_named(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(studies, "_run_baselines", lambda *a, **k: None)  # where run_sweep looks them up
    monkeypatch.setattr(studies, "_run_federation_notebook",
                        lambda profile, run_dir, folder, params, log: ran.append((folder.name, params)))
    monkeypatch.setattr(studies, "sweep_table", lambda run_dir, folders: pd.DataFrame({"x": [1]}, index=list(folders)))
    monkeypatch.setattr(studies, "save_table", lambda *a, **k: None)
    monkeypatch.setattr(studies, "_write_readme", lambda run_dir: None)
    run.run_sweep("smoke", federations=budget.SWEEP, run_name="s", results=tmp_path)
    assert ran == [("fedavg-literal_dice_ce", {"method": "fedavg", "loss": "literal_dice_ce"}),
                   ("ownerfedavg-dice_ce", {"method": "ownerfedavg", "loss": "dice_ce"})]


def test_the_command_line_passes_the_studys_options(tmp_path, monkeypatch):
    seen = {}

    def fake(profile, scales, **kwargs):
        seen.update(profile=profile, scales=scales, **kwargs)
        path = tmp_path / "budget.md"
        path.write_text("# x\n- **Shen et al. 2022**: a claim: held at 1x. Trend: stable.\n")
        return path

    monkeypatch.setattr(cli, "run_budget", fake)  # where main looks it up
    argv = ["budget", "--profile", "smoke", "--scales", "1,2", "--fine-scale", "", "--nodes-scales", "1",
            "--contrast-scales", "", "--run-name", "b", "--report-only"]
    assert run.main(argv) == 0
    assert seen["scales"] == (1, 2) and seen["fine_scale"] is None and seen["nodes_scales"] == (1,)
    assert seen["contrast_scales"] == () and seen["report_only"] and seen["run_name"] == "b"
    assert seen["command"] == "python -m fedseg budget --profile smoke --scales 1,2 --fine-scale '' --nodes-scales 1 " \
                              "--contrast-scales '' --run-name b --report-only"


# ---- end to end, smoke profile ----

@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """Two tiny scales of the smoke profile, SegViz's 4-node set at 1x (the 2- and 3-node sets' real runs are
    `tests/test_chain.py`'s sweep test), the contrast study at 2x, no finer voxel: every piece runs for real, once,
    and the tests below read what it wrote. (study folder, command, environment, wall seconds)"""
    base = tmp_path_factory.mktemp("budget")
    env = {**os.environ, "FEDSEG_DATA": str(base / "data"), "FEDSEG_CACHE": str(base / "cache")}
    command = [sys.executable, "-m", "fedseg", "budget", "--profile", "smoke", "--scales", "1,2", "--fine-scale", "",
               "--nodes-scales", "1", "--nodes", "4", "--contrast-scales", "2", "--run-name", "b",
               "--results", str(base / "results")]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return base / "results" / "b", command, env, time.perf_counter() - start


@pytest.mark.slow
def test_the_budget_study_end_to_end_on_the_smoke_profile(smoke_study):
    """Dice and cost per point, the claims side by side, each experiment where it was asked for, the chain's FedAvg
    reused as the 4-node set's conventional FL, and a rerun that finds nothing to do (13 s)."""
    study, command, env, first = smoke_study
    dice = pd.read_csv(study / "budget.csv")
    assert set(dice["point"]) == {"1x", "2x"} and set(dice["sl_steps"]) == {4, 8}
    assert {"SL", "FL global", "FL local"} <= set(dice["model"]) and (dice["cpu_hours"] > 0).all()
    assert set(dice["federation"]) >= {"fedavg, loss dice_ce", "fedavg, loss literal_dice_ce",
                                       "ownerfedavg, loss dice_ce"}
    side = pd.read_csv(study / "claims_by_scale.csv")
    assert list(side.columns[3:5]) == ["1x", "2x"] and side["trend"].notna().all()
    # the smoke profile has too few cases to decide a claim; its evidence says which experiments ran where
    points = {p["label"]: p for p in budget.find_points(study)}
    evidence = {label: budget_report.point_claims(p, n_flips=100).set_index("claim")["evidence"]
                for label, p in points.items()}
    segviz, fedgin = "SegViz > conventional FL at each node set", claims.fedgin_claims(None, ())[0]["claim"]
    assert "did not run" not in evidence["1x"][segviz] and "did not run" in evidence["2x"][segviz]
    assert "did not run" in evidence["1x"][fedgin] and "did not run" not in evidence["2x"][fedgin]
    timing = pd.read_csv(study / "scale-1" / "metrics" / "segviz_nodes_time.csv").set_index(["setup", "model"])
    chain = json.loads((study / "scale-1" / "run.json").read_text())["notebooks"][run_folder.FEDERATED]
    assert timing.loc[("4-node", "Conventional FL"), "wall_s"] == chain["wall_s"]  # the chain's FedAvg, reused
    assert not (study / "scale-1" / "nodes-4" / "fedavg").exists()
    assert set(timing.index.get_level_values("setup")) == {"4-node", "all"}  # the set asked for, and the scoring
    assert (study / "budget.png").stat().st_size > 10_000 and "CPU-hours" in (study / "budget.md").read_text()
    start = time.perf_counter()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "fedseg budget: scale-" not in again.stdout  # nothing ran again
    print(f"budget study, smoke profile: {first:.0f} s; rerun {time.perf_counter() - start:.0f} s")


@pytest.mark.slow
def test_the_contrast_study_tests_every_model_in_both_contrasts(smoke_study):
    """FedGIN's cross-contrast experiment as the budget's 2x point ran it (`run_contrast`, the default MRI-like
    clients; the command line's own options are checked in `test_the_contrast_command_passes_its_options`)."""
    study, _, env, _ = smoke_study
    run_dir = study / "scale-2" / budget.CONTRAST
    record = json.loads((run_dir / "run.json").read_text())
    assert record["profile_config"]["data"]["phantom"]["mri_like"] == sorted(contrast.DEFAULT_MRI_LIKE)
    synthetic = Path(env["FEDSEG_DATA"]) / "synthetic"
    generated = next(p for p in synthetic.iterdir() if "-mri" in p.name)
    for client, folder in (("spleen", "Task09_Spleen"), ("liver", "Task03_Liver"), ("pancreas", "Task07_Pancreas")):
        modality = json.loads((generated / folder / "dataset.json").read_text())["modality"]["0"]
        # the MRI-like clients' training data is MRI-like, the others' stays CT
        assert modality.startswith("MRI-like") == (client in contrast.DEFAULT_MRI_LIKE), (client, modality)
    scores = pd.read_csv(run_dir / "metrics" / "contrast_per_case.csv")
    assert set(scores.contrast) == {"CT", "MRI"}
    per_contrast = scores.groupby("contrast").size()
    assert per_contrast["CT"] == per_contrast["MRI"]  # the same cases and channels in each contrast
    for method in ("fedavg", "fedgin"):
        assert json.loads((run_dir / method / "fl" / "config.json").read_text())["federated"]["method"] == method
    summary = pd.read_csv(run_dir / "tables" / "contrast_summary.csv", index_col=0)
    assert list(summary.index) == ["SL", "fedavg: FL global model", "fedavg: FL local model",
                                   "fedgin: FL global model", "fedgin: FL local model"]
    assert summary.notna().all().all() and summary.apply(lambda c: c.between(0, 100)).all().all()
    assert (run_dir / "figures" / "contrast_channels.png").exists()


def test_the_contrast_command_passes_its_options(tmp_path, monkeypatch):
    seen = {}

    def fake(profile, mri_like, methods, **kwargs):
        seen.update(profile=profile, mri_like=mri_like, methods=methods, **kwargs)
        (tmp_path / "tables").mkdir()
        (tmp_path / "tables" / "contrast_summary.md").write_text("| a table |")
        return tmp_path

    monkeypatch.setattr(cli, "run_contrast", fake)  # where main looks it up
    argv = ["contrast", "--profile", "smoke", "--mri-like", "spleen", "--methods", "fedavg,fedgin", "--run-name", "gin",
            "--results", str(tmp_path)]
    assert run.main(argv) == 0
    assert (seen["profile"], seen["mri_like"], seen["methods"]) == ("smoke", ("spleen",), ("fedavg", "fedgin"))
    assert seen["run_name"] == "gin" and seen["results"] == str(tmp_path)


def test_a_point_written_before_a_setting_existed_still_matches_and_a_changed_one_does_not(tmp_path, mocked):
    """A point's profile.yaml is compared as loaded onto the base profile: one written by an earlier version (no
    `preprocess.gin`, `compare_loss: ""` for unset) is the same point; a changed setting is still refused."""
    import yaml

    kwargs = {"fine_scale": None, "nodes_scales": (), "contrast_scales": (), "run_name": "s", "results": tmp_path}
    run.run_budget("smoke", (1,), **kwargs)
    path = tmp_path / "s" / "scale-1" / "profile.yaml"
    written = yaml.safe_load(path.read_text())
    del written["preprocess"]["gin"]
    path.write_text(yaml.safe_dump(written))
    run.run_budget("smoke", (1,), **kwargs)  # accepted: the same point
    written["train"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(written))
    with pytest.raises(ValueError, match=r"train.lr: 0.5 there"):
        run.run_budget("smoke", (1,), **kwargs)
    assert budget.profile_difference({"federated": {"compare_loss": ""}}, {"federated": {"compare_loss": None}}) == []
    assert budget.profile_difference({"federated": {"compare_loss": ""}}, {"federated": {"compare_loss": "x"}})


def test_points_kept_without_their_checkpoints_are_not_trained_again(tmp_path, mocked):
    """Reference results keep a point's run.json, tables and scores but no checkpoints: a study resumed from them
    (copied into a study folder) trains nothing it already scored."""
    kwargs = {"fine_scale": None, "nodes_scales": (1,), "contrast_scales": (1,), "run_name": "s", "results": tmp_path}
    run.run_budget("smoke", (1,), **kwargs)
    assert {c[0] for c in mocked} >= {"chain", "sweep", "nodes", "contrast"}
    for path in (tmp_path / "s").rglob("*.pt"):
        path.unlink()
    mocked.clear()
    run.run_budget("smoke", (1,), **kwargs)
    assert mocked == []
    scores = run_folder.metrics_file(tmp_path / "s" / "scale-1", "segviz_nodes_per_case.csv")
    scores.write_text("".join(line for line in scores.read_text().splitlines(keepends=True) if "3-node" not in line))
    run.run_budget("smoke", (1,), **kwargs)  # a node set the scores lack: the node sets run again
    assert [c[:2] for c in mocked if c[0] == "nodes"] == [("nodes", "scale-1")]
