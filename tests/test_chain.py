"""End to end: the whole papermill chain on the smoke profile, from an empty data folder, as a user runs it."""

import json
import os
import subprocess
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest

from fedseg import run_folder
from fedseg.data.manifest import TABLE1
from fedseg.data.phantom import PHANTOM_VERSION
from fedseg.published import SHEN_TABLE2
from fedseg.run import CHAIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("chain")
    env = {**os.environ, "FEDSEG_DATA": str(base / "data"), "FEDSEG_CACHE": str(base / "cache")}
    done = subprocess.run([sys.executable, "-m", "fedseg", "run", "--profile", "smoke", "--run-name", "e2e",
                           "--results", str(base / "results")], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    return base / "results" / "e2e", done.stdout


def test_every_notebook_ran_and_is_recorded(smoke_run):
    run_dir, stdout = smoke_run
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok"
    assert list(record["notebooks"]) == list(CHAIN)
    for name, entry in record["notebooks"].items():
        assert entry["status"] == "ok" and entry["wall_s"] > 0 and entry["peak_rss_mb"] > 50, name
        executed = nbformat.read(run_dir / f"{name}.ipynb", as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (name, errors)
    assert record["versions"]["monai"] and record["seed"] == 0 and "commit" in record["git"]
    assert record["phantom"]["version"] == PHANTOM_VERSION  # which generator made the run's synthetic data
    assert f"phantom {PHANTOM_VERSION}" in (run_dir / "README.md").read_text()
    assert "finished" in stdout


def test_data_prep_outputs(smoke_run):
    run_dir, _ = smoke_run
    cases = pd.read_csv(run_dir / "data" / "cases.csv")
    table1 = pd.read_csv(run_dir / "tables" / "table1.csv", index_col=0)
    assert table1.loc["MSD liver", "train (paper)"] == TABLE1["liver"][0]
    # Table 1 of this run counts exactly the cases the later notebooks will use
    assert table1["total (this run)"].sum() == len(cases)
    assert set(cases.dataset) == {"liver", "pancreas", "kits19", "spleen", "btcv"}
    fingerprint = pd.read_csv(run_dir / "tables" / "fingerprint.csv", index_col=0)
    assert len(fingerprint) == 5 and fingerprint["orientation"].nunique() > 1
    assert (run_dir / "figures" / "fig1_datasets.png").stat().st_size > 10_000
    anatomy = pd.read_csv(run_dir / "tables" / "anatomy.csv", index_col=0)  # the phantom against published anatomy
    assert "liver volume (mL)" in anatomy.index and (run_dir / "figures" / "anatomy.png").exists()
    data = json.loads(run_folder.data_summary(run_dir).read_text())
    assert data["cases"] == len(cases) and data["source"] == "synthetic"
    assert data["cached_cases"] == (cases.dataset != "btcv").sum()  # BTCV is read from its files by 04


def test_external_evaluation_outputs(smoke_run):
    import nibabel as nib

    from fedseg.data.layouts import case_files
    from fedseg.evaluate import external

    run_dir, _ = smoke_run
    cases = pd.read_csv(run_dir / "data" / "cases.csv")
    btcv = cases[cases.dataset == "btcv"]
    scores = pd.read_csv(run_dir / "metrics" / "btcv_per_case.csv")
    # every method on every BTCV case and organ, each organ scored or flagged, none dropped
    assert set(scores.method) == {*external.METHODS, external.COARSE}
    assert len(scores) == len(set(scores.method)) * len(btcv) * 4
    assert (scores.dice.notna() | scores.truth_empty).all()
    table3 = pd.read_csv(run_dir / "tables" / "table3.csv", index_col=0)
    assert "FL local model (processed) (this run)" in table3.index and "FL global model (paper)" in table3.index
    timing = pd.read_csv(run_dir / "metrics" / "btcv_timing.csv")
    assert (timing.seconds > 0).all()
    # predictions lie on the original BTCV grid, so they open over the CT
    row = btcv.iloc[0]
    data_root = json.loads(run_folder.data_summary(run_dir).read_text())["data_root"]
    image = nib.load(case_files(data_root, row)[0])
    prediction = nib.load(run_dir / "predictions" / "btcv" / external.slug(external.LOCAL_PP)
                          / f"{row['case_id']}.nii.gz")
    assert prediction.shape == image.shape and np.allclose(prediction.affine, image.affine)
    assert set(prediction.get_fdata().ravel().astype(int)) <= set(range(8))


def test_figures_and_the_run_readme(smoke_run):
    run_dir, _ = smoke_run
    for name in ("fig3_btcv", "fig4_test_cases", "table2_dice_bars", "btcv_dice_bars"):
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 10_000, name
    readme = (run_dir / "README.md").read_text()
    assert "Table 3" in readme and "(figures/fig3_btcv.png)" in readme
    assert "| **chain** | ok |" in readme  # rewritten once the chain ended


def test_a_sweep_runs_the_methods_side_by_side_and_the_segviz_node_sets_add_to_it(tmp_path):
    env = {**os.environ, "FEDSEG_DATA": str(tmp_path / "data"), "FEDSEG_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "fedseg", "sweep", "--profile", "smoke", "--methods",
                           "fedavg,fedprox,segviz", "--run-name", "sweep", "--results", str(tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "results" / "sweep"
    table = pd.read_csv(run_dir / "tables" / "sweep_methods.csv", index_col=0)
    assert list(table.index) == ["SL"] + [f"{m}: FL {k}" for m in ("fedavg", "fedprox", "segviz")
                                          for k in ("global model (server)", "local model (client)")] + [
        "SL (Shen et al. 2022)", "fedavg: FL global model (server) (Shen et al. 2022)",
        "fedavg: FL local model (client) (Shen et al. 2022)"]
    published = SHEN_TABLE2["FL local model (client)"][0]  # liver
    assert table.loc["fedavg: FL local model (client) (Shen et al. 2022)", "liver"] == published
    assert (table["03 wall time (s)"].dropna() > 0).all() and len(table["03 wall time (s)"].dropna()) == 6
    for method in ("fedavg", "fedprox", "segviz"):
        config = json.loads((run_dir / method / "fl" / "config.json").read_text())
        assert config["federated"]["method"] == method
        assert (run_dir / method / "checkpoints" / "fl-global" / "best.pt").exists()
        # a sub-run reads 01's cases and 02's SL scores from the sweep's folder, through its link, not from copies
        assert not (run_dir / method / "data" / "cases.csv").exists()
        assert not (run_dir / method / "metrics" / "test_dice_per_case.csv").exists()
        assert run_folder.cases_file(run_dir / method) == run_folder.cases_file(run_dir)
    assert json.loads((run_dir / "segviz" / "fl" / "config.json").read_text())["model"]["name"] == "SharedTaskUNet"

    # another loss into the same folder: 01/02 and the finished federations are kept, the new one runs, and the
    # mechanism of each federation is drawn side by side
    stamp = (run_dir / "fedavg" / "run.json").stat().st_mtime
    done = subprocess.run([sys.executable, "-m", "fedseg", "sweep", "--profile", "smoke", "--methods",
                           "fedavg,ownerfedavg", "--losses", "literal_dice_ce", "--run-name", "sweep",
                           "--results", str(tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run_dir / "fedavg" / "run.json").stat().st_mtime == stamp
    for folder in ("fedavg-literal_dice_ce", "ownerfedavg-literal_dice_ce"):
        config = json.loads((run_dir / folder / "fl" / "config.json").read_text())
        assert config["train"]["loss"] == "literal_dice_ce" and config["federated"]["method"] == folder.split("-")[0]
    dilution = pd.read_csv(run_dir / "tables" / "sweep_dilution.csv", index_col=[0, 1])
    assert set(dilution.index.get_level_values(0)) == {"fedavg-literal_dice_ce", "ownerfedavg-literal_dice_ce"}
    assert (dilution.loc["fedavg-literal_dice_ce", "others / owner move"] > 0).all()
    assert (run_dir / "figures" / "sweep_dilution.png").exists()
    claims = pd.read_csv(run_dir / "tables" / "claims.csv")
    assert "test splits, ownerfedavg, loss literal_dice_ce (`ownerfedavg-literal_dice_ce/`)" in set(claims["tested on"])

    # SegViz's node sets into the same folder: 01/02 and the sweep's 4-node federations are reused
    done = subprocess.run([sys.executable, "-m", "fedseg", "nodes", "--profile", "smoke", "--nodes", "2,4",
                           "--run-name", "sweep", "--results", str(tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (run_dir / "nodes-4").exists()
    segviz = json.loads((run_dir / "nodes-2" / "segviz" / "fl" / "config.json").read_text())["model"]
    assert segviz["name"] == "SharedTaskUNet" and segviz["tasks"] == ["liver", "spleen"]
    for method in ("fedavg", "segviz"):
        rounds = pd.read_csv(run_dir / "nodes-2" / method / "metrics" / "fl_rounds.csv")
        assert set(rounds.loc[rounds.kind == "train", "dataset"]) == {"liver", "spleen"}
    scores = pd.read_csv(run_dir / "metrics" / "segviz_nodes_per_case.csv")
    organs = scores.groupby(["setup", "model"])["organ"].agg(lambda o: sorted(set(o)))
    assert organs[("2-node", "SegViz")] == organs[("2-node", "Central aggregation")] == ["liver", "spleen"]
    assert organs[("4-node", "Conventional FL")] == ["kidney", "liver", "pancreas", "spleen"]
    assert scores.groupby(["setup", "model", "organ"]).size().eq(scores.case_id.nunique()).all()
    table = pd.read_csv(run_dir / "tables" / "segviz_nodes.csv", index_col=0)
    assert "2-node SegViz (this run)" in table.index and "4-node Conventional FL (paper)" in table.index
    assert table.loc["2-node SegViz (this run)", "pancreas"] == "-"
    timing = pd.read_csv(run_dir / "metrics" / "segviz_nodes_time.csv")
    assert {("2-node", "Central aggregation"), ("4-node", "SegViz")} <= set(zip(timing.setup, timing.model))
    assert (run_dir / "figures" / "segviz_nodes.png").exists()
