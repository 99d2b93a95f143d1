"""The synthetic abdominal-CT generator (`fedseg.data.phantom`): layout, labels, anatomy, determinism.

Everything runs at coarse zooms (8x in-plane, 3x slice) on the smallest case subset, so the module
takes seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from fedseg.data import phantom
from fedseg.data.labels import allowed_values
from fedseg.data.layouts import DATASET_DIRS, LOCAL_MANIFEST, relative_paths
from fedseg.data.manifest import load_manifest, subset_manifest

FAST = dict(case_scale=0.0, min_cases=(1, 1, 1), inplane_zoom=8.0, slice_zoom=3.0, progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return phantom.generate(tmp_path_factory.mktemp("seed0"), seed=0, workers=2, **FAST)


@pytest.fixture(scope="module")
def manifest(root) -> pd.DataFrame:
    return pd.read_csv(root / LOCAL_MANIFEST, dtype=str, keep_default_na=False)


def _cases(root: Path, manifest: pd.DataFrame, dataset: str):
    for row in manifest[manifest["dataset"] == dataset].itertuples():
        folder = root / DATASET_DIRS[dataset]
        image, image_affine = _load(folder / row.image)
        label, label_affine = _load(folder / row.label)
        yield row, image, image_affine, label, label_affine


def test_same_seed_same_bytes_whatever_the_workers(root, tmp_path):
    again = phantom.generate(tmp_path / "again", seed=0, workers=1, **FAST)
    first, second = _hashes(root), _hashes(again)
    assert len(first) > 30 and first == second
    for path in root.rglob("*.nii.gz"):  # no timestamp and no file name in the gzip header
        header = path.read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0\0\0\0" and not header[3] & 0x08


def test_different_seed_different_bytes(root, manifest, tmp_path):
    other = phantom.generate(tmp_path / "seed1", seed=1, workers=2, **FAST)
    first, second = _hashes(root), _hashes(other)
    assert first.keys() == second.keys()
    images = [k for k in first if k.endswith(".nii.gz")]
    assert all(first[k] != second[k] for k in images)
    assert first[LOCAL_MANIFEST] == second[LOCAL_MANIFEST]  # same cases, other patients


def test_layout_and_manifest_match_the_real_subset(root, manifest):
    expected = subset_manifest(load_manifest(), FAST["case_scale"], FAST["min_cases"])
    pd.testing.assert_frame_equal(manifest, expected)
    assert set(manifest["dataset"]) == set(DATASET_DIRS)
    for row in manifest.itertuples():
        assert (row.image, row.label) == relative_paths(row.dataset, row.case_id)
        for rel in (row.image, row.label):
            assert (root / DATASET_DIRS[row.dataset] / rel).is_file()
    assert (root / "kits19/data/case_00000/imaging.nii.gz").is_file()
    assert (root / "BTCV/label/label0001.nii.gz").is_file()
    for dataset, labels in (("liver", {"0": "background", "1": "liver", "2": "cancer"}),
                            ("pancreas", {"0": "background", "1": "pancreas", "2": "cancer"}),
                            ("spleen", {"0": "background", "1": "spleen"})):
        doc = json.loads((root / DATASET_DIRS[dataset] / "dataset.json").read_text())
        rows = manifest[manifest["dataset"] == dataset]
        assert doc["labels"] == labels and doc["numTraining"] == len(rows) == len(doc["training"])
        assert doc["training"][0] == {"image": f"./{rows.iloc[0]['image']}", "label": f"./{rows.iloc[0]['label']}"}
    record = json.loads((root / phantom.PHANTOM_FILE).read_text())
    assert record["version"] == phantom.PHANTOM_VERSION
    assert record["parameters"]["seed"] == 0 and record["parameters"]["inplane_zoom"] == 8.0
    assert not (root / phantom._IN_PROGRESS).exists()


def test_each_dataset_labels_only_its_own_organs(root, manifest):
    for dataset in DATASET_DIRS:
        seen = set()
        for row, image, image_affine, label, label_affine in _cases(root, manifest, dataset):
            assert image.dtype == np.int16 and label.dtype == np.uint8
            assert image.shape == label.shape and np.allclose(image_affine, label_affine)
            values = set(np.unique(label).tolist())
            assert values <= allowed_values(dataset), (dataset, row.case_id, values)
            seen |= values
        if dataset == "btcv":  # spleen, both kidneys, liver, pancreas (+ gallbladder, stomach, vessels)
            assert {0, 1, 2, 3, 6, 11} <= seen, seen
        else:  # tumours in the three tumour tasks, somewhere
            assert seen == {"liver": {0, 1, 2}, "pancreas": {0, 1, 2}, "kits19": {0, 1, 2}, "spleen": {0, 1}}[dataset]


def test_tumours_lie_strictly_inside_their_organ(root, manifest):
    for dataset in ("liver", "pancreas", "kits19"):
        for row, _, _, label, _ in _cases(root, manifest, dataset):
            tumour = label == 2
            grown = ndimage.binary_dilation(tumour)  # 6-neighbours
            assert not (grown & (label == 0)).any(), (dataset, row.case_id)


def _canonical(root: Path, row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label (RAS array order) and RAS affine of a written case, through MONAI's loader."""
    from monai import transforms as mt

    folder = root / DATASET_DIRS[row.dataset]
    keys = ["image", "label"]
    load = mt.Compose([mt.LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
                       mt.Orientationd(keys=keys, axcodes="RAS", labels=None)])
    d = load({"image": str(folder / row.image), "label": str(folder / row.label)})
    return d["image"][0].numpy(), d["label"][0].numpy(), d["image"].affine.numpy()


def _centroid_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.r_[np.argwhere(mask).mean(0), 1.0])[:3]


def test_affines_differ_and_ras_reorientation_recovers_the_anatomy(root, manifest):
    codes = {}
    for dataset in DATASET_DIRS:
        row = manifest[manifest["dataset"] == dataset].iloc[0]
        img = nib.load(root / DATASET_DIRS[dataset] / row["image"])
        codes[dataset] = "".join(nib.aff2axcodes(img.affine))
        case = phantom.simulate_case(dataset, row["case_id"], seed=0, inplane_zoom=8.0, slice_zoom=3.0)
        image, label, affine = _canonical(root, row)
        # MONAI's RAS view of the file is exactly the generator's RAS anatomy, at the same place in mm
        np.testing.assert_array_equal(image, case["image"])
        np.testing.assert_array_equal(label, case["label"])
        np.testing.assert_allclose(affine, case["affine"], atol=1e-4)
        organs = case["organs"]
        body = (case["tissue"] != phantom.T["air"]) & (case["tissue"] != phantom.T["table"])
        body_x = _centroid_world(body, affine)[0]
        liver_x = _centroid_world(organs == phantom.ORGANS["liver"], affine)[0]
        spleen_x = _centroid_world(organs == phantom.ORGANS["spleen"], affine)[0]
        # RAS+: x grows towards the patient's right, where the liver is; the spleen is on the left
        assert liver_x > body_x + 20 and spleen_x < body_x - 40, (dataset, liver_x, body_x, spleen_x)
    assert codes == {"liver": "LPS", "pancreas": "RAS", "kits19": "IPL", "spleen": "LPS", "btcv": "LAS"}
    kits = nib.load(next((root / "kits19/data").rglob("imaging.nii.gz")))
    zooms = kits.header.get_zooms()
    assert zooms[0] != zooms[1] == zooms[2]  # slice axis first, like the real KiTS19


def test_liver_on_patient_right_in_lps_and_las_files_and_after_spacingd(root, manifest):
    from monai import transforms as mt

    for dataset, liver_value in (("liver", 1), ("btcv", 6)):  # stored LPS and LAS
        row = manifest[manifest["dataset"] == dataset].iloc[0]
        image, label, affine = _canonical(root, row)
        assert np.argwhere(np.isin(label, (liver_value, 2)))[:, 0].mean() > np.argwhere(image > -500)[:, 0].mean()
        folder = root / DATASET_DIRS[dataset]
        resample = mt.Compose([mt.LoadImaged(keys="label", ensure_channel_first=True, image_only=True),
                               mt.Orientationd(keys="label", axcodes="RAS", labels=None),
                               mt.Spacingd(keys="label", pixdim=(5.0, 5.0, 5.0), mode="nearest")])
        out = resample({"label": str(folder / row["label"])})["label"]
        before = _centroid_world(np.isin(label, (liver_value, 2)), affine)
        after = _centroid_world(np.isin(out[0].numpy(), (liver_value, 2)), out.affine.numpy())
        assert np.abs(before - after).max() < 5.0, (before, after)


def test_other_organs_are_in_the_images_but_unlabelled(root, manifest):
    row = manifest[manifest["dataset"] == "liver"].iloc[0]
    case = phantom.simulate_case("liver", row["case_id"], seed=0, inplane_zoom=8.0, slice_zoom=3.0)
    image, label, _ = _canonical(root, row)
    np.testing.assert_array_equal(label, case["label"])  # the anatomy below is this file's
    organs = case["organs"]
    kidneys = np.isin(organs, (phantom.ORGANS["kidney_right"], phantom.ORGANS["kidney_left"]))
    spleen = organs == phantom.ORGANS["spleen"]
    fat = ndimage.binary_erosion(case["tissue"] == phantom.T["fat"])
    assert kidneys.sum() > 20 and spleen.sum() > 20
    assert not label[kidneys | spleen].any()  # unlabelled (0) in the liver dataset ...
    assert np.median(image[kidneys]) > 80 and np.median(image[spleen]) > 60  # ... but there, enhancing
    background = image[(label == 0) & ~kidneys & ~spleen & (organs == 0) & (image > -300)]
    assert np.median(image[kidneys]) - np.percentile(background, 25) > 100
    assert np.median(image[fat]) < -50


def test_hounsfield_ranges_and_mri_like_contrast(root, manifest, tmp_path):
    medians = {}
    for dataset in DATASET_DIRS:
        for row, image, _, label, _ in _cases(root, manifest, dataset):
            assert -1024 <= image.min() <= -900  # air
            assert image.max() > 300  # bone
            if dataset in ("liver", "pancreas", "spleen"):
                medians.setdefault(dataset, []).append(np.median(image[label == 1]))
            if dataset == "kits19":
                medians.setdefault(dataset, []).append(np.median(image[label == 1]))
    for dataset in ("liver", "pancreas", "spleen"):
        assert all(0 < m < 150 for m in medians[dataset]), (dataset, medians[dataset])
    assert all(50 < m < 300 for m in medians["kits19"]), medians["kits19"]
    mri_root = phantom.generate(tmp_path / "mri", seed=0, mri_like=("spleen",), datasets=("spleen",),
                                workers=1, **FAST)
    mri_rows = pd.read_csv(mri_root / LOCAL_MANIFEST, dtype=str)
    assert set(mri_rows["dataset"]) == {"spleen"}
    for row in mri_rows.itertuples():
        ct, _ = _load(root / DATASET_DIRS["spleen"] / row.image)
        mr, _ = _load(mri_root / DATASET_DIRS["spleen"] / row.image)
        ct_label, _ = _load(root / DATASET_DIRS["spleen"] / row.label)
        mr_label, _ = _load(mri_root / DATASET_DIRS["spleen"] / row.label)
        np.testing.assert_array_equal(ct_label, mr_label)  # labels unchanged
        assert mr.min() >= 0 and mr.dtype == np.int16
        spleen = mr_label == 1
        fat = (ct > -130) & (ct < -70)
        bone = ct > 400
        # CT: fat < spleen < bone; MRI-like: fat brighter than spleen, bone darker than spleen
        assert np.median(ct[fat]) < np.median(ct[spleen]) < np.median(ct[bone])
        assert np.median(mr[fat]) > np.median(mr[spleen]) > np.median(mr[bone])
    doc = json.loads((mri_root / DATASET_DIRS["spleen"] / "dataset.json").read_text())
    assert doc["modality"]["0"].startswith("MRI")


def test_second_call_reuses_and_new_parameters_regenerate(tmp_path, capsys):
    args = dict(FAST, datasets=("spleen",), workers=1)
    root = phantom.generate(tmp_path / "d", seed=0, **args)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    start = time.perf_counter()
    phantom.generate(root, seed=0, **{**args, "progress": True})
    assert time.perf_counter() - start < 1.0
    assert "reusing" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    image = root / DATASET_DIRS["spleen"] / "imagesTr/spleen_2.nii.gz"
    before = image.read_bytes()
    phantom.generate(root, seed=1, **args)  # other parameters: regenerated
    assert image.read_bytes() != before
    assert json.loads((root / phantom.PHANTOM_FILE).read_text())["parameters"]["seed"] == 1
    (root / phantom.PHANTOM_FILE).unlink()  # as if interrupted before the end: not taken as data
    (root / phantom._IN_PROGRESS).write_text("{}")
    phantom.generate(root, seed=1, **args)
    assert (root / phantom.PHANTOM_FILE).exists() and not (root / phantom._IN_PROGRESS).exists()


def test_refuses_to_write_over_real_data(tmp_path):
    real = tmp_path / "real" / DATASET_DIRS["spleen"] / "imagesTr"
    real.mkdir(parents=True)
    (real / "spleen_2.nii.gz").write_bytes(b"real")
    with pytest.raises(FileExistsError, match="did not write"):
        phantom.generate(tmp_path / "real", seed=0, datasets=("spleen",), **FAST)
    assert (real / "spleen_2.nii.gz").read_bytes() == b"real"


def test_laptop_volumes_stay_small():
    shapes = []
    for index, dataset in enumerate(phantom.SCANNERS):
        for case in range(40):
            rng = np.random.default_rng([0, index, case])
            grid = phantom.sample_grid(rng, dataset, phantom.sample_anatomy(rng), 4.0, 1.5)
            shapes.append(grid.shape)
    shapes = np.array(shapes)
    assert np.median(shapes[:, 0]) <= 120 and shapes[:, :2].max() <= 160
    assert np.median(shapes[:, 2]) <= 80 and np.median(shapes.prod(1)) <= 100 * 100 * 120


def test_gzip_helper_is_reproducible():
    data = phantom.nifti_bytes(np.zeros((2, 3, 4), np.int16), np.eye(4))
    assert data == phantom.nifti_bytes(np.zeros((2, 3, 4), np.int16), np.eye(4))
    assert gzip.decompress(data)[344:348] == b"n+1\0"


def test_anatomy_follows_published_adult_statistics():
    table = phantom.anatomy_table(seed=0, patients=12, spacing=4.0, progress=False)
    patients = table.attrs["patients"]
    medians = patients.median()
    assert 1100 < medians["liver volume (mL)"] < 2000
    assert 100 < medians["spleen volume (mL)"] < 350
    assert 90 < medians["kidney volume, each (mL)"] < 210
    assert 40 < medians["pancreas volume (mL)"] < 110
    assert 2.0 < medians["liver dome (vertebra)"] < 4.5  # T8-T11
    assert -1.8 < medians["right kidney centre (vertebra)"] < 0.5  # T12-L3
    assert medians["left kidney higher than right (mm)"] > 0
    # spread between people is centimetres, not millimetres
    assert patients["liver dome (vertebra)"].std() * 30 > 10
    assert patients["right kidney centre (vertebra)"].std() * 30 > 10
    assert patients["subcutaneous fat, flank (mm)"].max() - patients["subcutaneous fat, flank (mm)"].min() > 15
    assert patients["liver touches right kidney (%)"].mean() > 50
    assert patients["spleen touches left kidney (%)"].mean() > 50
    assert list(table.index) == list(phantom.PUBLISHED_ANATOMY) and table["phantom"].str.len().min() > 0
    assert phantom.vertebra(0.0) == "L1" and phantom.vertebra(1.4) == "T12" and phantom.vertebra(-0.6) == "L2"


def test_structure_inside_and_between_organs():
    case = phantom.simulate_case("btcv", "img0001", seed=0, inplane_zoom=2.0, slice_zoom=1.0)
    tissue, organs = case["tissue"], case["organs"]
    liver, kidneys = organs == phantom.ORGANS["liver"], np.isin(organs, (phantom.ORGANS["kidney_right"],
                                                                          phantom.ORGANS["kidney_left"]))
    assert (tissue[liver] == phantom.T["vein"]).sum() > 50  # portal and hepatic veins, labelled liver
    assert (tissue[kidneys] == phantom.T["urine"]).any()  # renal pelvis
    assert (organs == phantom.ORGANS["portal_vein"]).sum() > 10  # BTCV's portal and splenic vein
    assert 10 in np.unique(case["label"])
    for name in ("mottled", "strand", "bowel", "gas"):  # colon contents, fat septa, bowel loops
        assert (tissue == phantom.T[name]).sum() > 50, name
    image = case["image"].astype(float)
    assert image[liver & (tissue == phantom.T["vein"])].mean() > image[liver & (tissue == phantom.T["liver"])].mean()


def test_domains_change_the_image_not_the_anatomy():
    cases = {d: phantom.simulate_case("spleen", "spleen_2", seed=0, inplane_zoom=8.0, slice_zoom=3.0, domain=d)
             for d in phantom.DOMAINS}
    for d in ("randomised", "other_scanner"):
        np.testing.assert_array_equal(cases[d]["label"], cases["ct"]["label"])
        np.testing.assert_array_equal(cases[d]["organs"], cases["ct"]["organs"])
        assert not np.array_equal(cases[d]["image"], cases["ct"]["image"])
    tissue = cases["ct"]["tissue"]
    fat = ndimage.binary_erosion(tissue == phantom.T["fat_sc"], iterations=1)
    noise = {d: cases[d]["image"][fat].astype(float).std() for d in phantom.DOMAINS}
    assert noise["other_scanner"] > noise["ct"]  # more noise on the other scanner
    # randomised: tissue values no longer follow CT's order (subcutaneous fat above muscle in some cases)
    flips = 0
    for k in range(2, 8):
        c = phantom.simulate_case("spleen", f"spleen_{k}", seed=0, inplane_zoom=8.0, slice_zoom=3.0,
                                  domain="randomised")
        img, t = c["image"].astype(float), c["tissue"]
        flips += np.median(img[t == phantom.T["fat_sc"]]) > np.median(img[t == phantom.T["muscle"]])
    assert 0 < flips < 6
    with pytest.raises(ValueError, match="domain"):
        phantom.simulate_case("spleen", "spleen_2", domain="xray")


def test_randomised_generation_keeps_the_test_set_ct(root, tmp_path):
    args = dict(FAST, datasets=("spleen", "btcv"), workers=1)
    randomised = phantom.generate(tmp_path / "r", seed=0, domain="randomised", **args)
    record = json.loads((randomised / phantom.PHANTOM_FILE).read_text())
    assert record["parameters"]["domain"] == "randomised"
    rows = pd.read_csv(randomised / LOCAL_MANIFEST, dtype=str)
    for row in rows.itertuples():
        folder = DATASET_DIRS[row.dataset]
        mine, _ = _load(randomised / folder / row.image)
        ct, _ = _load(root / folder / row.image)
        if row.dataset == "btcv":  # the external test set stays realistic CT
            np.testing.assert_array_equal(mine, ct)
        else:
            assert not np.array_equal(mine, ct)
    with pytest.raises(ValueError, match="data.phantom.domain"):
        phantom.generate(tmp_path / "x", seed=0, domain="xray", **args)


def test_generation_names_the_generator_of_a_data_root(root, tmp_path):
    record = phantom.generation(root)
    assert record["version"] == phantom.PHANTOM_VERSION and record["parameters"]["domain"] == "ct"
    assert phantom.generation(tmp_path) is None  # not written by the phantom (real data)


def _medians(case, tissues):
    image, tissue = case["image"].astype(float), case["tissue"]
    return {name: float(np.median(image[tissue == phantom.T[name]])) for name in tissues}


def test_each_contrast_phase_gives_the_published_enhancement_on_the_same_anatomy():
    """Issue 30: every CT was contrast-enhanced (portal venous, KiTS19 arterial). Each phase now puts organs and
    vessels at their published values (docs/phantom.md), on the same anatomy and labels."""
    tissues = ("liver", "spleen", "pancreas", "k_cortex", "k_medulla", "artery", "vein", "urine")
    cases = {phase: phantom.simulate_case("btcv", "img0003", seed=0, phases=phase) for phase in phantom.PHASES}
    m = {phase: _medians(case, tissues) for phase, case in cases.items()}
    for phase, case in cases.items():
        assert np.array_equal(case["label"], cases["portal"]["label"]), phase
        assert case["acquisition"]["phase"] == phase
    assert cases["unenhanced"]["acquisition"]["seconds"] is None
    assert 30 <= cases["arterial"]["acquisition"]["seconds"] <= 45
    assert 180 <= cases["delayed"]["acquisition"]["seconds"] <= 300
    un, art, port, late = m["unenhanced"], m["arterial"], m["portal"], m["delayed"]
    assert 40 < un["liver"] < 75 and 15 < un["k_cortex"] < 50 and 25 < un["artery"] < 60  # no contrast
    # (medians over the voxels of each tissue: the thin cortex blends with the fat around it at 4x zoom)
    assert abs(un["k_cortex"] - un["k_medulla"]) < 15 and un["liver"] > un["spleen"]
    assert art["artery"] > 220 and art["k_cortex"] - art["k_medulla"] > 40  # corticomedullary phase
    assert art["pancreas"] > port["pancreas"] and art["spleen"] > art["liver"]
    assert port["liver"] > 90 and port["vein"] > art["vein"] + 40  # portal venous: liver and veins peak
    assert late["k_medulla"] > art["k_medulla"] + 30 and late["urine"] > 150  # nephrogram, excretion into the pelvis
    assert un["liver"] < late["liver"] < port["liver"] and late["artery"] < port["artery"]


def test_each_dataset_keeps_its_published_phase_and_all_gives_every_site_every_phase():
    def phases(dataset, choice, count=24):
        return [phantom.case_phase(dataset, choice, np.random.default_rng([0, i])) for i in range(count)]

    assert set(phases("kits19", "published")) == {"arterial"}  # KiTS19: late arterial
    for dataset in ("liver", "pancreas", "spleen", "btcv"):
        assert set(phases(dataset, "published")) == {"portal"}, dataset
    assert set(phases("spleen", "all")) == set(phantom.PHASES)
    assert set(phases("btcv", "all")) == {"portal"}  # the external test set keeps its own
    assert set(phases("liver", "unenhanced")) == {"unenhanced"}
    with pytest.raises(ValueError, match="data.phantom.phases 'venous'"):
        phantom.case_phase("liver", "venous", np.random.default_rng(0))


def test_the_enhancement_table_sets_the_images_values_beside_the_published_ones():
    table = phantom.enhancement_table(patients=1, progress=False)
    assert list(table.columns) == list(phantom.PHASES) and list(table.index) == list(phantom.ENHANCEMENT_TISSUES)
    measured = {phase: float(table.loc["kidney cortex", phase].split()[0]) for phase in phantom.PHASES}
    published = {phase: float(table.loc["kidney cortex", phase].split("/ ")[1]) for phase in phantom.PHASES}
    assert published == {"unenhanced": 32.0, "arterial": 202.0, "portal": 162.0, "delayed": 132.0}
    assert measured["unenhanced"] < 60 < measured["delayed"] < measured["arterial"]
