"""End to end: the whole papermill chain on the smoke profile, from an empty data folder, as a user runs it."""

import json
import os
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

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
    assert "finished" in stdout


def test_data_prep_outputs(smoke_run):
    run_dir, _ = smoke_run
    cases = pd.read_csv(run_dir / "data" / "cases.csv")
    table1 = pd.read_csv(run_dir / "tables" / "table1.csv", index_col=0)
    assert table1.loc["MSD liver", "train (paper)"] == 79
    # Table 1 of this run counts exactly the cases the later notebooks will use
    assert table1["total (this run)"].sum() == len(cases)
    assert set(cases.dataset) == {"liver", "pancreas", "kits19", "spleen", "btcv"}
    fingerprint = pd.read_csv(run_dir / "tables" / "fingerprint.csv", index_col=0)
    assert len(fingerprint) == 5 and fingerprint["orientation"].nunique() > 1
    assert (run_dir / "figures" / "fig1_datasets.png").stat().st_size > 10_000
    data = json.loads((run_dir / "data" / "data.json").read_text())
    assert data["cases"] == len(cases) and data["source"] == "synthetic"
