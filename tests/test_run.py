"""The chain's machinery: profiles, run folders, parameters, and how a failing notebook is reported."""

import json
import os

import nbformat
import pytest

from fedseg import config, run
from fedseg.run import chain as chain_module
from fedseg.run import notebook as notebook_module


@pytest.mark.parametrize("name", config.PROFILE_NAMES)
def test_profiles_load_with_every_preprocessing_knob(name):
    profile = config.load_profile(name)
    assert profile["name"] == name
    for key in ("spacing", "hu_window", "intensity_shift", "patch_size", "patch_sampling", "patches_per_volume"):
        assert key in profile["preprocess"], key
    assert profile["preprocess"]["hu_window"] == [-500, 500]
    assert profile["preprocess"]["intensity_shift"] == {"prob": 0.8, "offset": 0.1}


def test_paper_profile_has_the_papers_settings():
    paper = config.load_profile("paper")
    assert paper["preprocess"]["spacing"] == [1.0, 1.0, 1.0]
    assert paper["preprocess"]["patch_size"] == [96, 96, 96]
    assert paper["data"]["source"] == "real"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'laptp'"):
        config.load_profile("laptp")


def test_paper_profile_without_data_root_says_how_to_fix():
    with pytest.raises(ValueError, match="data_root"):
        config.resolve("paper")


def test_synthetic_data_root_depends_on_seed_and_generator_settings(tmp_path):
    laptop = config.load_profile("laptop")
    a = config.synthetic_data_root(laptop, 0, tmp_path)
    assert a == config.synthetic_data_root(laptop, 0, tmp_path)
    assert a != config.synthetic_data_root(laptop, 1, tmp_path)
    laptop["data"]["phantom"]["case_scale"] = 0.2
    assert a != config.synthetic_data_root(laptop, 0, tmp_path)


def test_an_earlier_run_is_never_overwritten_unless_asked(tmp_path):
    first = run.new_run_dir(tmp_path, "r1", "smoke", overwrite=False, only=None)
    (first / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run.new_run_dir(tmp_path, "r1", "smoke", overwrite=False, only=None)
    assert (first / "run.json").exists()
    again = run.new_run_dir(tmp_path, "r1", "smoke", overwrite=True, only=None)
    assert again == first and not (first / "run.json").exists()
    # one notebook rerun with --overwrite keeps the folder (it reads the earlier notebooks' files); the notebook
    # itself is told to overwrite (03's finished federation), see run_chain
    (first / "data").mkdir()
    (first / "data" / "cases.csv").write_text("dataset\n")
    assert run.new_run_dir(tmp_path, "r1", "smoke", overwrite=True, only="03") == first
    assert (first / "data" / "cases.csv").exists()


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
    # looked up where it is used: the parameter check (notebook) and the chain
    monkeypatch.setattr(notebook_module, "notebooks_dir", lambda: notebooks)
    monkeypatch.setattr(chain_module, "notebooks_dir", lambda: notebooks)
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
    record = {"a": str(tmp_path / "results" / "r" / "x.csv"), "b": [str(config.repo_root() / "data")], "c": 3}
    clean = run.portable(record, tmp_path / "results" / "r")
    assert clean == {"a": "<run_dir>/x.csv", "b": ["<repo>/data"], "c": 3}


def test_a_run_rewriting_results_does_not_mark_the_code_dirty(tmp_path, monkeypatch):
    """Regenerating the committed reference rewrites tracked files under results/: the run's commit still names
    the code that ran; a changed source file does make it dirty."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(config, "package_checkout", lambda: tmp_path)  # the checkout the code comes from
    (tmp_path / "results" / "table.md").write_text("new\n")
    record = config.git_commit()
    assert record["commit"] and record["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert config.git_commit()["dirty"] is True


def test_an_unknown_parameter_is_refused_naming_the_closest(tmp_path):
    """Issue: `-p stepz 5` printed one easily missed papermill line and ran with the defaults."""
    with pytest.raises(ValueError, match=r"Unknown parameter 'stepz' \(did you mean 'steps'\?\)"):
        run.run_chain("smoke", run_name="r", results=tmp_path / "results", params={"stepz": 5})
    assert not (tmp_path / "results" / "r").exists()  # refused before anything ran or was created
    with pytest.raises(ValueError, match=r"'compare_los' \(did you mean 'compare_loss'\?\)"):
        run.run_chain("smoke", run_name="r", results=tmp_path / "results", params={"compare_los": ""}, only="03")
    run.check_parameters({"steps": 5, "seed": 1, "method": "fedavg"}, run.CHAIN)  # every notebook's, and seed


def _project(folder):
    """A second fedseg checkout (its pyproject.toml names the project) with a notebooks folder."""
    (folder / "notebooks").mkdir(parents=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "fedseg"\nversion = "0"\n')
    return folder.resolve()


def test_a_run_works_in_the_project_it_is_started_from_not_the_checkout_installed(tmp_path, monkeypatch):
    """Issue: repo_root() came from the installed package's path, so a second checkout using the first one's
    virtual environment wrote its results and data into the first."""
    second = _project(tmp_path / "second")
    monkeypatch.delenv(config.HOME_ENV, raising=False)
    monkeypatch.delenv("FEDSEG_DATA", raising=False)
    monkeypatch.chdir(second / "notebooks")  # JupyterLab's kernel starts in the notebook's folder
    assert config.package_checkout() != second  # this test's code comes from another checkout
    assert config.repo_root() == second
    assert config.resolve("smoke")["data_root"].startswith(str(second / "data" / "synthetic"))
    assert run.notebook_setup("smoke", None, None, None)["run_dir"] == str(second / "results" / "lab-smoke")
    assert config.notebooks_dir() == second / "notebooks"
    monkeypatch.setenv(config.HOME_ENV, str(tmp_path / "chosen"))  # the explicit setting wins
    assert config.repo_root() == (tmp_path / "chosen").resolve()
    monkeypatch.delenv(config.HOME_ENV)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)  # no fedseg project here or above: the working directory itself
    assert config.repo_root() == plain.resolve()


def test_the_chain_says_where_it_writes_and_its_kernels_share_the_project(tmp_path, monkeypatch, capsys):
    """The run folder may lie outside the project (--results): the notebooks, which run in it, must still
    resolve the project's data and cache, and the run says at its start where it writes."""
    second = _project(tmp_path / "second")
    _notebook(second / "notebooks" / "01_where.ipynb",
              ["profile = None\nrun_dir = None\ndata_root = None\nseed = None",
               "from fedseg import config\nopen('project.txt', 'w').write(str(config.repo_root()))"])
    _notebook(second / "notebooks" / "02_again.ipynb",
              ["profile = None\nrun_dir = None\ndata_root = None\nseed = None\noverwrite = False",
               "open('overwrite.txt', 'w').write(str(overwrite))"])
    monkeypatch.delenv(config.HOME_ENV, raising=False)
    monkeypatch.chdir(second)
    chain = ("01_where", "02_again")
    run_dir = run.run_chain("smoke", run_name="r", results=tmp_path / "elsewhere", notebooks=chain)
    assert (run_dir / "project.txt").read_text() == str(second)
    out = capsys.readouterr().out
    assert f"writing {run_dir}" in out and f"project {second}" in out
    assert config.HOME_ENV not in os.environ  # the setting lasts only while the chain runs
    assert (run_dir / "overwrite.txt").read_text() == "False"
    # --only 02 --overwrite: the folder and 01's files stay, and the notebook is told to overwrite its own
    run.run_chain("smoke", run_name="r", results=tmp_path / "elsewhere", notebooks=chain, only="02",
                  overwrite=True)
    assert (run_dir / "project.txt").exists() and (run_dir / "overwrite.txt").read_text() == "True"


def test_injected_parameters_the_notebook_lacks_are_found():
    history = ["", "profile = None\nsteps = None  # local steps\nseed: int | None = None", "# Parameters\nprofile = "
               "\"smoke\"\nstepz = 5\nseed = 1\n", "cfg = notebook_setup(profile, None, None, seed)"]
    assert run.injected_unknown(history) == (["stepz"], {"profile", "steps", "seed"})
    assert run.injected_unknown(history[:2]) == ([], set())  # JupyterLab: nothing injected, nothing refused
    assert run.injected_unknown(history[:2] + ["# Parameters\nsteps = 3\n"])[0] == []


def test_papermill_by_hand_with_an_unknown_parameter_is_refused_by_the_notebook(tmp_path):
    """Issue: `papermill ... -p stepz 5` printed one easily missed line and ran with the defaults."""
    import papermill as pm

    source = config.notebooks_dir() / "02_standalone_baselines.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as failure:
        pm.execute_notebook(str(source), str(tmp_path / "02.ipynb"), cwd=str(tmp_path), progress_bar=False,
                            parameters={"profile": "smoke", "run_dir": str(tmp_path / "run"), "stepz": 5})
    assert "Unknown parameter 'stepz' (did you mean 'steps'?)" in str(failure.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused at the set-up, before any training
