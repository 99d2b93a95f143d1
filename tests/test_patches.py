"""The patch cache: cases stored as memory-mapped arrays, patches read by slicing, the same targets as the
volume cache, and training from it."""

import numpy as np
import pytest
import torch
from helpers import make_records, new_model, training_config

from fedseg.data import patches, transforms
from fedseg.data.labels import NUM_CHANNELS
from fedseg.train.training import PatchBatches, train_model


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((1, 20, 17, 9)).astype(np.float32)
    label = np.zeros((NUM_CHANNELS, 20, 17, 9), dtype=np.uint8)
    label[1, 5:12, 4:10, 2:7] = 1  # liver
    label[2, 7:9, 5:7, 3:5] = 1  # its tumour
    label[0] = 1 - label[1:].max(axis=0)
    size = patches.write_case(tmp_path / "case", image, label, "float32")
    return patches.StoredCase(tmp_path / "case"), image, label, size


def test_a_patch_is_the_slice_of_the_stored_volume_zero_beyond_it(stored):
    case, image, label, size = stored
    assert case.shape == (20, 17, 9)
    got_image, got_label = case.crop((3, 2, 1), (8, 8, 8))
    assert np.array_equal(got_image, image[:, 3:11, 2:10, 1:9]) and np.array_equal(got_label, label[:, 3:11, 2:10, 1:9])
    got_image, got_label = case.crop((15, 10, 0), (8, 8, 12))  # past the edges and deeper than the volume
    assert np.array_equal(got_image[:, :5, :7, :9], image[:, 15:, 10:, :]) and not got_image[:, 5:].any()
    assert np.array_equal(got_label[:, :5, :7, :9], label[:, 15:, 10:, :]) and not got_label[:, :, :, 9:].any()
    whole_image, whole_label = case.whole()
    assert np.array_equal(whole_image, image) and np.array_equal(whole_label, label)
    assert set(np.unravel_index(case.foreground, case.shape)[0]) == set(range(5, 12))  # the liver's voxels
    assert size < 5.2 * image.size + 4 * label[1:].max(axis=0).sum() + 2000  # float32 + 1 byte + indices


def test_float16_storage_keeps_the_image_to_a_thousandth_at_three_bytes_a_voxel(tmp_path, stored):
    _, image, label, _ = stored
    patches.write_case(tmp_path / "half", image, label, "float16")
    half = patches.StoredCase(tmp_path / "half")
    assert np.abs(half.whole()[0] - image).max() < 1e-3
    assert (tmp_path / "half" / "image.npy").stat().st_size < 2 * image.size + 200
    with pytest.raises(ValueError, match="cache_dtype"):
        patches.write_case(tmp_path / "bad", image, label, "int8")


def test_patch_corners_fit_the_volume_and_posneg_centres_half_of_them_on_foreground(stored):
    case, _, label, _ = stored
    rng = np.random.default_rng(1)
    for sampling in ("random", "posneg"):
        starts = patches.patch_starts(case, (8, 8, 8), 400, sampling, rng)
        assert all(0 <= s <= d - 8 for start in starts for s, d in zip(start, case.shape))
    starts = patches.patch_starts(case, (4, 4, 4), 400, "posneg", rng)
    centred = [label[1:, s[0] + 2, s[1] + 2, s[2] + 2].any() for s in starts]
    assert 0.4 < np.mean(centred) < 0.6  # the liver is 4% of the volume; half the patches are centred on it
    with pytest.raises(ValueError, match="classes"):
        patches.patch_starts(case, (8, 8, 8), 1, "classes", rng)


def test_the_patch_cache_gives_the_volume_caches_volumes_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    records = make_records(tmp_path)
    cfg = training_config(tmp_path / "root", steps=4)
    built = transforms.build_cache({**cfg, "preprocess": {**cfg["preprocess"], "cache": "patches",
                                                          "cache_workers": 2}}, records, progress=False)
    assert built["cases"] == built["cached_cases"] == 3 and "patches-float32" in built["cache_dir"]
    stored_cfg = {**cfg, "preprocess": {**cfg["preprocess"], "cache": "patches"}}
    volumes, stored = transforms.evaluation_dataset(cfg, records), transforms.evaluation_dataset(stored_cfg, records)
    for index in range(len(records)):
        for key in ("image", "label", "foreground"):
            assert torch.equal(torch.as_tensor(volumes[index][key]), stored[index][key]), key
    batches = PatchBatches(stored_cfg, records, seed=0, cases_per_step=2)
    batch, again = batches[5], PatchBatches(stored_cfg, records, seed=0, cases_per_step=2)[5]
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["label"].shape == (4, NUM_CHANNELS, 16, 16, 16)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.uint8
    assert torch.equal(batch["image"], again["image"])  # a step's batch depends on (seed, step) alone
    assert not torch.equal(batch["image"], batches[6]["image"])
    assert batch["label"][:, 1:].any()  # posneg: foreground in the patches
    result = train_model(stored_cfg, new_model(stored_cfg), records[:2], records[2:], tmp_path / "run",
                         progress=False)
    assert result["finished"] and np.isfinite(result["history"]["val_mean_dice"]).all()
    with pytest.raises(ValueError, match="preprocess.cache"):
        transforms.patch_cache({"preprocess": {"cache": "memmap"}})
