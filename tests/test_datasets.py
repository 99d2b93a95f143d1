"""Tests for the data-root validation in fedseg.data.datasets (check_case, check_dataset, require_valid, load_case)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedseg.data.datasets import (
    DataError,
    check_case,
    check_dataset,
    load_case,
    require_valid,
)

SHAPE = (40, 32, 16)  # big enough that half a .nii.gz still holds the whole header
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _image(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)


def _label(values=(0, 1, 2), shape=SHAPE) -> np.ndarray:
    """Random label map using exactly `values` (each one at least once)."""
    lab = np.random.default_rng(1).choice(np.asarray(values, dtype=np.uint8), size=shape)
    lab.flat[: len(values)] = values
    return lab


def _liver(root: Path, cases: list[str]) -> pd.DataFrame:
    """A clean liver dataset (MSD layout) of `cases` and its hand-made manifest."""
    rows = []
    for case in cases:
        _save(root / "Task03_Liver" / "imagesTr" / f"{case}.nii.gz", _image())
        _save(root / "Task03_Liver" / "labelsTr" / f"{case}.nii.gz", _label())
        rows.append(dict(dataset="liver", case_id=case, image=f"imagesTr/{case}.nii.gz",
                         label=f"labelsTr/{case}.nii.gz", split="train", split_source="seeded"))
    return pd.DataFrame(rows)


def _kits(root: Path, cases: list[str]) -> pd.DataFrame:
    rows = []
    for case in cases:
        _save(root / "kits19" / "data" / case / "imaging.nii.gz", _image())
        _save(root / "kits19" / "data" / case / "segmentation.nii.gz", _label())
        rows.append(dict(dataset="kits19", case_id=case, image=f"{case}/imaging.nii.gz",
                         label=f"{case}/segmentation.nii.gz", split="train", split_source="seeded"))
    return pd.DataFrame(rows)


def _truncate(path: Path) -> None:
    """Cut a .nii.gz in half; the header still loads, so only reading the data array finds the fault."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert nib.load(str(path)).shape == SHAPE


def _row(manifest: pd.DataFrame, case: str) -> pd.Series:
    return manifest.set_index("case_id", drop=False).loc[case]


@pytest.fixture
def liver(tmp_path):
    return tmp_path, _liver(tmp_path, ["liver_0", "liver_1", "liver_2", "liver_3"])


def test_clean_dataset_has_no_problems(liver):
    root, manifest = liver
    report = check_dataset(root, "liver", manifest, progress=False)
    assert list(report.columns) == ["dataset", "case_id", "file", "problem"]
    assert len(report) == 0
    assert check_case(root, _row(manifest, "liver_0")) == []
    require_valid(root, "liver", manifest, progress=False)  # does not raise


def test_missing_image_named(liver):
    root, manifest = liver
    path = root / "Task03_Liver" / "imagesTr" / "liver_1.nii.gz"
    path.unlink()
    problems = check_case(root, _row(manifest, "liver_1"))
    assert len(problems) == 1
    assert str(path) in problems[0] and "missing" in problems[0]


def test_truncated_gzip_named(liver):
    root, manifest = liver
    path = root / "Task03_Liver" / "labelsTr" / "liver_2.nii.gz"
    _truncate(path)
    problems = check_case(root, _row(manifest, "liver_2"))
    assert len(problems) == 1
    assert str(path) in problems[0] and "truncated or corrupt" in problems[0]


def test_truncated_image_header_only_named(liver):
    root, manifest = liver
    path = root / "Task03_Liver" / "imagesTr" / "liver_2.nii.gz"
    path.write_bytes(path.read_bytes()[:30])  # not even a header
    problems = check_case(root, _row(manifest, "liver_2"))
    assert len(problems) == 1 and str(path) in problems[0]


def test_shape_mismatch_named(liver):
    root, manifest = liver
    path = _save(root / "Task03_Liver" / "labelsTr" / "liver_0.nii.gz", _label(shape=(40, 32, 15)))
    problems = check_case(root, _row(manifest, "liver_0"))
    assert len(problems) == 1
    assert str(path) in problems[0] and "shape" in problems[0] and "(40, 32, 15)" in problems[0]


def test_affine_mismatch_named(liver):
    root, manifest = liver
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5  # half a millimetre off
    path = _save(root / "Task03_Liver" / "labelsTr" / "liver_0.nii.gz", _label(), shifted)
    problems = check_case(root, _row(manifest, "liver_0"))
    assert len(problems) == 1
    assert str(path) in problems[0] and "affine" in problems[0]


def test_affine_within_tolerance_is_fine(liver):
    root, manifest = liver
    nudged = AFFINE.copy()
    nudged[0, 3] = 1e-4
    _save(root / "Task03_Liver" / "labelsTr" / "liver_0.nii.gz", _label(), nudged)
    assert check_case(root, _row(manifest, "liver_0")) == []


def test_label_value_outside_map_named(liver):
    root, manifest = liver
    path = _save(root / "Task03_Liver" / "labelsTr" / "liver_3.nii.gz", _label(values=(0, 1, 2, 3)))
    problems = check_case(root, _row(manifest, "liver_3"))
    assert len(problems) == 1
    assert str(path) in problems[0] and "[3]" in problems[0] and "liver" in problems[0]


def test_check_dataset_reports_all_problems_at_once(liver):
    root, manifest = liver
    base = root / "Task03_Liver"
    (base / "imagesTr" / "liver_0.nii.gz").unlink()
    _truncate(base / "labelsTr" / "liver_1.nii.gz")
    _save(base / "labelsTr" / "liver_2.nii.gz", _label(values=(0, 3, 7)))
    report = check_dataset(root, "liver", manifest, progress=False)
    assert set(report["case_id"]) == {"liver_0", "liver_1", "liver_2"}
    assert len(report) == 3
    assert set(report["file"]) == {
        str(base / "imagesTr" / "liver_0.nii.gz"),
        str(base / "labelsTr" / "liver_1.nii.gz"),
        str(base / "labelsTr" / "liver_2.nii.gz"),
    }
    assert "[3, 7]" in report.loc[report["case_id"] == "liver_2", "problem"].item()
    for file, problem in zip(report["file"], report["problem"]):
        assert file in problem


def test_one_case_with_several_faults_reports_each(liver):
    root, manifest = liver
    base = root / "Task03_Liver"
    shifted = AFFINE.copy()
    shifted[1, 1] = 0.9
    _save(base / "labelsTr" / "liver_0.nii.gz", _label(values=(0, 5)), shifted)
    problems = check_case(root, _row(manifest, "liver_0"))
    assert len(problems) == 2  # affine and label values


def test_require_valid_raises_with_count_and_files(liver):
    root, manifest = liver
    base = root / "Task03_Liver"
    (base / "imagesTr" / "liver_0.nii.gz").unlink()
    (base / "labelsTr" / "liver_3.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        require_valid(root, "liver", manifest, progress=False)
    message = str(info.value)
    assert message.startswith("2 problem(s)")
    assert str(base / "imagesTr" / "liver_0.nii.gz") in message
    assert str(base / "labelsTr" / "liver_3.nii.gz") in message


def test_unlisted_files_are_warnings(liver):
    root, manifest = liver
    base = root / "Task03_Liver"
    _save(base / "imagesTr" / "liver_9.nii.gz", _image())
    (base / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\0" * 10)  # macOS AppleDouble junk: ignored
    report = check_dataset(root, "liver", manifest, progress=False)
    assert len(report) == 1
    assert report["problem"].item().startswith("not in manifest")
    assert report["file"].item() == str(base / "imagesTr" / "liver_9.nii.gz")
    require_valid(root, "liver", manifest, progress=False)  # a warning is not a fault
    with pytest.raises(DataError):
        require_valid(root, "liver", manifest, progress=False, strict=True)


def test_kits19_layout_and_all_datasets(tmp_path):
    manifest = pd.concat([_liver(tmp_path, ["liver_0"]), _kits(tmp_path, ["case_00000", "case_00001"])])
    seg = tmp_path / "kits19" / "data" / "case_00001" / "segmentation.nii.gz"
    _save(seg, _label(values=(0, 1, 2, 4)))
    img = tmp_path / "kits19" / "data" / "case_00000" / "imaging.nii.gz"
    _truncate(img)
    report = check_dataset(tmp_path, manifest=manifest, progress=False)
    assert set(report["file"]) == {str(seg), str(img)}
    assert set(report["dataset"]) == {"kits19"}
    assert len(check_dataset(tmp_path, "liver", manifest, progress=False)) == 0


def test_load_case_returns_images_and_raises_named(liver):
    root, manifest = liver
    image, label = load_case(root, _row(manifest, "liver_0"))
    assert image.shape == SHAPE and label.shape == SHAPE
    np.testing.assert_array_equal(np.asanyarray(label.dataobj), _label())
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), _image())
    np.testing.assert_allclose(image.affine, AFFINE)

    path = root / "Task03_Liver" / "imagesTr" / "liver_1.nii.gz"
    _truncate(path)
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_case(root, _row(manifest, "liver_1"))
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match=r"\[3\]"):
        _save(root / "Task03_Liver" / "labelsTr" / "liver_2.nii.gz", _label(values=(3,)))
        load_case(root, _row(manifest, "liver_2"))


def test_unknown_dataset_rejected(liver):
    root, manifest = liver
    with pytest.raises(ValueError, match="Unknown dataset"):
        check_dataset(root, "lung", manifest, progress=False)
