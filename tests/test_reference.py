"""The committed reference results (results/reference/, one laptop-profile run) have the paper's tables' shape.

They are what the README's "results at a glance" shows; these checks keep them complete and self-consistent:
the paper's rows and columns are all there, the paper's numbers are the published ones, and this run's
averages are the means they claim to be.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedseg.data.manifest import TABLE1
from fedseg.experiments import nodes
from fedseg.published import KANHERE_NODES, SHEN_DATASET_NAMES, SHEN_TABLE2, SHEN_TABLE2_CHANNELS, SHEN_TABLE3
from fedseg.run import CHAIN

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"


def read(name):
    path = REFERENCE / "tables" / f"{name}.csv"
    assert path.exists(), (f"{path} is missing: regenerate the reference run "
                           "(docs/reproducibility.md, 'Regenerating the reference')")
    return pd.read_csv(path, index_col=0)


def test_the_reference_run_is_complete_and_recorded():
    record = json.loads((REFERENCE / "run.json").read_text())
    assert record["status"] == "ok" and record["profile"] == "laptop"
    assert list(record["notebooks"]) == list(CHAIN)
    assert all(entry["status"] == "ok" for entry in record["notebooks"].values())
    readme = (REFERENCE / "README.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3"):
        assert heading in readme
    for link in readme.split("](")[1:]:  # every figure the README shows is committed
        assert (REFERENCE / link.split(")")[0]).exists(), link


def test_table1_has_the_papers_rows_and_counts():
    table = read("table1")
    assert list(table.index) == [SHEN_DATASET_NAMES[d] for d in ("liver", "pancreas", "kits19", "spleen", "btcv")]
    assert tuple(table.loc["MSD liver", ["train (paper)", "val (paper)", "test (paper)"]]) == TABLE1["liver"]
    assert table.loc["BTCV (external)", "test (paper)"] == TABLE1["btcv"][2]


def test_table2_has_the_papers_rows_and_columns():
    table = read("table2")
    assert list(table.columns) == [c.replace("_", " ") for c in SHEN_TABLE2_CHANNELS] + ["Avg."]
    for name, values in SHEN_TABLE2.items():
        assert np.allclose(table.loc[f"{name} (paper)"], values)
        run = table.loc[f"{name} (this run)"]
        assert run.iloc[:-1].between(0, 100).all()
        assert run["Avg."] == pytest.approx(run.iloc[:-1].mean(), abs=0.06)  # the stated definition


def test_table3_has_the_papers_rows_and_columns():
    table = read("table3")
    assert list(table.columns) == ["Liver", "Pancreas", "Kidney", "Spleen", "Avg."]
    for name, values in SHEN_TABLE3.items():
        assert np.allclose(table.loc[f"{name} (paper)"], values)
    for name in ("SL (ensemble)", "FL global model", "FL local model (ensemble)", "FL local model (processed)"):
        run = table.loc[f"{name} (this run)"]
        assert run.iloc[:-1].between(0, 100).all()
        assert run["Avg."] == pytest.approx(run.iloc[:-1].mean(), abs=0.06)
    detail = read("table3_detail")
    assert len(detail) > 0


def readme_row(section, label):
    """The numbers of the README's row `label` in the "Results at a glance" table headed `section`."""
    readme = (REFERENCE.parents[1] / "README.md").read_text()
    part = readme[readme.index(section):]
    line = next(line for line in part.splitlines() if line.startswith(f"| {label} |"))
    return [float(cell.strip().rstrip("*")) for cell in line.strip("|").split("|")[1:]]


def test_the_readme_shows_the_reference_tables_numbers():
    table2, table3 = read("table2"), read("table3")
    for readme, table in (("SL (this run)", "SL (this run)"),
                          ("FL global model (this run)", "FL global model (server) (this run)"),
                          ("FL local model (this run)", "FL local model (client) (this run)")):
        assert readme_row("**Table 2**", readme) == pytest.approx(table2.loc[table].tolist(), abs=0.051), readme
    for readme, table in (("SL ensemble (this run)", "SL (ensemble) (this run)"),
                          ("FL global model (this run)", "FL global model (this run)"),
                          ("FL local ensemble (this run)", "FL local model (ensemble) (this run)"),
                          ("FL local ensemble, processed (this run)", "FL local model (processed) (this run)")):
        assert readme_row("**Table 3**", readme) == pytest.approx(table3.loc[table].tolist(), abs=0.051), readme


def test_the_reference_segviz_table_has_every_node_set_with_the_papers_rows():
    table = pd.read_csv(REFERENCE / "sweep" / "segviz_nodes.csv", index_col=0)
    for (setup, model), organs in KANHERE_NODES.items():
        name = model if setup == "single" else f"{setup} {model}"
        paper, run = table.loc[f"{name} (paper)"], table.loc[f"{name} (this run)"]
        for organ in nodes.ORGANS:
            assert (paper[organ] == "-") == (organ not in organs) == (run[organ] == "-")
            if organ in organs:
                assert paper[organ] == "{:.2f} ± {:.2f}".format(*organs[organ])
                mean, std = (float(x) for x in run[organ].split(" ± "))
                assert 0 <= mean <= 1 and std >= 0
    scores = pd.read_csv(REFERENCE / "sweep" / "segviz_nodes_per_case.csv")
    means = scores.groupby(["setup", "model", "organ"])["dice"].mean()
    assert table.loc["4-node SegViz (this run)", "spleen"].startswith(f"{means[('4-node', 'SegViz', 'spleen')]:.2f}")
    timing = pd.read_csv(REFERENCE / "sweep" / "segviz_nodes_time.csv")
    assert {(s, m) for s, m in KANHERE_NODES if s != "single"} <= set(zip(timing.setup, timing.model)) | {
        ("4-node", nodes.CENTRAL)}  # 4 nodes: 02's central model, timed in the chain
    sweep = pd.read_csv(REFERENCE / "sweep" / "sweep_methods.csv", index_col=0)
    assert np.allclose(sweep.loc["fedavg: FL local model (client) (Shen et al. 2022)"].iloc[:8],
                       SHEN_TABLE2["FL local model (client)"])


def test_the_reference_cross_contrast_run_tests_every_model_in_both_contrasts():
    folder = REFERENCE / "contrast"
    summary = pd.read_csv(folder / "contrast_summary.csv", index_col=0)
    assert list(summary.index) == ["SL", "fedavg: FL global model", "fedavg: FL local model",
                                   "fedgin: FL global model", "fedgin: FL local model"]
    assert summary.apply(lambda c: c.between(0, 100)).all().all()
    scores = pd.read_csv(folder / "contrast_per_case.csv")
    counts = scores.groupby("contrast").size()
    assert set(counts.index) == {"CT", "MRI"} and counts["CT"] == counts["MRI"]
    channels = pd.read_csv(folder / "contrast_channels.csv", index_col=0)
    liver = scores[(scores.model == "fedgin-global") & (scores.channel == "liver") & (scores.dataset == "liver")]
    assert channels.loc["fedgin: FL global model", "liver (CT)"] == pytest.approx(
        100 * liver[liver.contrast == "CT"]["dice"].mean(), abs=0.06)


def test_the_reference_claims_are_what_its_scores_decide():
    """The claims table of the README is recomputed from the committed per-case scores: nothing in it was typed."""
    from fedseg.reporting.claims import claims_table, verdicts_in

    committed = pd.read_csv(REFERENCE / "tables" / "claims.csv")
    again = claims_table(REFERENCE, seed=0)
    assert list(again["verdict"]) == list(committed["verdict"])
    assert list(again["evidence"]) == list(committed["evidence"])
    assert list(again["tested on"]) == list(committed["tested on"])
    readme = (REFERENCE / "README.md").read_text()
    assert verdicts_in(readme) == list(committed["verdict"])  # whole cells: "held" is not inside "not held"


def test_the_results_page_shows_the_reference_claims():
    """The claims table of docs/results.md (the reference's analysis, linked from the project README) is the
    reference's claims.csv, row by row."""
    committed = pd.read_csv(REFERENCE / "tables" / "claims.csv")
    readme = (REFERENCE.parents[1] / "docs" / "results.md").read_text()
    for _, row in committed.iterrows():
        assert f"| {row['paper']} | {row['claim']} | {row['tested on']} |" in readme, row["tested on"]
        line = next(line for line in readme.splitlines()
                    if line.startswith(f"| {row['paper']} | {row['claim']} | {row['tested on']} |"))
        assert line.rstrip().endswith(f"| {row['verdict']} |")


def test_the_committed_results_name_no_machine_folders():
    """run.json and the other records keep paths relative to the run folder or the project (<run_dir>, <repo>,
    <home>): an absolute path would name the machine that made them and mean nothing on another."""
    found = []

    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, str) and value.startswith("/") and value.count("/") >= 2:
            found.append(f"{where}: {value}")

    for path in sorted(REFERENCE.rglob("*.json")):
        walk(json.loads(path.read_text()), str(path.relative_to(REFERENCE)))
    assert not found, "\n".join(found)


def test_the_budget_studys_claims_are_what_its_committed_points_decide():
    """The budget reference's claims at each point (claims_by_scale.csv) are recomputed from the points' committed
    per-case scores, trend included, and the README's table along the budget is built from that file: no verdict in
    either was typed."""
    from fedseg import run_folder
    from fedseg.experiments import budget
    from fedseg.reporting import budget as budget_report

    study = REFERENCE / "budget"
    committed = pd.read_csv(study / "claims_by_scale.csv")
    points = [p for p in budget.find_points(study) if run_folder.run_record(p["folder"]).exists()]
    again = budget_report.points_side_by_side(points, seed=0)
    assert list(again.columns) == list(committed.columns)
    for column in again.columns:
        assert list(again[column]) == list(committed[column]), column
    readme = (REFERENCE.parents[1] / "README.md").read_text()
    assert budget_report.summary_table(committed) in readme
