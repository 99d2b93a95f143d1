"""`python -m fedseg predict`: a trained run applied to one's own CT, on a tiny run folder (fast, no training)."""

from __future__ import annotations

import json
import re
import shutil

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from test_inference import AFFINES, config, write_case

from fedseg.data.labels import CHANNEL_INDEX, FOREGROUND, NUM_CHANNELS, TRAIN_DATASETS
from fedseg.evaluate import external
from fedseg.evaluate.evaluation import load_best
from fedseg.predict import DEFAULT_MODEL, MODELS, predict, resolve_model
from fedseg.run import main
from fedseg.train import inference
from fedseg.train.models import build_network

MODEL = {"name": "UNet", "channels": [4, 8], "strides": [2], "num_res_units": 0}
CPU = torch.device("cpu")


@pytest.fixture
def tiny_run(tmp_path):
    """A finished run with FL local and global bests (random tiny UNets; no SL or central models) and a folder
    of two CTs on non-RAS grids, one .nii.gz, one .nii."""
    run = tmp_path / "run"
    cfg = {**config(), "model": MODEL}
    torch.manual_seed(0)
    for folder in ["fl-global", *(f"fl-local-{d}" for d in TRAIN_DATASETS)]:
        (run / "checkpoints" / folder).mkdir(parents=True)
        network = build_network(**MODEL)
        torch.save({"model": network.state_dict(), "settings": {"model": MODEL}},
                   run / "checkpoints" / folder / "best.pt")
    (run / "run.json").write_text(json.dumps({"profile_config": cfg}))
    (run / "fl").mkdir()
    (run / "fl" / "status.json").write_text(json.dumps({"status": "finished"}))
    images = tmp_path / "my ct"
    images.mkdir()
    for case, orientation, suffix in (("case_a", "LAS", ".nii.gz"), ("case_b", "PRI", ".nii")):
        scratch = tmp_path / case
        scratch.mkdir()
        paths, _ = write_case(scratch, AFFINES[orientation])
        image = nib.load(str(paths["image"]))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), str(images / f"{case}{suffix}"))
    (images / "notes.txt").write_text("not an image")
    return run, images, cfg


def reference_label_map(run, image_path, cfg):
    """The FL local ensemble composed by hand from inference's pieces (module docstring), for comparison."""
    models = {d: load_best(cfg, run / "checkpoints" / f"fl-local-{d}" / "best.pt", CPU) for d in TRAIN_DATASETS}
    image = inference.inference_transform(cfg)({"image": str(image_path)})["image"]
    logits = inference.ensemble_logits(inference.predict_logits(models, image, cfg, CPU))
    return inference.fuse(inference.to_original_grid(logits, image, cfg, logits=True))


def check_png(path):
    assert path.stat().st_size > 1000
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels[..., :3].std() > 0.01


def test_predict_writes_label_maps_on_each_images_grid_with_overlays_and_volumes(tiny_run):
    run, images, cfg = tiny_run
    result = predict(run, images, device="cpu", progress=False)
    assert result.out == run / "predictions" / "own" / DEFAULT_MODEL
    volumes = pd.read_csv(result.out / "volumes.csv", index_col="case")
    assert list(volumes.index) == ["case_a", "case_b"]
    assert list(volumes.columns) == ["voxel_mm3", *(f"{name}_ml" for name in FOREGROUND)]
    pd.testing.assert_frame_equal(volumes, result.volumes, check_dtype=False)
    for case, suffix in (("case_a", ".nii.gz"), ("case_b", ".nii")):
        original = nib.load(str(images / f"{case}{suffix}"))
        written = nib.load(str(result.out / f"{case}.nii.gz"))
        labels = np.asarray(written.dataobj)
        assert labels.shape == original.shape and labels.dtype == np.uint8
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        assert set(np.unique(labels)) <= set(range(NUM_CHANNELS)) and labels.any()
        voxel_mm3 = float(np.prod(written.header.get_zooms()[:3]))
        # the voxel volume is the image's own (its affine's column lengths), not the profile's spacing
        assert voxel_mm3 == pytest.approx(np.prod(np.linalg.norm(original.affine[:3, :3], axis=0)), rel=1e-5)
        assert volumes.loc[case, "voxel_mm3"] == pytest.approx(voxel_mm3)
        for name in FOREGROUND:
            expected = (labels == CHANNEL_INDEX[name]).sum() * voxel_mm3 / 1000
            assert volumes.loc[case, f"{name}_ml"] == pytest.approx(expected, abs=1e-3)
        check_png(result.out / f"{case}.png")
    # the same composition as 04 and inference's docstring: each channel from the client that owns it
    expected = reference_label_map(run, images / "case_b.nii", cfg)
    np.testing.assert_array_equal(np.asarray(nib.load(str(result.out / "case_b.nii.gz")).dataobj), expected)


def test_the_command_line_prints_the_volumes_and_writes_where_asked(tiny_run, tmp_path, capsys):
    run, images, _ = tiny_run
    out = tmp_path / "processed"
    assert main(["predict", "--run", str(run), "--model", "fl-local-processed", "--images", str(images),
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"2 predictions (label maps, overlays, volumes.csv) in {out}" in printed
    assert "case_a" in printed and "case_b" in printed and "kidney_tumor" in printed
    volumes = pd.read_csv(out / "volumes.csv", index_col="case")
    assert f"{volumes.loc['case_a', 'liver_ml']:.1f}" in printed
    for case in ("case_a", "case_b"):
        labels = np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj)
        assert labels.shape == nib.load(str(next(images.glob(f"{case}.nii*")))).shape
        check_png(out / f"{case}.png")
    assert main(["predict", "--run", str(run), "--model", "sl-ensemble", "--images", str(images)]) == 1
    assert "02_standalone_baselines" in capsys.readouterr().err


def test_predict_refuses_what_it_cannot_do_and_says_why(tiny_run, tmp_path):
    run, images, _ = tiny_run
    with pytest.raises(ValueError, match=r"has fl-local-ensemble, fl-local-processed, fl-global\. The study's models"):
        predict(run, images, model="fl-local", progress=False)
    assert resolve_model("FL local model (processed)", run) == "fl-local-processed"
    assert resolve_model(external.slug(external.GLOBAL), run) == "fl-global"
    assert set(MODELS.values()) == set(external.METHODS)  # every method of 04 (but coarse-to-fine) is offered
    with pytest.raises(FileNotFoundError, match=r"checkpoints/central/best\.pt.*02_standalone_baselines"):
        predict(run, images, model="central", progress=False)
    empty = tmp_path / "empty folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"No NIfTI images .* in {re.escape(str(empty))}"):
        predict(run, empty, progress=False)
    four_d = tmp_path / "4d"
    four_d.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), str(four_d / "series.nii.gz"))
    with pytest.raises(ValueError, match=r"series\.nii\.gz has shape \(8, 8, 8, 2\).*3D"):
        predict(run, four_d, progress=False)
    (run / "fl" / "status.json").write_text(json.dumps({"status": "failed", "reason": "client lost"}))
    with pytest.raises(RuntimeError, match="is failed .*client lost"):
        predict(run, images, progress=False)
    shutil.rmtree(run / "checkpoints" / "fl-local-spleen")
    with pytest.raises(FileNotFoundError, match=r"fl-local-spleen/best\.pt.*03_federated_training.*has: fl-global"):
        predict(run, images, progress=False)
    assert not (run / "predictions").exists()  # nothing written by a refused call
