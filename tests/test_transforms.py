"""Preprocessing on small hand-made volumes: orientation, resampling, label channels, owned masks."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from fedseg.config import merge_profile
from fedseg.data.labels import CHANNEL_INDEX, CHANNELS, owned_mask, pack_channels, to_multihot, unpack_channels
from fedseg.data.transforms import IMAGE, LABEL, augment, case_records, preprocess


def config(spacing=(2.0, 2.0, 2.0), sampling="random"):
    """The preprocessing of tiny test volumes, as differences from the base profile (volumes read from the cache)."""
    return merge_profile({"preprocess": {"spacing": list(spacing), "hu_window": [-500, 500], "patch_size": [8, 8, 8],
                                         "patch_sampling": sampling, "patches_per_volume": 2, "in_memory": False,
                                         "intensity_shift": {"prob": 0.8, "offset": 0.1}}}, "test_transforms.config")


def write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def blob_volume(shape=(20, 16, 12)):
    """An asymmetric volume: a bright block in one corner marks where 'right, anterior, superior' is."""
    image = np.full(shape, -1000, np.int16)
    label = np.zeros(shape, np.uint8)
    image[2:6, 3:7, 4:8] = 200  # voxel indices low in every axis
    label[2:6, 3:7, 4:8] = 1
    label[3:5, 4:6, 5:7] = 2
    return image, label


def run(cfg, image_path, label_path, dataset="liver"):
    return preprocess(cfg)({IMAGE: image_path, LABEL: label_path, "dataset": dataset})


def test_lps_volume_comes_out_in_ras_with_the_same_physical_content(tmp_path):
    image, label = blob_volume()
    ras_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    # The same physical scene stored LPS: x and y axes flipped, the array flipped to match.
    lps_affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps_affine[:3, 3] = [2.0 * (image.shape[0] - 1), 2.0 * (image.shape[1] - 1), 0.0]
    flip = (slice(None, None, -1), slice(None, None, -1), slice(None))
    assert np.allclose(lps_affine @ [image.shape[0] - 1, image.shape[1] - 1, 0, 1], ras_affine @ [0, 0, 0, 1])
    cfg = config()
    a = run(cfg, write(tmp_path / "ras.nii.gz", image, ras_affine), write(tmp_path / "ras_l.nii.gz", label, ras_affine))
    b = run(cfg, write(tmp_path / "lps.nii.gz", image[flip], lps_affine),
            write(tmp_path / "lps_l.nii.gz", label[flip], lps_affine))
    assert torch.equal(a[IMAGE], b[IMAGE])
    assert torch.equal(a[LABEL], b[LABEL])
    # and the block is where it physically was: low RAS indices, i.e. not where the flipped array had it
    liver = a[LABEL][CHANNEL_INDEX["liver"]]
    coords = np.argwhere(liver.numpy())
    assert coords[:, 0].max() < image.shape[0] // 2 and coords[:, 1].max() < image.shape[1] // 2


@pytest.mark.parametrize("source,target", [((1.0, 1.0, 3.0), 2.0), ((0.8, 0.8, 5.0), 4.0)])
def test_resampling_keeps_physical_extent(tmp_path, source, target):
    shape = (40, 30, 8)
    image = np.zeros(shape, np.int16)
    affine = np.diag([*source, 1.0])
    path = write(tmp_path / "img.nii.gz", image, affine)
    lab = write(tmp_path / "lab.nii.gz", np.zeros(shape, np.uint8), affine)
    out = run(config(spacing=(target,) * 3), path, lab)
    extent_in = np.array(shape) * np.array(source)
    extent_out = np.array(out[IMAGE].shape[1:]) * target
    assert np.all(np.abs(extent_out - extent_in) <= target), (extent_in, extent_out)


def test_an_mri_case_is_scaled_by_its_own_percentiles_and_a_ct_case_by_the_hu_window(tmp_path):
    image = (np.arange(400) * 2.5).astype(np.int16).reshape(100, 2, 2)  # MRI-like units 0-997, all distinct
    affine = np.eye(4)
    paths = (write(tmp_path / "i.nii.gz", image, affine),
             write(tmp_path / "l.nii.gz", np.zeros(image.shape, np.uint8), affine))
    cfg = config(spacing=(1, 1, 1))
    mri = preprocess(cfg)({IMAGE: paths[0], LABEL: paths[1], "dataset": "liver", "modality": "MRI"})[IMAGE][0]
    low, high = np.percentile(image, [0.5, 99.5])
    assert 0 < low < 10 and 985 < high < 997
    expected = np.clip((image - low) / (high - low), 0, 1)
    assert torch.allclose(mri, torch.as_tensor(expected, dtype=torch.float32), atol=1e-5)
    ct = run(cfg, *paths)[IMAGE][0]  # no modality: CT
    assert torch.allclose(ct, torch.as_tensor(np.clip((image + 500) / 1000, 0, 1), dtype=torch.float32))
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the transform's error
        preprocess(cfg)({IMAGE: paths[0], LABEL: paths[1], "dataset": "liver", "modality": "PET"})
    assert "modality 'PET'" in str(error.value.__cause__)


def test_records_of_a_synthetic_root_carry_the_contrast_it_was_generated_in(tmp_path):
    (tmp_path / "phantom.json").write_text(json.dumps({"parameters": {"mri_like": ["spleen"]}}))
    cases = pd.DataFrame({"dataset": ["spleen", "liver"], "case_id": ["spleen_2", "liver_0"], "split": ["train"] * 2,
                          "image": ["imagesTr/spleen_2.nii.gz", "imagesTr/liver_0.nii.gz"],
                          "label": ["labelsTr/spleen_2.nii.gz", "labelsTr/liver_0.nii.gz"]})
    assert [r["modality"] for r in case_records(tmp_path, cases)] == ["MRI", "CT"]
    (tmp_path / "phantom.json").unlink()  # a real data root: CT
    assert {r["modality"] for r in case_records(tmp_path, cases)} == {"CT"}


def test_hu_window_maps_to_unit_range(tmp_path):
    image = np.array([-1000, -500, 0, 500, 1500], np.int16).reshape(5, 1, 1).repeat(2, 1).repeat(2, 2)
    affine = np.eye(4)
    out = run(config(spacing=(1, 1, 1)), write(tmp_path / "i.nii.gz", image, affine),
              write(tmp_path / "l.nii.gz", np.zeros(image.shape, np.uint8), affine))
    assert torch.allclose(out[IMAGE][0, :, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("dataset,value,channels", [
    ("liver", 1, {"liver"}), ("liver", 2, {"liver", "liver_tumor"}),
    ("pancreas", 2, {"pancreas", "pancreas_tumor"}), ("kits19", 1, {"kidney"}),
    ("kits19", 2, {"kidney", "kidney_tumor"}), ("spleen", 1, {"spleen"}),
    ("btcv", 3, {"kidney"}), ("btcv", 6, {"liver"}), ("btcv", 11, {"pancreas"}), ("btcv", 7, set()),
])
def test_label_value_lands_in_the_right_channels(dataset, value, channels):
    label = np.zeros((3, 3, 3), np.uint8)
    label[1, 1, 1] = value
    target = to_multihot(label, dataset)
    on = {CHANNELS[c] for c in range(1, len(CHANNELS)) if target[c, 1, 1, 1]}
    assert on == channels
    assert target[0, 1, 1, 1] == 0 and target[0, 0, 0, 0] == 1
    assert target[1:, 0, 0, 0].sum() == 0


def test_label_value_outside_the_map_is_an_error():
    with pytest.raises(ValueError, match="outside the spleen label map"):
        to_multihot(np.full((2, 2, 2), 2, np.uint8), "spleen")


@pytest.mark.parametrize("dataset,owned", [
    ("liver", {"liver", "liver_tumor"}), ("pancreas", {"pancreas", "pancreas_tumor"}),
    ("kits19", {"kidney", "kidney_tumor"}), ("spleen", {"spleen"}),
    ("btcv", {"liver", "spleen", "pancreas", "kidney"}),
])
def test_owned_channel_mask(dataset, owned):
    mask = owned_mask(dataset)
    assert mask.shape == (8,) and not mask[0]
    assert {CHANNELS[i] for i in np.flatnonzero(mask)} == owned


@pytest.mark.parametrize("sampling,spatial_aug", [("random", None), ("posneg", None), ("classes", None),
                                                  ("posneg", {"prob": 1.0, "rotate": 0.3, "scale": 0.2})])
def test_training_patches_have_the_patch_size_and_eight_channels(tmp_path, sampling, spatial_aug):
    image, label = blob_volume()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cfg = config(sampling=sampling)
    cfg["preprocess"]["spatial_aug"] = spatial_aug
    case = run(cfg, write(tmp_path / "i.nii.gz", image, affine), write(tmp_path / "l.nii.gz", label, affine))
    patches = augment(cfg)(case)
    assert len(patches) == 2
    for patch in patches:
        assert tuple(patch[IMAGE].shape) == (1, 8, 8, 8)
        assert tuple(patch[LABEL].shape) == (8, 8, 8, 8)
        assert "foreground" not in patch
        assert patch[LABEL].dtype == torch.uint8 and set(np.unique(np.asarray(patch[LABEL]))) <= {0, 1}


def test_training_reads_the_cache_and_never_decodes_nifti_again(tmp_path, monkeypatch):
    from fedseg.data.transforms import build_cache, training_dataset

    image, label = blob_volume()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    records = [{IMAGE: write(tmp_path / "i.nii.gz", image, affine), LABEL: write(tmp_path / "l.nii.gz", label, affine),
                "dataset": "liver", "case_id": "liver_0", "owned": owned_mask("liver").astype(np.uint8)}]
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    cfg = {**config(sampling="posneg"), "data_root": str(tmp_path / "root")}
    built = build_cache(cfg, records, progress=False)
    assert built["cases"] == 1 and len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    (tmp_path / "i.nii.gz").unlink()  # a second decode of the NIfTI would now fail
    (tmp_path / "l.nii.gz").unlink()
    patches = training_dataset(cfg, records)[0]
    assert len(patches) == 2 and tuple(patches[0][LABEL].shape) == (8, 8, 8, 8)
    assert torch.equal(patches[0]["owned"] if isinstance(patches[0]["owned"], torch.Tensor)
                       else torch.as_tensor(patches[0]["owned"]), torch.as_tensor(owned_mask("liver").astype(np.uint8)))


def test_class_balanced_patches_centre_on_the_tumour_as_often_as_on_the_organ(tmp_path):
    """`classes` sampling: centres drawn equally from background and each channel the case contains, so
    the two-voxel-wide tumour channel is in far more patches than under random sampling."""
    image, label = blob_volume((40, 40, 40))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    hits = {}
    for sampling in ("random", "classes"):
        cfg = config(sampling=sampling)
        cfg["preprocess"]["patches_per_volume"] = 60
        case = run(cfg, write(tmp_path / "i.nii.gz", image, affine), write(tmp_path / "l.nii.gz", label, affine))
        transform = augment(cfg)
        transform.set_random_state(seed=0)
        patches = transform(case)
        hits[sampling] = np.mean([bool(p[LABEL][CHANNEL_INDEX["liver_tumor"]].any()) for p in patches])
    assert hits["classes"] >= 0.3 and hits["classes"] > hits["random"] + 0.15, hits


def test_in_memory_training_volumes_give_the_batches_of_the_cache(tmp_path, monkeypatch):
    """`preprocess.in_memory` keeps each volume and its foreground/background positions: the posneg
    sampler then draws exactly the patches it draws when it reads the cache and searches every time."""
    from fedseg.train.training import PatchBatches

    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    image, label = blob_volume((24, 20, 16))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    records = [{IMAGE: write(tmp_path / f"i{k}.nii.gz", np.roll(image, 3 * k, axis=0), affine),
                LABEL: write(tmp_path / f"l{k}.nii.gz", np.roll(label, 3 * k, axis=0), affine),
                "dataset": "liver", "case_id": f"liver_{k}", "owned": owned_mask("liver").astype(np.uint8)}
               for k in range(3)]
    cfg = {**config(sampling="posneg"), "data_root": str(tmp_path / "root")}
    cached = PatchBatches(cfg, records, seed=1, cases_per_step=2)
    kept = PatchBatches({**cfg, "preprocess": {**cfg["preprocess"], "in_memory": True}}, records, seed=1,
                        cases_per_step=2)
    for step in range(6):
        a, b = cached[step], kept[step]
        assert torch.equal(a[IMAGE], b[IMAGE]) and torch.equal(a[LABEL], b[LABEL]), step
    assert len(kept.memory) == 3 and not cached.memory


def test_a_file_replaced_under_the_same_name_is_preprocessed_again_and_the_cache_names_its_settings(
        tmp_path, monkeypatch):
    """The cache never answers for other data or settings: a record carries its files' size and time, so a
    regenerated case is read again; the cache folder says what made it, and refuses other settings."""
    import os

    from fedseg.data.transforms import (
        CACHE_SETTINGS,
        StaleCacheError,
        cache_dir,
        evaluation_dataset,
        file_stamp,
    )

    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    image, label = blob_volume()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = (write(tmp_path / "i.nii.gz", image, affine), write(tmp_path / "l.nii.gz", label, affine))

    def record():
        return [{IMAGE: paths[0], LABEL: paths[1], "dataset": "liver", "case_id": "liver_0",
                 "owned": owned_mask("liver").astype(np.uint8), "files": file_stamp(*paths)}]

    cfg = {**config(), "data_root": str(tmp_path / "root")}
    before = evaluation_dataset(cfg, record())[0][LABEL].clone()
    write(tmp_path / "l.nii.gz", np.zeros_like(label), affine)  # the case regenerated: no organ any more
    os.utime(paths[1], ns=(os.stat(paths[1]).st_atime_ns, os.stat(paths[1]).st_mtime_ns + 10**9))
    after = evaluation_dataset(cfg, record())[0][LABEL]
    assert before[1:].sum() > 0 and after[1:].sum() == 0  # not the old file's cached volume (channel 0: background)
    folder = cache_dir(cfg)
    settings = json.loads((folder / CACHE_SETTINGS).read_text())
    assert settings["spacing"] == [2.0, 2.0, 2.0] and settings["data_root"] == cfg["data_root"]
    (folder / CACHE_SETTINGS).write_text(json.dumps({**settings, "hu_window": [-100, 100]}))
    with pytest.raises(StaleCacheError, match="hu_window"):
        cache_dir(cfg)


def test_a_multi_hot_label_packs_into_one_byte_per_voxel_and_back_exactly():
    label = np.zeros((5, 4, 3), dtype=np.uint8)
    label[1:4, 1:3, :] = 1  # liver
    label[2, 1, 1] = 2  # liver tumour, inside the liver
    multihot = to_multihot(label, "liver")
    packed = pack_channels(multihot)
    assert packed.dtype == np.uint8 and packed.shape == label.shape
    assert packed[2, 1, 1] == (1 << CHANNEL_INDEX["liver"]) | (1 << CHANNEL_INDEX["liver_tumor"])  # both channels
    assert np.array_equal(unpack_channels(packed), multihot)
    every = (np.random.default_rng(0).random((len(CHANNELS), 6, 5, 4)) > 0.5).astype(np.uint8)
    assert np.array_equal(unpack_channels(pack_channels(every)), every)  # all 256 combinations fit a byte
    with pytest.raises(ValueError, match="multi-hot"):
        pack_channels(every[:3])


def test_domain_augmentation_is_off_by_default_and_changes_only_the_image_when_on():
    from fedseg.data.transforms import domain_augmentation, patch_augment

    assert domain_augmentation(None) == [] and domain_augmentation({}) == []
    transforms = domain_augmentation({"prob": 1.0})
    assert len(transforms) == 5 and all(t.prob == 1.0 for t in transforms)
    cfg = config()
    cfg["preprocess"]["domain_augment"] = {"prob": 1.0}
    cfg["preprocess"]["intensity_shift"] = {"prob": 0.0, "offset": 0.1}
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0.2, 0.8, (1, 16, 16, 16)), dtype=torch.float32)
    label = torch.as_tensor(rng.integers(0, 2, (8, 16, 16, 16)), dtype=torch.float32)
    pipeline = patch_augment(cfg)
    pipeline.set_random_state(0)
    out = pipeline({IMAGE: image.clone(), LABEL: label.clone()})
    assert not torch.allclose(torch.as_tensor(out[IMAGE]), image)
    torch.testing.assert_close(torch.as_tensor(out[LABEL]), label)
    plain = config()
    plain["preprocess"]["intensity_shift"] = {"prob": 0.0, "offset": 0.1}
    same = patch_augment(plain)({IMAGE: image.clone(), LABEL: label.clone()})
    torch.testing.assert_close(torch.as_tensor(same[IMAGE]), image)
