"""The run folder is the contract between the notebooks: one module names every artifact's path."""

import re
from pathlib import Path

import pytest

from fedseg import run_folder

SRC = Path(__file__).resolve().parents[1] / "src" / "fedseg"


def test_each_artifact_has_its_path(tmp_path):
    assert run_folder.cases_file(tmp_path) == tmp_path / "data" / "cases.csv"
    assert run_folder.checkpoint(tmp_path, "sl-liver") == tmp_path / "checkpoints" / "sl-liver" / "best.pt"
    assert run_folder.checkpoint(tmp_path, "fl-global", "final") == tmp_path / "checkpoints" / "fl-global" / "final.pt"
    assert run_folder.table_file(tmp_path, "table2", ".md") == tmp_path / "tables" / "table2.md"
    assert run_folder.figure_file(tmp_path, "fig4") == tmp_path / "figures" / "fig4.png"
    assert run_folder.predictions_dir(tmp_path, "btcv", "fl-global") == tmp_path / "predictions" / "btcv" / "fl-global"
    assert run_folder.fl_status(tmp_path) == tmp_path / "fl" / "status.json"
    assert run_folder.fl_state(tmp_path) == tmp_path / "fl" / "state.pt"
    assert run_folder.model_notebook("sl-liver") == run_folder.BASELINES
    assert run_folder.model_notebook("fl-local-spleen") == run_folder.FEDERATED


def test_a_missing_cases_table_names_the_notebook_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cases.csv is missing: run 01_data_prep with this run_dir first "
                                                r"\(python -m fedseg run --only 01 --run-name"):
        run_folder.read_cases(tmp_path)
    run_folder.cases_file(tmp_path).parent.mkdir()
    run_folder.cases_file(tmp_path).write_text("dataset,case_id\nliver,liver_0\n")
    assert run_folder.read_cases(tmp_path)["case_id"].tolist() == ["liver_0"]


def test_no_other_module_spells_a_run_folder_path():
    """Every artifact's path comes from run_folder: a literal "best.pt", "cases.csv" or `/ "checkpoints"`
    elsewhere in the package (docstrings and comments aside) would fork the contract."""
    pattern = re.compile(r'"(best\.pt|final\.pt|cases\.csv|status\.json|state\.pt|summary\.json)"'
                         r'|/ "(checkpoints|metrics|tables|figures|predictions|fl|data)"|"run\.json"')
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "run_folder.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            project = "repo_root()" in code  # the project's data/ folder, not a run's
            if pattern.search(code) and not project and not code.strip().startswith(('"', "`")):
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_notebooks_name_run_folder_paths_through_run_folder():
    """The notebooks are the contract's other side: their code cells reach a run's files through run_folder too,
    so a renamed artifact cannot leave one notebook writing where the next no longer reads."""
    import json

    pattern = re.compile(r'"(best\.pt|final\.pt|cases\.csv|data\.json|baselines\.json)"'
                         r'|/ "(checkpoints|metrics|tables|figures|predictions|fl|data|models)"|"loss-')
    found = []
    for path in sorted((SRC.parents[1] / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            for line in "".join(cell["source"]).splitlines():
                code = line.split("#", 1)[0]
                if pattern.search(code):
                    found.append(f"{path.name}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_sub_run_reads_its_baselines_through_its_link_and_the_pair_moves_together(tmp_path):
    from fedseg import run_folder

    run_dir, sub = tmp_path / "sweep", tmp_path / "sweep" / "fedavg-dice_ce"
    run_folder.cases_file(run_dir).parent.mkdir(parents=True)
    run_folder.cases_file(run_dir).write_text("case_id,dataset,split\nliver_1,liver,train\n")
    run_folder.metrics_dir(run_dir).mkdir()
    run_folder.sl_metrics_file(run_dir, "test_dice_per_case.csv").write_text("x\n1\n")
    assert run_folder.baselines_dir(sub) == sub  # no link: a run is its own baselines
    run_folder.link_baselines(sub, run_dir)
    assert run_folder.read_cases(sub).case_id.tolist() == ["liver_1"]
    assert run_folder.sl_metrics_file(sub, "test_dice_per_case.csv").read_text() == "x\n1\n"
    moved = tmp_path / "elsewhere"
    run_dir.rename(moved)  # the link is relative: the study folder can be moved or committed
    assert run_folder.read_cases(moved / "fedavg-dice_ce").case_id.tolist() == ["liver_1"]
