"""Tests for the study data manifest (data_manifest.csv) and fedseg.data.manifest."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from fedseg.data.manifest import (
    MANIFEST_PATH,
    SPLITS,
    TABLE1,
    build_manifest,
    load_manifest,
    seeded_split,
    split_counts,
    subset_manifest,
)

# Written out independently of fedseg.data.manifest so a wrong path rule there fails here.
LAYOUT = {
    "liver": (r"liver_(\d{1,3})", "imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz"),
    "pancreas": (r"pancreas_(\d{3})", "imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz"),
    "spleen": (r"spleen_(\d{1,2})", "imagesTr/{id}.nii.gz", "labelsTr/{id}.nii.gz"),
    "kits19": (r"case_(\d{5})", "{id}/imaging.nii.gz", "{id}/segmentation.nii.gz"),
    "btcv": (r"img(\d{4})", "img/{id}.nii.gz", "label/label{n}.nii.gz"),
}


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return load_manifest()


def test_manifest_has_693_cases(manifest: pd.DataFrame) -> None:
    assert MANIFEST_PATH.name == "data_manifest.csv" and MANIFEST_PATH.is_file()
    assert len(manifest) == 693
    assert manifest["dataset"].value_counts().to_dict() == {
        "pancreas": 281, "kits19": 210, "liver": 131, "spleen": 41, "btcv": 30
    }


def test_split_counts_equal_table1(manifest: pd.DataFrame) -> None:
    table = split_counts(manifest)
    assert list(table.index) == list(TABLE1)
    assert list(table.columns) == [*SPLITS, "total"]
    for dataset, counts in TABLE1.items():
        assert tuple(int(table.loc[dataset, s]) for s in SPLITS) == counts, dataset
        assert int(table.loc[dataset, "total"]) == sum(counts)


def test_case_ids_unique(manifest: pd.DataFrame) -> None:
    assert not manifest.duplicated(["dataset", "case_id"]).any()
    assert manifest["case_id"].is_unique
    assert manifest["image"].is_unique and manifest["label"].is_unique


def test_known_case_ids(manifest: pd.DataFrame) -> None:
    ids = manifest.groupby("dataset")["case_id"].apply(set)
    assert ids["liver"] == {f"liver_{i}" for i in range(131)}
    assert ids["kits19"] == {f"case_{i:05d}" for i in range(210)}
    assert ids["btcv"] == {f"img{i:04d}" for i in [*range(1, 11), *range(21, 41)]}
    # MSD Task09 dataset.json training list.
    assert ids["spleen"] == {f"spleen_{i}" for i in [
        2, 3, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 27, 28,
        29, 31, 32, 33, 38, 40, 41, 44, 45, 46, 47, 49, 52, 53, 56, 59, 60, 61, 62, 63]}
    # pancreas_290 is an MSD Task07 training case, pancreas_044 an MSD test case (no label).
    assert "pancreas_290" in ids["pancreas"] and "pancreas_044" not in ids["pancreas"]


def test_paths_follow_dataset_layout(manifest: pd.DataFrame) -> None:
    for row in manifest.itertuples():
        pattern, image, label = LAYOUT[row.dataset]
        m = re.fullmatch(pattern, row.case_id)
        assert m, row.case_id
        assert row.image == image.format(id=row.case_id, n=m.group(1)), row
        assert row.label == label.format(id=row.case_id, n=m.group(1)), row


def test_split_sources(manifest: pd.DataFrame) -> None:
    sources = manifest.groupby("dataset")["split_source"].unique().apply(list).to_dict()
    assert sources == {"liver": ["condistfl"], "pancreas": ["condistfl"], "kits19": ["condistfl"],
                       "spleen": ["condistfl"], "btcv": ["paper"]}
    assert set(manifest.loc[manifest["dataset"] == "btcv", "split"]) == {"test"}


def test_seeded_split_exact_counts_and_reproducible() -> None:
    ids = [f"case_{i}" for i in range(41)]
    a = seeded_split(ids, (25, 8, 8), seed=0)
    assert sorted(a) == sorted(ids)
    assert [list(a.values()).count(s) for s in SPLITS] == [25, 8, 8]
    assert seeded_split(reversed(ids), (25, 8, 8), seed=0) == a  # input order does not matter
    assert seeded_split(ids, (25, 8, 8), seed=1) != a
    with pytest.raises(ValueError):
        seeded_split(ids, (25, 8, 9), seed=0)


def test_load_manifest_rejects_bad_split(tmp_path, manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[3, "split"] = "training"
    path = tmp_path / "bad_manifest.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"bad_manifest\.csv.*split.*training"):
        load_manifest(path)


@pytest.mark.parametrize("edit", ["columns", "dataset", "duplicate", "empty"])
def test_load_manifest_rejects_other_errors(tmp_path, manifest: pd.DataFrame, edit: str) -> None:
    bad = manifest.copy()
    if edit == "columns":
        bad = bad.drop(columns="split_source")
    elif edit == "dataset":
        bad.loc[0, "dataset"] = "lung"
    elif edit == "empty":
        bad.loc[7, "label"] = ""
    else:
        bad = pd.concat([bad, bad.iloc[[5]]])
    path = tmp_path / "m.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"m\.csv"):
        load_manifest(path)


def test_subset_manifest_minimums_and_subset(manifest: pd.DataFrame) -> None:
    small = subset_manifest(manifest, scale=0.01)
    counts = split_counts(small)
    for dataset in ("liver", "pancreas", "kits19", "spleen"):
        assert tuple(int(counts.loc[dataset, s]) for s in SPLITS) == (2, 1, 1), dataset
    assert tuple(int(counts.loc["btcv", s]) for s in SPLITS) == (0, 0, 2)
    merged = small.merge(manifest, how="left", indicator=True)
    assert (merged["_merge"] == "both").all()  # same ids, paths and splits as the real manifest
    # first cases in manifest order
    liver_train = manifest[(manifest.dataset == "liver") & (manifest.split == "train")].case_id
    assert list(small[(small.dataset == "liver") & (small.split == "train")].case_id) == list(liver_train[:2])


def test_subset_manifest_scales_and_caps(manifest: pd.DataFrame) -> None:
    half = split_counts(subset_manifest(manifest, scale=0.5))
    assert tuple(int(half.loc["pancreas", s]) for s in SPLITS) == (84, 28, 28)  # round(84.5) == 84
    assert int(half.loc["btcv", "test"]) == 15
    assert int(split_counts(subset_manifest(manifest, scale=0.3)).loc["liver", "train"]) == 24  # 23.7 rounds up
    assert subset_manifest(manifest, scale=3.0).equals(manifest)
    big_min = split_counts(subset_manifest(manifest, scale=0.0, minimum=(50, 10, 10)))
    assert tuple(int(big_min.loc["spleen", s]) for s in SPLITS) == (25, 8, 8)


def test_subset_manifest_external_minimum(manifest: pd.DataFrame) -> None:
    """A fourth minimum is the external test set's (BTCV); without it BTCV keeps max(2, test minimum)."""
    laptop = split_counts(subset_manifest(manifest, scale=0.1, minimum=(3, 2, 4, 8)))
    assert int(laptop.loc["btcv", "test"]) == 8 and int(laptop.loc["btcv", "train"]) == 0
    assert tuple(int(laptop.loc["spleen", s]) for s in SPLITS) == (3, 2, 4)
    assert int(laptop.loc["pancreas", "test"]) == 6  # round(56 * 0.1) is above the minimum
    assert int(split_counts(subset_manifest(manifest, scale=0.1, minimum=(3, 1, 1))).loc["btcv", "test"]) == 3
    with pytest.raises(ValueError, match="external"):
        subset_manifest(manifest, scale=0.1, minimum=(3, 1))


def _write_datalists(root, manifest: pd.DataFrame) -> None:
    tag = {"liver": ("Liver", "LVR"), "pancreas": ("Pancreas", "PAN"), "kits19": ("KiTS19", "KITS"),
           "spleen": ("Spleen", "SPL")}
    keys = {"train": "training", "val": "validation", "test": "testing"}
    for dataset, (folder, code) in tag.items():
        lists: dict[str, list] = {k: [] for k in keys.values()}
        for row in manifest[manifest.dataset == dataset].itertuples():
            n = row.case_id.split("_")[-1][2:] if dataset == "kits19" else row.case_id.split("_")[-1]
            lists[keys[row.split]].append({"image": f"IM_{code}_{n}.nii.gz", "label": f"LB_{code}_{n}.nii.gz"})
        (root / folder).mkdir()
        (root / folder / "datalist.json").write_text(json.dumps(lists))


def test_build_manifest_round_trips_condistfl_datalists(tmp_path, manifest: pd.DataFrame) -> None:
    _write_datalists(tmp_path, manifest)
    assert build_manifest(tmp_path).equals(manifest)


def test_build_manifest_falls_back_to_seeded_split(tmp_path, manifest: pd.DataFrame) -> None:
    _write_datalists(tmp_path, manifest)
    (tmp_path / "Spleen" / "datalist.json").unlink()
    lists = json.loads((tmp_path / "Liver" / "datalist.json").read_text())
    lists["training"].append(lists["testing"].pop())  # 80/26/25: off Table 1
    (tmp_path / "Liver" / "datalist.json").write_text(json.dumps(lists))
    built = build_manifest(tmp_path, base=manifest, seed=7)
    source = built.groupby("dataset")["split_source"].first()
    assert source["liver"] == source["spleen"] == "seeded" and source["pancreas"] == "condistfl"
    for dataset in ("liver", "spleen"):
        part = built[built.dataset == dataset]
        assert set(part.case_id) == set(manifest[manifest.dataset == dataset].case_id)
        assert dict(zip(part.case_id, part.split)) == seeded_split(part.case_id, TABLE1[dataset], 7)
    assert tuple(split_counts(built).loc["liver", list(SPLITS)]) == TABLE1["liver"]
