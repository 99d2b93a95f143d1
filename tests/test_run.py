"""The chain's machinery: profiles, run folders, parameters, and how a failing notebook is reported."""

import json

import nbformat
import pytest

from fedseg import run


@pytest.mark.parametrize("name", run.PROFILE_NAMES)
def test_profiles_load_with_every_preprocessing_knob(name):
    profile = run.load_profile(name)
    assert profile["name"] == name
    for key in ("spacing", "hu_window", "intensity_shift", "patch_size", "patch_sampling", "patches_per_volume"):
        assert key in profile["preprocess"], key
    assert profile["preprocess"]["hu_window"] == [-500, 500]
    assert profile["preprocess"]["intensity_shift"] == {"prob": 0.8, "offset": 0.1}


def test_paper_profile_has_the_papers_settings():
    paper = run.load_profile("paper")
    assert paper["preprocess"]["spacing"] == [1.0, 1.0, 1.0]
    assert paper["preprocess"]["patch_size"] == [96, 96, 96]
    assert paper["data"]["source"] == "real"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'laptp'"):
        run.load_profile("laptp")


def test_paper_profile_without_data_root_says_how_to_fix():
    with pytest.raises(ValueError, match="data_root"):
        run.resolve("paper")


def test_synthetic_data_root_depends_on_seed_and_generator_settings(tmp_path):
    laptop = run.load_profile("laptop")
    a = run.synthetic_data_root(laptop, 0, tmp_path)
    assert a == run.synthetic_data_root(laptop, 0, tmp_path)
    assert a != run.synthetic_data_root(laptop, 1, tmp_path)
    laptop["data"]["phantom"]["case_scale"] = 0.2
    assert a != run.synthetic_data_root(laptop, 0, tmp_path)


def test_an_earlier_run_is_never_overwritten_unless_asked(tmp_path):
    first = run.new_run_dir(tmp_path, "r1", "smoke", overwrite=False, only=None)
    (first / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run.new_run_dir(tmp_path, "r1", "smoke", overwrite=False, only=None)
    assert (first / "run.json").exists()
    again = run.new_run_dir(tmp_path, "r1", "smoke", overwrite=True, only=None)
    assert again == first and not (first / "run.json").exists()


def test_param_values_are_parsed_as_yaml():
    assert run._parse_param("seed=3") == ("seed", 3)
    assert run._parse_param("data_root=/data/x") == ("data_root", "/data/x")
    assert run._parse_param("interactive=false") == ("interactive", False)


def _notebook(path, sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_stops_the_chain_naming_notebook_and_cell(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "01_good.ipynb", ["profile = None\nrun_dir = None\ndata_root = None\nseed = None",
                                            "open('good.txt', 'w').write(str(seed))"])
    _notebook(notebooks / "02_bad.ipynb", ["profile = None\nrun_dir = None\ndata_root = None\nseed = None",
                                           "x = 1", "raise RuntimeError('deliberate failure')"])
    _notebook(notebooks / "03_never.ipynb", ["profile = None\nrun_dir = None\ndata_root = None\nseed = None"])
    monkeypatch.setattr(run, "notebooks_dir", lambda: notebooks)
    with pytest.raises(run.ChainError) as failure:
        run.run_chain("smoke", run_name="r", results=tmp_path / "results", params={"seed": 7},
                      notebooks=("01_good", "02_bad", "03_never"))
    message = str(failure.value)
    assert "02_bad" in message and "cell" in message and "deliberate failure" in message
    run_dir = tmp_path / "results" / "r"
    assert (run_dir / "good.txt").read_text() == "7"  # parameters reached the notebook, cwd is the run folder
    assert (run_dir / "02_bad.ipynb").exists()  # the executed notebook is kept for inspection
    assert not (run_dir / "03_never.ipynb").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["notebooks"]["01_good"]["status"] == "ok"
    assert record["notebooks"]["01_good"]["peak_rss_mb"] > 10
    assert record["notebooks"]["02_bad"]["status"] == "failed"
    assert "03_never" not in record["notebooks"]
    assert record["versions"]["torch"].startswith("2.13")
    host = record["host"]  # what a run's numbers depend on beyond code and settings
    assert host["cpus"] >= 1 and host["torch_threads"] >= 1 and host["cpu_model"]
    assert host["deterministic_algorithms"] in (True, False) and "thread_env" in host
    text = (run_dir / "run.json").read_text()  # no machine's folders in a record meant to be shared
    assert str(tmp_path) not in text and record["notebooks"]["01_good"]["parameters"]["run_dir"] == "<run_dir>"


def test_portable_replaces_machine_paths(tmp_path):
    record = {"a": str(tmp_path / "results" / "r" / "x.csv"), "b": [str(run.repo_root() / "data")], "c": 3}
    clean = run.portable(record, tmp_path / "results" / "r")
    assert clean == {"a": "<run_dir>/x.csv", "b": ["<repo>/data"], "c": 3}


def test_a_run_rewriting_results_does_not_mark_the_code_dirty(tmp_path, monkeypatch):
    """Regenerating the committed reference rewrites tracked files under results/: the run's commit still names
    the code that ran; a changed source file does make it dirty."""
    import subprocess

    from fedseg import run

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(run, "repo_root", lambda: tmp_path)
    (tmp_path / "results" / "table.md").write_text("new\n")
    record = run.git_commit()
    assert record["commit"] and record["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert run.git_commit()["dirty"] is True


def test_an_unknown_parameter_is_refused_naming_the_closest(tmp_path):
    """Issue: `-p stepz 5` printed one easily missed papermill line and ran with the defaults."""
    with pytest.raises(ValueError, match=r"Unknown parameter 'stepz' \(did you mean 'steps'\?\)"):
        run.run_chain("smoke", run_name="r", results=tmp_path / "results", params={"stepz": 5})
    assert not (tmp_path / "results" / "r").exists()  # refused before anything ran or was created
    with pytest.raises(ValueError, match=r"'compare_los' \(did you mean 'compare_loss'\?\)"):
        run.run_chain("smoke", run_name="r", results=tmp_path / "results", params={"compare_los": ""}, only="03")
    run.check_parameters({"steps": 5, "seed": 1, "method": "fedavg"}, run.CHAIN)  # every notebook's, and seed
