"""The external evaluation's tables, its bookkeeping of a run's models, and the run README (fast, no training)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedseg.data.labels import CHANNELS, TRAIN_DATASETS
from fedseg.evaluate import external, metrics
from fedseg.published import SHEN_TABLE3
from fedseg.reporting import readme, report, viewing


def scores_frame():
    """Two methods, two cases, two organs; method b misses the spleen of case 2 and case 2 has no kidney."""
    rows = []
    for method, dice in (("a", [0.8, 0.6, 0.5, 0.7]), ("b", [0.4, 0.2, 0.0, 0.3])):
        for (case, organ), value in zip([("c1", "liver"), ("c2", "liver"), ("c1", "spleen"), ("c2", "spleen")], dice):
            rows.append({"method": method, "case_id": case, "organ": organ, "dice": value, "nsd": value / 2,
                         "hd95": 10 * (1 - value), "pred_empty": value == 0.0, "truth_empty": False})
    rows.append({"method": "a", "case_id": "c2", "organ": "kidney", "dice": np.nan, "nsd": np.nan, "hd95": np.nan,
                 "pred_empty": True, "truth_empty": True})
    return pd.DataFrame(rows)


def test_table3_averages_the_four_organs_and_appends_the_papers_rows():
    dice = pd.DataFrame({"liver": [0.9], "pancreas": [0.5], "kidney": [0.7], "spleen": [0.1]},
                        index=["FL global model"])
    table = report.table3(dice)
    assert list(table.columns) == ["Liver", "Pancreas", "Kidney", "Spleen", "Avg."]
    assert table.loc["FL global model (this run)"].tolist() == [90.0, 50.0, 70.0, 10.0, 55.0]
    assert table.loc["FL local model (processed) (paper)"].tolist() == list(SHEN_TABLE3["FL local model (processed)"])
    assert len(table) == 1 + len(SHEN_TABLE3)


def test_table3_detail_shows_mean_std_ci_and_counts_missed_organs():
    summary = metrics.summarise(scores_frame(), n_boot=200, seed=0)
    detail = report.table3_detail(summary)
    assert list(detail.columns) == ["organ", "Dice", "NSD", "HD95 (mm)", "scored", "missed"]
    b_spleen = detail[(detail.index == "b") & (detail.organ == "spleen")].iloc[0]
    assert b_spleen["Dice"].startswith("0.150 ± 0.212") and (b_spleen["scored"], b_spleen["missed"]) == (2, 1)
    a_kidney = detail[(detail.index == "a") & (detail.organ == "kidney")].iloc[0]
    assert (a_kidney["scored"], a_kidney["missed"]) == (0, 0)  # no ground truth: not scored, not a miss
    assert list(detail.loc["a", "organ"]) == ["liver", "kidney", "spleen"]  # Table 3's organ order


def test_metric_bars_draw_one_bar_per_method_and_organ_with_the_ci():
    summary = metrics.summarise(scores_frame(), n_boot=200, seed=0)
    fig = report.metric_bars(summary, "dice")
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 2 * 3  # methods a, b x organs liver, kidney (NaN height), spleen
    heights = sorted(round(b.get_height(), 3) for b in bars if np.isfinite(b.get_height()))
    assert heights == [0.15, 0.3, 0.6, 0.7]


def test_run_checkpoints_counts_a_client_group_only_when_every_client_has_one(tmp_path):
    for name in ["sl-liver", "sl-pancreas", "sl-kits19", "fl-global", *[f"fl-local-{d}" for d in TRAIN_DATASETS]]:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        torch.save({}, tmp_path / "checkpoints" / name / "best.pt")
    groups = external.run_checkpoints(tmp_path)
    assert set(groups) == {"fl-global", "fl-local"}  # sl-spleen and central are missing
    assert external.group_methods(groups) == [external.GLOBAL, external.LOCAL, external.LOCAL_PP]
    assert external.slug(external.COARSE) == "fl-local-model-processed-coarse-to-fine"


def test_speed_table_puts_full_and_coarse_to_fine_side_by_side():
    scores = pd.DataFrame([{"method": m, "case_id": c, "organ": o, "dice": d}
                           for m, d0 in ((external.LOCAL_PP, 0.5), (external.COARSE, 0.7))
                           for c in ("c1", "c2") for o, d in (("liver", d0), ("spleen", d0 - 0.2))])
    timing = pd.DataFrame([{"method": external.LOCAL_PP, "case_id": "c1", "seconds": 2.0, "fine_pass_coverage": 1.0},
                           {"method": external.LOCAL_PP, "case_id": "c2", "seconds": 4.0, "fine_pass_coverage": 1.0},
                           {"method": external.COARSE, "case_id": "c1", "seconds": 1.0, "fine_pass_coverage": 0.3},
                           {"method": external.COARSE, "case_id": "c2", "seconds": 1.5, "fine_pass_coverage": 0.5}])
    table = external.speed_table(scores, timing)
    assert table.loc[external.LOCAL_PP, "seconds per case (mean)"] == 3.0
    assert table.loc[external.COARSE, "fine pass coverage (mean)"] == 0.4
    assert table.loc[external.COARSE, "Dice (mean of organs)"] == pytest.approx(0.6)
    # the first stage found every organ: the table is the same as without its record
    found = pd.DataFrame([{"case_id": c, "organ": o, "found": True, "fine_window": "box", "first_stage": "localiser"}
                          for c in ("c1", "c2") for o in ("liver", "spleen")])
    pd.testing.assert_frame_equal(external.speed_table(scores, timing, localiser=found), table)
    assert external.fallback_note(found) == ""
    # it missed c2's spleen: c2 is counted apart, not blended into the mean coverage
    missed = found.assign(found=[True, True, True, False], fine_window=["box", "box", "box", "full"])
    table = external.speed_table(scores, timing, localiser=missed)
    assert table.loc[external.COARSE, "fine pass coverage (mean)"] == 0.3
    assert table.loc[external.COARSE, "cases with a full-window fallback"] == 1
    assert table.loc[external.COARSE, "organs over the full window"] == "spleen (1)"
    assert table.loc[external.LOCAL_PP, "fine pass coverage (mean)"] == 1.0
    assert table.loc[external.LOCAL_PP, "cases with a full-window fallback"] == 0
    assert "1 case(s)" in external.fallback_note(missed) and "c2: spleen" in external.fallback_note(missed)


def test_table2_cases_takes_each_tasks_own_model_and_the_global_model_everywhere():
    frame = pd.DataFrame([{"model": m, "dataset": d, "case_id": f"{d}_1", "channel": d, "dice": v}
                          for m, d, v in (("fl-global", "liver", 0.1), ("fl-local-liver", "liver", 0.8),
                                          ("fl-local-spleen", "liver", 0.0), ("fl-global", "spleen", 0.2),
                                          ("fl-local-spleen", "spleen", 0.9))])
    cases = report.table2_cases(None, frame)
    local = cases[cases.method == "FL local model (client)"].set_index("organ")["dice"]
    assert local.to_dict() == {"liver": 0.8, "spleen": 0.9}  # fl-local-spleen on liver is not a Table 2 entry
    assert sorted(cases[cases.method == "FL global model (server)"]["dice"]) == [0.1, 0.2]


def test_a_fused_prediction_has_the_papers_colours_by_channel_index():
    colours = viewing.label_colours(viewing.PREDICTION)
    assert colours[CHANNELS.index("spleen")][0] == "spleen" and 0 not in colours and len(colours) == 7


def test_results_readme_shows_what_the_run_holds_and_nothing_else(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables" / "table3.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (tmp_path / "figures" / "fig3_btcv.png").write_bytes(b"png")
    record = {"profile": "laptop", "seed": 0, "status": "ok", "wall_s": 12.5, "peak_rss_mb": 100.0,
              "profile_config": {"data": {"source": "synthetic", "phantom": {"case_scale": 0.1}}},
              "notebooks": {"01_data_prep": {"status": "ok", "wall_s": 12.5, "peak_rss_mb": 100.0}}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    text = readme.results_readme(tmp_path).read_text()
    assert "## Table 3: Dice (%) on the external BTCV set" in text and "| 1 | 2 |" in text
    assert "(figures/fig3_btcv.png)" in text and "Table 2" not in text and "fig4" not in text
    assert "| 01_data_prep | ok | 12.5 | 100.0 |" in text and "| **chain** | ok | 12.5 | 100.0 |" in text
