"""Working with part of the data: a run declares the datasets (and cases) it uses, those are checked strictly,
the others are listed as absent (not as problems), and the later notebooks work on what is present."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from fedseg import config, run, run_folder
from fedseg.config import merge_profile
from fedseg.data import datasets as ds
from fedseg.data.datasets import (
    DataError,
    check_dataset,
    manifest_for,
    obtain_data,
    require_valid,
)
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.evaluate import external

SHAPE = (12, 10, 6)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])

#: A small manifest of every dataset in its real layout (two cases each; spleen three, one per split).
ROWS = [
    ("liver", "liver_0", "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "train"),
    ("liver", "liver_1", "imagesTr/liver_1.nii.gz", "labelsTr/liver_1.nii.gz", "val"),
    ("pancreas", "pancreas_001", "imagesTr/pancreas_001.nii.gz", "labelsTr/pancreas_001.nii.gz", "train"),
    ("pancreas", "pancreas_004", "imagesTr/pancreas_004.nii.gz", "labelsTr/pancreas_004.nii.gz", "val"),
    ("kits19", "case_00000", "case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz", "train"),
    ("kits19", "case_00001", "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz", "val"),
    ("spleen", "spleen_2", "imagesTr/spleen_2.nii.gz", "labelsTr/spleen_2.nii.gz", "train"),
    ("spleen", "spleen_3", "imagesTr/spleen_3.nii.gz", "labelsTr/spleen_3.nii.gz", "val"),
    ("spleen", "spleen_6", "imagesTr/spleen_6.nii.gz", "labelsTr/spleen_6.nii.gz", "test"),
    ("btcv", "img0001", "img/img0001.nii.gz", "label/label0001.nii.gz", "test"),
    ("btcv", "img0002", "img/img0002.nii.gz", "label/label0002.nii.gz", "test"),
]
FOLDERS = {"liver": "Task03_Liver", "pancreas": "Task07_Pancreas", "kits19": "kits19/data", "spleen": "Task09_Spleen",
           "btcv": "BTCV"}
LABEL_VALUES = {"spleen": (0, 1), "btcv": (0, 1, 6, 11)}


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


def _manifest() -> pd.DataFrame:
    return pd.DataFrame([dict(dataset=d, case_id=c, image=i, label=lab, split=s,
                              split_source="paper" if d == "btcv" else "seeded") for d, c, i, lab, s in ROWS])


@pytest.fixture
def partial_root(tmp_path):
    """A data root that holds MSD spleen and BTCV only (real layouts), with the manifest of all five datasets."""
    root = tmp_path / "data"
    manifest = _manifest()
    rng = np.random.default_rng(0)
    for row in manifest.itertuples():
        if row.dataset not in LABEL_VALUES:
            continue
        folder = root / FOLDERS[row.dataset]
        _save(folder / row.image, rng.integers(-1000, 1000, SHAPE).astype(np.int16))
        label = rng.choice(np.asarray(LABEL_VALUES[row.dataset], dtype=np.uint8), size=SHAPE)
        _save(folder / row.label, label)
    manifest.to_csv(root / "manifest.csv", index=False)  # a data root's own manifest (manifest_for reads it)
    return root


def test_declared_datasets_are_checked_and_the_others_listed_as_absent(partial_root):
    check = ds.check_data(partial_root, datasets=("spleen", "btcv"), progress=False)
    assert len(check.problems) == 0
    assert check.datasets == ("spleen", "btcv")
    assert check.absent == ("liver", "pancreas", "kits19")
    assert set(check.cases["dataset"]) == {"spleen", "btcv"} and len(check.cases) == 5
    assert list(check.cases.columns) == list(manifest_for(partial_root).columns)
    assert "absent" in check.summary().lower() and "liver, pancreas, kits19" in check.summary()
    require_valid(partial_root, manifest=check.cases, report=check.problems)  # nothing to raise
    # the same as a comma-separated string (how `-p datasets=spleen,btcv` arrives)
    assert (ds.check_data(partial_root, datasets="spleen, btcv", progress=False).absent
            == ("liver", "pancreas", "kits19"))


def test_nothing_declared_still_checks_every_dataset(partial_root):
    check = ds.check_data(partial_root, progress=False)
    assert check.absent == () and set(check.datasets) == set(FOLDERS)
    assert set(check.problems["dataset"]) == {"liver", "pancreas", "kits19"}
    assert len(check.problems) == 12  # image and label of each of the 6 cases: the strict default is unchanged


def test_a_declared_dataset_missing_one_image_is_an_error_naming_it(partial_root):
    missing = partial_root / "Task09_Spleen" / "imagesTr" / "spleen_3.nii.gz"
    missing.unlink()
    check = ds.check_data(partial_root, datasets="spleen,btcv", progress=False)
    assert check.problems["file"].tolist() == [str(missing)]
    with pytest.raises(DataError, match="1 problem") as info:
        require_valid(partial_root, manifest=check.cases, report=check.problems)
    assert str(missing) in str(info.value)


def test_a_missing_data_root_says_so_instead_of_naming_a_missing_image(tmp_path):
    root = tmp_path / "no-such-folder"
    expected = f"data root {root} does not exist"
    with pytest.raises(DataError, match="data root .* does not exist") as info:
        ds.check_data(root, manifest=_manifest(), progress=False)
    assert expected in str(info.value)
    with pytest.raises(DataError) as info:
        check_dataset(root, manifest=_manifest(), progress=False)
    assert expected in str(info.value) and "Task03_Liver" not in str(info.value)
    with pytest.raises(DataError) as info:
        require_valid(root, manifest=_manifest(), progress=False)
    assert expected in str(info.value)
    cfg = {"data_root": str(root), "data": {"source": "real", "datasets": "spleen,btcv"}, "seed": 0}
    with pytest.raises(DataError) as info:
        obtain_data(cfg)
    assert expected in str(info.value)


def test_declared_cases_are_checked_and_the_rest_ignored(partial_root):
    # spleen_6 is broken on disk, but not declared: ignored, and its files are no "not in manifest" warning
    (partial_root / "Task09_Spleen" / "labelsTr" / "spleen_6.nii.gz").unlink()
    check = ds.check_data(partial_root, cases="spleen_2,spleen_3,img0002", progress=False)
    assert len(check.problems) == 0
    assert check.cases["case_id"].tolist() == ["spleen_2", "spleen_3", "img0002"]
    assert check.datasets == ("spleen", "btcv") and check.absent == ("liver", "pancreas", "kits19")
    # a declared case is checked strictly
    (partial_root / "BTCV" / "img" / "img0002.nii.gz").unlink()
    check = ds.check_data(partial_root, cases=["spleen_2", "img0002"], progress=False)
    assert check.problems["file"].tolist() == [str(partial_root / "BTCV" / "img" / "img0002.nii.gz")]
    # cases narrow only the datasets they name: all of BTCV, two spleen cases
    check = ds.check_data(partial_root, datasets="spleen,btcv", cases="spleen_2,spleen_3", progress=False)
    assert check.cases["case_id"].tolist() == ["spleen_2", "spleen_3", "img0001", "img0002"]


def test_unknown_or_undeclared_names_are_refused(partial_root):
    with pytest.raises(ValueError, match="lung"):
        ds.check_data(partial_root, datasets="spleen,lung", progress=False)
    with pytest.raises(DataError, match="spleen_99"):
        ds.check_data(partial_root, cases="spleen_2,spleen_99", progress=False)
    with pytest.raises(DataError, match="liver_0.*not declared|not declared.*liver_0"):
        ds.check_data(partial_root, datasets="spleen", cases="spleen_2,liver_0", progress=False)


def test_obtain_data_requires_only_the_declared_folders(partial_root):
    cfg = {"data_root": str(partial_root), "data": {"source": "real", "datasets": "spleen,btcv", "cases": ""},
           "seed": 0}
    assert obtain_data(cfg, progress=False) == partial_root
    cfg["data"]["datasets"] = ""
    with pytest.raises(DataError, match="Task03_Liver") as info:
        obtain_data(cfg, progress=False)
    assert "datasets=" in str(info.value)  # says how to run on what is there


def test_profiles_and_notebook_01_take_datasets_and_cases():
    import papermill as pm

    for name in config.PROFILE_NAMES:
        assert config.load_profile(name)["data"]["datasets"] == "" and config.load_profile(name)["data"]["cases"] == ""
    params = pm.inspect_notebook(str(config.notebooks_dir() / "01_data_prep.ipynb"))
    assert {"datasets", "cases"} <= set(params)
    run.check_parameters({"datasets": "spleen,btcv", "cases": "spleen_2"}, run.CHAIN)  # not refused
    # 01's parameters win over the profile's data.datasets / data.cases; "" (the profiles' default) means all
    profile = config.load_profile("smoke")
    assert ds.declare(profile)["data"]["datasets"] is None and profile["data"]["cases"] is None
    profile = {"data": {"datasets": "btcv,spleen", "cases": ""}}
    assert ds.declare(profile)["data"]["datasets"] == ["spleen", "btcv"]  # study order
    assert ds.declare(profile, "liver", ["liver_0"])["data"] == {"datasets": ["liver"], "cases": ["liver_0"]}


def _cases(datasets) -> pd.DataFrame:
    return _manifest()[lambda m: m["dataset"].isin(datasets)].reset_index(drop=True)


def test_training_datasets_and_clients_follow_the_cases_present():
    cases = _cases(("spleen", "btcv"))
    assert ds.training_datasets(cases) == ("spleen",)
    assert ds.federation_clients(None, cases) == "spleen"
    assert ds.federation_clients("", cases) == "spleen"
    everything = _manifest()
    assert ds.training_datasets(everything) == TRAIN_DATASETS
    assert ds.federation_clients(None, everything) == ",".join(TRAIN_DATASETS)
    assert ds.federation_clients("liver,spleen", everything) == "liver,spleen"  # a user's clients win
    with pytest.raises(ValueError, match="liver.*absent"):
        ds.federation_clients("liver,spleen", cases)
    with pytest.raises(ValueError, match="no training dataset"):
        ds.training_datasets(_cases(("btcv",)))
    no_val = cases[cases["case_id"] != "spleen_3"]
    with pytest.raises(ValueError, match="spleen.*val"):
        ds.training_datasets(no_val)


def test_external_evaluation_uses_the_models_of_the_datasets_present(tmp_path):
    (tmp_path / "data").mkdir()
    _cases(("spleen", "btcv")).to_csv(tmp_path / "data" / "cases.csv", index=False)
    for name in ("sl-spleen", "fl-local-spleen", "fl-global"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        torch.save({}, tmp_path / "checkpoints" / name / "best.pt")
    groups = external.run_checkpoints(tmp_path)
    assert set(groups) == {"sl", "fl-local", "fl-global"}
    assert set(groups["sl"]) == {"spleen"} and set(groups["fl-local"]) == {"spleen"}


def test_external_evaluation_without_btcv_is_skipped_with_a_message(tmp_path, capsys):
    cases = _cases(("spleen",))
    result = external.evaluate_btcv({}, cases, tmp_path, progress=False)
    assert result["scores"].empty and result["timing"].empty
    assert {"method", "case_id", "organ", "dice"} <= set(result["scores"].columns)
    assert "BTCV" in capsys.readouterr().out


def _pointwise(image):
    """A fake network: every foreground channel on where the image is bright (intensity > 0.5)."""
    score = (image - 0.5) * 20
    return torch.cat([-score, *[score] * 7], dim=1)


def _btcv_config(data_root) -> dict:
    return merge_profile({"data_root": str(data_root), "data": {"source": "real"},
                          "preprocess": {"spacing": [2.0, 2.0, 2.0], "hu_window": [-500, 500], "patch_size": [8, 8, 8]},
                          "train": {"sw_batch_size": 1, "sw_overlap": 0.25, "amp": False}})


def test_external_evaluation_refuses_up_front_when_btcv_files_are_missing(partial_root, tmp_path, monkeypatch):
    """A data root lacking one of the run's BTCV cases: one error naming the missing file and the fix, before any
    model is loaded (not a bare FileNotFoundError from nibabel half-way through the cases)."""
    missing = partial_root / "BTCV" / "label" / "label0001.nii.gz"
    missing.unlink()
    run_dir = tmp_path / "run"
    loaded = []
    monkeypatch.setattr(external, "run_checkpoints", lambda *a, **k: {"fl-global": {"model": run_dir / "best.pt"}})
    monkeypatch.setattr(external, "load_group", lambda *a, **k: loaded.append(a) or {"model": _pointwise})
    cases = _cases(("spleen", "btcv"))
    with pytest.raises(FileNotFoundError, match="1 of the run's 2 BTCV test cases") as info:
        external.evaluate_btcv(_btcv_config(partial_root), cases, run_dir, coarse_to_fine=False, write=False,
                               progress=False)
    message = str(info.value)
    assert str(missing) in message and "No case was evaluated" in message
    assert "-p datasets=spleen,btcv -p cases=img0002" in message  # the fix: declare the cases present in 01
    assert loaded == []  # refused before any model was loaded

    # 04 pointed at another data root than 01 prepared the run from: said so, with the one 01 used
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "data.json").write_text('{"data_root": "/data/fedseg"}')
    with pytest.raises(FileNotFoundError, match="data_root=/data/fedseg"):
        external.require_btcv_files(_btcv_config(partial_root), cases, run_dir)
    # no BTCV case left: the fix is a run without BTCV
    (partial_root / "BTCV" / "img" / "img0002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="2 of the run's 2") as info:
        external.require_btcv_files(_btcv_config(partial_root), cases)
    assert "-p datasets=spleen`" in str(info.value)


def test_external_evaluation_records_an_organ_the_first_stage_missed(partial_root, tmp_path, monkeypatch):
    """Coarse-to-fine with a first stage that finds nothing: each case and organ recorded as missed, segmented over
    the full window, and the speed table keeps those cases out of the mean coverage."""
    run_dir = tmp_path / "run"

    def blind(batch):
        return torch.full((batch.shape[0], 8, *batch.shape[2:]), -5.0)

    monkeypatch.setattr(external, "run_checkpoints", lambda *a, **k: {"fl-local": {"spleen": run_dir / "best.pt"}})
    monkeypatch.setattr(external, "load_group", lambda *a, **k: {"spleen": _pointwise})
    monkeypatch.setattr(external, "load_localiser", lambda *a, **k: ({"localiser": blind}, 2.0))
    result = external.evaluate_btcv(_btcv_config(partial_root), _cases(("spleen", "btcv")), run_dir, write=False,
                                    progress=False)
    record = result["localiser"]
    assert list(record.columns) == list(external.LOCALISER_COLUMNS)
    assert record[["case_id", "organ", "found", "fine_window"]].values.tolist() == [
        ["img0001", "spleen", False, "full"], ["img0002", "spleen", False, "full"]]
    assert set(record["first_stage"]) == {"localiser"}
    speed = external.speed_table(result["scores"], result["timing"], localiser=record)
    assert speed.loc[external.COARSE, "cases with a full-window fallback"] == 2
    assert speed.loc[external.COARSE, "organs over the full window"] == "spleen (2)"
    assert np.isnan(speed.loc[external.COARSE, "fine pass coverage (mean)"])  # no case ran on its box alone


def test_figures_notebook_skips_fig3_and_its_view_without_a_btcv_prediction(partial_root, tmp_path, capsys):
    """05 on a run without BTCV (or without 04's prediction): Fig. 3 and the interactive view are skipped with a
    note, instead of failing with `image_path` undefined."""
    import nbformat

    notebook = nbformat.read(config.notebooks_dir() / "05_figures.ipynb", as_version=4)
    cells = [c.source for c in notebook.cells
             if c.cell_type == "code" and ("fig3_btcv" in c.source or "viewing.show" in c.source)]
    assert len(cells) == 2
    run_dir = tmp_path / "run"
    namespace = {"cfg": _btcv_config(partial_root), "cases": _cases(("spleen",)), "run_dir": run_dir,
                 "interactive": True, "viewer": "niivue", "external": external, "display": print}
    for source in cells:
        exec(source, namespace)
    out = capsys.readouterr().out
    assert "no Fig. 3" in out and "No BTCV prediction to view" in out

    cfg, cases = _btcv_config(partial_root), _cases(("spleen", "btcv"))
    assert external.figure_case(cfg, cases, run_dir) is None  # BTCV in the run, but 04 wrote no prediction
    assert "no Fig. 3" in capsys.readouterr().out
    prediction = run_folder.predictions_dir(run_dir, "btcv", external.slug(external.LOCAL_PP), "img0002.nii.gz")
    prediction.parent.mkdir(parents=True)
    prediction.write_bytes(b"")
    assert external.figure_case(cfg, cases, run_dir) == (
        "img0002", partial_root / "BTCV" / "img" / "img0002.nii.gz", prediction)
