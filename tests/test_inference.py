"""Whole-volume inference: preprocessing with meta, ensemble, inversion to the original grid, Shen et al. 2022's
post-processing and fusion, BTCV organs, NIfTI output and Wang & Ma 2022's coarse-to-fine pass."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import AFFINES, inference_config, write_case
from monai.data import MetaTensor

from fedseg.data.labels import CHANNEL_INDEX, NUM_CHANNELS, to_multihot
from fedseg.data.transforms import preprocess
from fedseg.train.inference import (
    btcv_truth,
    coarse_to_fine_logits,
    ensemble_logits,
    fuse,
    inference_transform,
    organ_masks,
    postprocess,
    predict_ensemble,
    predict_logits,
    to_original_grid,
    write_prediction,
)
from fedseg.train.models import ABSENT_LOGIT, build_network

CPU = torch.device("cpu")


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def pointwise(image):
    """A fake network that segments bright voxels (intensity > 0.5) in every channel, background the rest."""
    score = (image - 0.5) * 20
    return torch.cat([-score, *[score] * (NUM_CHANNELS - 1)], dim=1)


def test_inference_transform_gives_the_training_grid_with_meta(tmp_path):
    paths, _ = write_case(tmp_path, AFFINES["LAS"])
    cfg = inference_config()
    image = inference_transform(cfg)({"image": str(paths["image"])})["image"]
    trained = preprocess(cfg)({**{k: str(v) for k, v in paths.items()}, "dataset": "liver"})["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert [op["class"] for op in image.applied_operations] == ["Orientation", "SpatialResample"]
    assert image.shape == trained.shape
    assert torch.equal(image.as_tensor(), torch.as_tensor(trained))
    assert np.allclose(np.diag(image.affine.numpy())[:3], cfg["preprocess"]["spacing"])  # RAS, 1.5 mm


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_to_original_grid_returns_the_preprocessed_label_to_the_file_grid(tmp_path, orientation):
    affine = AFFINES[orientation]
    paths, label = write_case(tmp_path, affine)
    cfg = inference_config()
    image = inference_transform(cfg)({"image": str(paths["image"])})["image"]
    target = preprocess(cfg)({**{k: str(v) for k, v in paths.items()}, "dataset": "liver"})["label"]
    assert tuple(target.shape[1:]) == tuple(image.shape[1:]) != label.shape

    mask = to_original_grid(target.float(), image, cfg)
    truth = to_multihot(label, "liver").astype(bool)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (NUM_CHANNELS, *label.shape)
    assert np.allclose(mask.affine.numpy(), nib.load(str(paths["image"])).affine)
    assert dice(mask[CHANNEL_INDEX["liver"]], truth[CHANNEL_INDEX["liver"]]) > 0.95
    assert dice(mask[CHANNEL_INDEX["liver_tumor"]], truth[CHANNEL_INDEX["liver_tumor"]]) > 0.85
    assert not mask[CHANNEL_INDEX["spleen"]].any()

    from_logits = to_original_grid((target.float() * 2 - 1) * 10, image, cfg, logits=True)
    assert torch.equal(from_logits.as_tensor(), mask.as_tensor())
    probabilities = to_original_grid(target.float(), image, cfg, threshold=None)
    assert probabilities.dtype == torch.float32 and 0 < probabilities.max() <= 1
    liver = probabilities[CHANNEL_INDEX["liver"]]
    assert liver.min() < 0.5 < liver.max() and ((liver > 0.05) & (liver < 0.95)).any()  # interpolated, not nearest


def test_to_original_grid_refuses_what_it_cannot_invert(tmp_path):
    paths, _ = write_case(tmp_path, AFFINES["LAS"])
    cfg = inference_config()
    image = inference_transform(cfg)({"image": str(paths["image"])})["image"]
    prediction = torch.zeros(NUM_CHANNELS, *image.shape[1:])
    with pytest.raises(ValueError, match="applied operations"):
        to_original_grid(prediction, image.as_tensor(), cfg)
    with pytest.raises(ValueError, match="spatial shape"):
        to_original_grid(prediction[:, 1:], image, cfg)
    image.applied_operations = image.applied_operations[1:]
    with pytest.raises(ValueError, match="not those of inference_transform"):
        to_original_grid(prediction, image, cfg)


def test_predict_logits_runs_each_model_over_the_whole_volume():
    cfg = inference_config(patch=16)
    image = torch.full((1, 30, 20, 24), 0.1)
    image[:, 3:9, 4:10, 15:20] = 0.9
    torch.manual_seed(0)
    network = build_network("UNet", channels=[4, 8], strides=[2], num_res_units=0).train()
    logits = predict_logits({"fake": pointwise, "unet": network}, image, cfg, CPU)
    assert set(logits) == {"fake", "unet"} and not network.training
    assert all(t.shape == (NUM_CHANNELS, 30, 20, 24) and t.dtype == torch.float32 for t in logits.values())
    assert torch.allclose(logits["fake"], pointwise(image[None])[0], atol=1e-5)
    single = predict_logits(pointwise, MetaTensor(image), cfg, CPU)
    assert isinstance(single, torch.Tensor) and not isinstance(single, MetaTensor)
    assert torch.equal(single, logits["fake"])
    with pytest.raises(ValueError, match="channel-first"):
        predict_logits(pointwise, image[0], cfg, CPU)


def test_ensemble_takes_each_channel_from_the_client_that_owns_it():
    constants = {"spleen": 4.0, "kits19": 3.0, "liver": 1.0, "pancreas": 2.0}
    fake = {name: torch.full((NUM_CHANNELS, 2, 3, 4), value) for name, value in constants.items()}
    ensemble = ensemble_logits(fake)
    expected = [-4.0, 1.0, 1.0, 4.0, 2.0, 2.0, 3.0, 3.0]  # background = -max(foreground)
    assert ensemble.shape == (NUM_CHANNELS, 2, 3, 4)
    assert ensemble[:, 0, 0, 0].tolist() == expected and bool((ensemble == ensemble[:, :1, :1, :1]).all())

    partial = ensemble_logits({"liver": fake["liver"], "pancreas": fake["pancreas"]})
    assert partial[:, 0, 0, 0].tolist() == [-2.0, 1.0, 1.0, ABSENT_LOGIT, 2.0, 2.0, ABSENT_LOGIT, ABSENT_LOGIT]
    with pytest.raises(ValueError, match="client dataset names"):
        ensemble_logits({"global": fake["liver"]})
    with pytest.raises(ValueError, match="shape"):
        ensemble_logits({"liver": fake["liver"], "spleen": fake["spleen"][:, :1]})


def test_the_streamed_ensemble_is_the_ensemble_of_the_models_logits_bit_for_bit():
    cfg = inference_config(patch=16)
    image = torch.rand(1, 24, 20, 18)
    models = {}
    for seed, name in enumerate(("liver", "pancreas", "spleen")):  # kits19 absent: its channels stay absent
        torch.manual_seed(seed)
        models[name] = build_network("UNet", channels=(4, 8), strides=(2,), num_res_units=1)
    streamed = predict_ensemble(models, image, cfg, CPU)
    assert torch.equal(streamed, ensemble_logits(predict_logits(models, image, cfg, CPU)))
    with pytest.raises(ValueError, match="client dataset names"):
        predict_ensemble({"global": models["liver"]}, image, cfg, CPU)


def test_postprocess_keeps_both_kidneys_and_the_largest_component_of_every_other_channel():
    mask = np.zeros((NUM_CHANNELS, 20, 20, 20), dtype=bool)
    liver, spleen = CHANNEL_INDEX["liver"], CHANNEL_INDEX["spleen"]
    kidney, kidney_tumor = CHANNEL_INDEX["kidney"], CHANNEL_INDEX["kidney_tumor"]
    mask[liver, 2:10, 2:10, 2:10] = True  # largest liver component
    mask[liver, 14:16, 14:16, 14:16] = True  # smaller, detached: removed
    mask[spleen, 14:15, 2:4, 2:4] = True  # smaller than the liver's big component, but alone in its channel
    mask[kidney, 2:6, 14:18, 2:6] = True  # larger kidney (64 voxels)
    mask[kidney, 12:15, 14:18, 2:6] = True  # smaller kidney (48 voxels)
    two_kidneys = mask[kidney].copy()
    mask[kidney, 17:19, 17:19, 17:19] = True  # a stray third blob (8 voxels): removed
    mask[kidney_tumor, 3:5, 15:17, 3:5] = True  # larger tumour, inside the larger kidney
    mask[kidney_tumor, 13, 15, 3] = True  # one-voxel tumour in the other kidney: the tumour channel keeps one
    mask[0] = ~mask[1:].any(0)
    original = mask.copy()

    cleaned = postprocess(torch.as_tensor(mask))
    assert cleaned.dtype == bool and cleaned.shape == mask.shape
    assert np.array_equal(cleaned[kidney], two_kidneys)  # both kidneys, and nothing of the stray blob
    assert not cleaned[kidney, 17:19, 17:19, 17:19].any()
    assert cleaned[liver, 2:10, 2:10, 2:10].all() and not cleaned[liver, 14:16, 14:16, 14:16].any()
    assert cleaned[liver].sum() == 8 ** 3
    assert np.array_equal(cleaned[spleen], mask[spleen])
    assert cleaned[kidney_tumor].sum() == 8 and cleaned[kidney_tumor, 3:5, 15:17, 3:5].all()
    assert np.array_equal(cleaned[0], ~cleaned[1:].any(0)) and cleaned[0, 15, 15, 15] and cleaned[0, 18, 18, 18]
    assert np.array_equal(mask, original)  # the input is left alone

    one_kidney = postprocess(mask, num_components={"kidney": 1})  # the old default
    assert one_kidney[kidney].sum() == 64 and one_kidney[kidney, 2:6, 14:18, 2:6].all()
    assert not one_kidney[kidney, 12:15, 14:18, 2:6].any() and not one_kidney[kidney, 17:19, 17:19, 17:19].any()
    assert np.array_equal(one_kidney[liver], cleaned[liver])

    untouched_liver = postprocess(mask, num_components={"liver": None})  # overrides one channel, not the rest
    assert np.array_equal(untouched_liver[liver], mask[liver])
    assert np.array_equal(untouched_liver[kidney], two_kidneys)
    with pytest.raises(ValueError, match="num_components"):
        postprocess(mask, num_components={"kidneys": 2})


def test_fuse_paints_channels_in_the_paper_order_and_organs_include_their_tumours():
    mask = np.zeros((NUM_CHANNELS, 4, 4, 4), dtype=bool)
    mask[CHANNEL_INDEX["liver"], :2] = True
    mask[CHANNEL_INDEX["liver_tumor"], 0, 0] = True  # inside the liver
    mask[CHANNEL_INDEX["spleen"], 1, 1] = True  # overlaps the liver: spleen wins
    mask[CHANNEL_INDEX["kidney"], 3, 3] = True
    mask[CHANNEL_INDEX["kidney_tumor"], 3, 3, 3] = True
    mask[CHANNEL_INDEX["pancreas"], 3, 3, 3] = True  # pancreas is painted before kidney tumour
    label = fuse(mask)
    assert label.dtype == np.uint8 and label.shape == (4, 4, 4)
    assert (label[0, 0] == 2).all() and (label[1, 1] == 3).all()
    assert (label[0, 1] == 1).all() and (label[1, 0] == 1).all()
    assert label[3, 3].tolist() == [6, 6, 6, 7] and (label[2] == 0).all()

    for organs in (organ_masks(label), organ_masks(mask)):
        assert list(organs) == ["liver", "pancreas", "kidney", "spleen"]
        assert organs["liver"][0, 0].all()  # the tumour counts as liver
        assert organs["kidney"][3, 3].all()
    assert organ_masks(label)["liver"].sum() == 32 - 4  # the spleen voxels left the liver in the fused map
    assert organ_masks(mask)["liver"].sum() == 32
    assert not organ_masks(label)["pancreas"].any() and organ_masks(mask)["pancreas"].sum() == 1


def test_btcv_truth_merges_the_kidneys_and_ignores_other_structures():
    label = np.arange(14).reshape(1, 1, 14).repeat(2, axis=0).astype(float)
    organs = btcv_truth(label)
    values = {organ: sorted(set(label[m].astype(int).tolist())) for organ, m in organs.items()}
    assert values == {"liver": [6], "pancreas": [11], "kidney": [2, 3], "spleen": [1]}
    assert all(m.dtype == bool and m.shape == label.shape for m in organs.values())
    with pytest.raises(ValueError, match="btcv"):
        btcv_truth(np.array([[[14]]]))


def test_write_prediction_keeps_the_reference_grid(tmp_path):
    affine = AFFINES["PRI"]
    ct = nib.Nifti1Image(np.arange(120, dtype=np.uint16).reshape(6, 5, 4), affine)
    ct.set_qform(affine, code=1)
    ct.set_sform(affine, code=1)
    nib.save(ct, str(tmp_path / "ct.nii"))
    with open(tmp_path / "ct.nii", "r+b") as file:  # scl_slope 1, scl_inter -1024, as scanners store CT
        file.seek(112)
        file.write(np.array([1, -1024], dtype=np.float32).tobytes())
    reference = nib.load(str(tmp_path / "ct.nii"))
    assert (reference.dataobj.slope, reference.dataobj.inter) == (1.0, -1024.0)
    label = np.random.default_rng(0).integers(0, 8, size=(6, 5, 4))
    out = tmp_path / "pred" / "case.nii.gz"
    for _ in range(2):  # the second call replaces the first file
        assert write_prediction(label, tmp_path / "ct.nii", out) == out
    saved = nib.load(str(out))
    assert np.allclose(saved.affine, affine) and saved.get_data_dtype() == np.uint8
    assert np.array_equal(saved.get_fdata(), label) and np.array_equal(np.asarray(saved.dataobj), label)
    assert np.array_equal(saved.get_qform(), reference.get_qform()) and saved.header["qform_code"] == 1
    assert np.array_equal(saved.get_sform(), reference.get_sform()) and saved.header["sform_code"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.nii.gz"]
    with pytest.raises(ValueError, match="shape"):
        write_prediction(label[:-1], tmp_path / "ct.nii", out)
    with pytest.raises(ValueError, match="0..255"):
        write_prediction(label - 1, tmp_path / "ct.nii", out)


def test_coarse_to_fine_matches_the_full_pass_inside_a_smaller_box():
    cfg = inference_config(spacing=2.0, patch=16)
    image = torch.full((1, 48, 48, 40), 0.1)
    image[:, 6:14, 8:16, 26:36] = 0.9
    full = predict_logits({"liver": pointwise, "spleen": pointwise}, image, cfg, CPU)
    result = coarse_to_fine_logits({"liver": pointwise, "spleen": pointwise}, image, cfg, CPU,
                                   coarse_factor=2.0, margin_mm=4.0)
    assert result.found and set(result.logits) == {"liver", "spleen"}
    for name in full:
        assert result.logits[name].shape == full[name].shape
        assert torch.equal(result.logits[name] > 0, full[name] > 0)
    (x0, x1), (y0, y1), (z0, z1) = result.box
    assert x0 <= 6 and x1 >= 14 and y0 <= 8 and y1 >= 16 and z0 <= 26 and z1 >= 36
    assert result.box == ((2, 18), (4, 20), (23, 39))  # 2-voxel margin, widened to one 16-voxel patch
    assert result.covered == pytest.approx(16**3 / (48 * 48 * 40))
    outside = result.logits["liver"][:, 30:, 30:, :10]
    assert (outside[0] == -ABSENT_LOGIT).all() and (outside[1:] == ABSENT_LOGIT).all()

    single = coarse_to_fine_logits(pointwise, image, cfg, CPU, margin_mm=4.0)
    assert isinstance(single.logits, torch.Tensor) and torch.equal(single.logits, result.logits["liver"])
    # every organ a fine model gives was found: the box alone, no full-window pass
    assert result.organs == {"liver": True, "spleen": True} and result.fallback == ()
    assert single.organs == {"liver": True, "pancreas": True, "kidney": True, "spleen": True}


def test_coarse_to_fine_margin_follows_each_axis_spacing():
    """Anisotropic voxels (1 x 2 x 4 mm): 8 mm of margin is 8, 4 and 2 voxels, not one count on every axis."""
    cfg = inference_config(patch=8)
    cfg["preprocess"]["spacing"] = [1.0, 2.0, 4.0]
    image = torch.full((1, 40, 40, 24), 0.1)
    image[:, 16:24, 16:24, 10:14] = 0.9  # coarse voxels [8, 12) x [8, 12) x [5, 7) at factor 2
    result = coarse_to_fine_logits({"liver": pointwise}, image, cfg, CPU, coarse_factor=2.0, margin_mm=8.0)
    assert result.box == ((16 - 8, 24 + 8), (16 - 4, 24 + 4), (10 - 2, 14 + 2))
    assert result.covered == pytest.approx(24 * 16 * 8 / (40 * 40 * 24))
    full = predict_logits({"liver": pointwise}, image, cfg, CPU)["liver"]
    assert torch.equal(result.logits["liver"] > 0, full > 0)


def test_coarse_to_fine_segments_an_organ_the_localiser_missed_over_the_full_window():
    """CT unlike the training data: the spleen lies far from liver and kidneys and the localiser does not see it.
    The fine pass must still look for it everywhere, and the result must say the localiser missed it."""
    cfg = inference_config(spacing=2.0, patch=16)
    image = torch.full((1, 48, 48, 40), 0.1)
    image[:, 6:14, 8:16, 26:36] = 0.9    # liver and kidneys: the localiser finds them
    image[:, 36:44, 36:44, 2:8] = 0.7    # the spleen, far away: bright for the fine models only
    spleen = CHANNEL_INDEX["spleen"]

    def localiser(batch):  # sees the brightest organs only, and never the spleen
        score = (batch - 0.8) * 20
        logits = torch.cat([-score, *[score] * (NUM_CHANNELS - 1)], dim=1)
        logits[:, spleen] = -5.0
        return logits

    models = {"liver": pointwise, "spleen": pointwise}
    full = predict_logits(models, image, cfg, CPU)
    result = coarse_to_fine_logits(models, image, cfg, CPU, margin_mm=4.0, coarse_models={"localiser": localiser})
    ensemble = ensemble_logits(result.logits)
    assert (ensemble[spleen, 36:44, 36:44, 2:8] > 0).all(), "the spleen outside the localiser's box was lost"
    assert torch.equal(result.logits["spleen"][spleen] > 0, full["spleen"][spleen] > 0)  # its full-window pass
    assert result.found and result.organs == {"liver": True, "spleen": False}
    assert result.fallback == ("spleen",) and result.window("spleen") == "full" and result.window("liver") == "box"
    assert result.box == ((2, 18), (4, 20), (23, 39))  # the box of what the localiser found, as before
    liver_channels = [CHANNEL_INDEX["liver"], CHANNEL_INDEX["liver_tumor"]]
    assert (result.logits["liver"][liver_channels][:, 36:44, 36:44, 2:8] == ABSENT_LOGIT).all()  # found: box only
    assert (result.logits["spleen"][0, 36:44, 36:44, 2:8] < 0).all()  # not background where the spleen is
    assert (result.logits["spleen"][0, 30:, :4, :4] > 0).all()  # background elsewhere outside the box


def test_coarse_to_fine_falls_back_to_the_full_pass_when_nothing_is_found():
    cfg = inference_config(spacing=2.0, patch=16)
    image = torch.full((1, 40, 36, 20), 0.1)
    image[:, 30:33, 2:5, 2:5] = 0.9  # fine detail only; the coarse model below sees nothing

    def blind(batch):
        return torch.full((batch.shape[0], NUM_CHANNELS, *batch.shape[2:]), -5.0)

    result = coarse_to_fine_logits(pointwise, image, cfg, CPU, coarse_models=blind)
    assert not result.found and result.covered == 1.0
    assert result.organs == dict.fromkeys(("liver", "pancreas", "kidney", "spleen"), False)
    assert result.fallback == ("liver", "pancreas", "kidney", "spleen")
    assert result.box == ((0, 40), (0, 36), (0, 20))
    assert torch.equal(result.logits, predict_logits(pointwise, image, cfg, CPU))
    with pytest.raises(ValueError, match="coarse_factor"):
        coarse_to_fine_logits(pointwise, image, cfg, CPU, coarse_factor=0.5)


def test_the_pieces_compose_from_file_to_written_label_map(tmp_path):
    paths, label = write_case(tmp_path, AFFINES["LAS"])
    cfg = inference_config()
    image = inference_transform(cfg)({"image": str(paths["image"])})["image"]
    logits = ensemble_logits(predict_logits({"liver": pointwise, "spleen": lambda x: pointwise(x) - 40},
                                            image, cfg, CPU))
    mask = to_original_grid(logits, image, cfg, logits=True)
    label_map = fuse(postprocess(mask))
    written = nib.load(str(write_prediction(label_map, paths["image"], tmp_path / "out.nii.gz")))
    organs = organ_masks(np.asarray(written.dataobj))
    assert dice(organs["liver"], label > 0) > 0.9  # bright voxels (HU 150 -> 0.65) are liver and tumour
    assert not organs["spleen"].any() and not organs["kidney"].any()
