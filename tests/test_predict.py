"""`python -m fedseg predict`: a trained run applied to one's own CT, on a tiny run folder (fast, no training)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import AFFINES, inference_config, write_case

from fedseg.data import phantom
from fedseg.data.labels import CHANNEL_INDEX, FOREGROUND, NUM_CHANNELS, TRAIN_DATASETS
from fedseg.evaluate import external
from fedseg.evaluate.evaluation import load_best
from fedseg.predict import (
    CHECK_COLUMNS,
    DEFAULT_MODEL,
    MODELS,
    check_input,
    estimate_phase,
    predict,
    resolve_model,
    run_config,
    training_domain,
    volume_table,
)
from fedseg.run import main
from fedseg.train import inference
from fedseg.train.models import build_network
from fedseg.train.training import StaleCheckpointError, weight_settings

MODEL = {"name": "UNet", "channels": [4, 8], "strides": [2], "num_res_units": 0}
CPU = torch.device("cpu")


@pytest.fixture
def tiny_run(tmp_path):
    """A finished run with FL local and global bests (random tiny UNets; no SL or central models) and a folder
    of two CTs on non-RAS grids, one .nii.gz, one .nii."""
    run = tmp_path / "run"
    # its data root: a phantom.json saying the training CTs were portal venous, 148-260 mm along the body
    cfg = {**inference_config(), "model": MODEL, "data_root": str(phantom_record(tmp_path / "data"))}
    torch.manual_seed(0)
    for folder in ["fl-global", *(f"fl-local-{d}" for d in TRAIN_DATASETS)]:
        (run / "checkpoints" / folder).mkdir(parents=True)
        network = build_network(**MODEL)
        torch.save({"model": network.state_dict(), "settings": weight_settings(cfg)},
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
    volumes = pd.read_csv(result.out / "volumes.csv", index_col="case", keep_default_na=False)
    assert list(volumes.index) == ["case_a", "case_b"]
    assert list(volumes.columns) == ["voxel_mm3", *(f"{name}_ml" for name in FOREGROUND), *CHECK_COLUMNS]
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


# ---------------------------------------------------------------------------------------------------
# Is the input like the training data? Phase and field of view (phantom cases at coarse voxels).
# ---------------------------------------------------------------------------------------------------
FUSED = {"liver": "liver", "spleen": "spleen", "pancreas": "pancreas", "kidney_left": "kidney",
         "kidney_right": "kidney"}


def reference_fused(case):
    """A phantom case's organs as a fused label map of `CHANNELS` (what a perfect model would write)."""
    fused = np.zeros(case["organs"].shape, np.uint8)
    for organ, channel in FUSED.items():
        fused[case["organs"] == phantom.ORGANS[organ]] = CHANNEL_INDEX[channel]
    return fused


def phantom_case(phase, case_id="img0001", dataset="btcv"):
    return phantom.simulate_case(dataset, case_id, seed=0, inplane_zoom=4, slice_zoom=2, phases=phase)


def spacing(case):
    return tuple(float(s) for s in np.linalg.norm(case["affine"][:3, :3], axis=0))


@pytest.mark.parametrize(("dataset", "case_id"), [("btcv", "img0001"), ("liver", "liver_1")])
def test_the_phase_is_estimated_from_the_organs_and_the_aorta(dataset, case_id):
    for phase in ("unenhanced", "arterial", "portal", "delayed"):
        case = phantom_case(phase, case_id, dataset)
        estimate = estimate_phase(case["image"].astype(np.float32), reference_fused(case), spacing(case))
        assert estimate.phase == phase, (phase, estimate)
        assert set(estimate.hu) >= {"kidney", "liver"}
    case = phantom_case("unenhanced")
    assert estimate_phase(case["image"].astype(np.float32), reference_fused(case), spacing(case)).hu["kidney"] < 60
    # honest when the organs it needs are missing: no kidney -> unknown; no liver -> enhanced, phase not determined
    fused = reference_fused(case)
    without_kidney = np.where(fused == CHANNEL_INDEX["kidney"], 0, fused)
    assert estimate_phase(case["image"].astype(np.float32), without_kidney, spacing(case))[:1] == ("unknown",)
    everywhere = np.full_like(fused, CHANNEL_INDEX["kidney"])  # a lost model paints kidney over air and fat
    estimate = estimate_phase(case["image"].astype(np.float32), everywhere, spacing(case))
    assert estimate.phase == "unknown" and estimate.reason.startswith("the predicted kidney is not soft tissue")
    case = phantom_case("portal")
    without_liver = np.where(reference_fused(case) == CHANNEL_INDEX["liver"], 0, reference_fused(case))
    estimate = estimate_phase(case["image"].astype(np.float32), without_liver, spacing(case))
    assert (estimate.phase, estimate.reason) == ("enhanced", "no liver predicted")


def write_phantom(folder, name, case, fused=None, pad_z=0):
    """The case (and its reference label map) as NIfTI in the dataset's storage orientation; `pad_z` slices of
    air-free soft tissue (40 HU body) added above and below: a field of view far beyond the abdomen."""
    image, label = case["image"], reference_fused(case) if fused is None else fused
    affine = case["affine"].copy()
    if pad_z:
        image = np.pad(image, ((0, 0), (0, 0), (pad_z, pad_z)), mode="edge")
        label = np.pad(label, ((0, 0), (0, 0), (pad_z, pad_z)))
        affine[:3, 3] -= affine[:3, 2] * pad_z
    axcodes = phantom.SCANNERS["btcv"]["axcodes"]
    image, stored = phantom.to_storage(image, affine, axcodes)
    label, _ = phantom.to_storage(label, affine, axcodes)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, stored), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), stored), str(folder / f"{name}_label.nii.gz"))
    return folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"


def phantom_record(root, phase="portal", z_mm=(150.0, 260.0)):
    """A data root's phantom.json: each training dataset's cases in one phase, extents `z_mm` along the body."""
    cases = [{"dataset": d, "case_id": f"{d}_{i}", "shape": [100, 100, int(z / 4.0)], "spacing": [3.2, 3.2, 4.0],
              "axcodes": "RAS", "acquisition": {"phase": phase, "seconds": 75.0}}
             for d in TRAIN_DATASETS for i, z in enumerate(z_mm)]
    root.mkdir(parents=True, exist_ok=True)
    (root / phantom.PHANTOM_FILE).write_text(json.dumps({"version": phantom.PHANTOM_VERSION, "cases": cases}))
    return root


def test_the_remark_says_when_the_phase_or_the_field_of_view_is_unlike_the_training_data(tmp_path):
    domain = training_domain(tmp_path / "run", {"data_root": str(phantom_record(tmp_path / "data"))})
    assert domain.phases == {d: {"portal"} for d in TRAIN_DATASETS}
    assert domain.z_mm == (148.0, 260.0) and domain.inplane_mm == (320.0, 320.0)
    checks = {}
    for phase in ("unenhanced", "portal", "arterial"):
        image, label = write_phantom(tmp_path / "ct", phase, phantom_case(phase))
        checks[phase] = check_input(image, label, domain)
    assert checks["portal"]["phase_estimate"] == "portal" and checks["portal"]["remark"] == ""
    unenhanced = checks["unenhanced"]
    assert unenhanced["phase_estimate"] == "unenhanced" and "kidney=" in unenhanced["phase_hu"]
    assert unenhanced["remark"].startswith("Phase: unenhanced (estimated: kidney ")
    assert "trained on portal venous (kits19, liver, pancreas, spleen) CT" in unenhanced["remark"]
    assert unenhanced["remark"].endswith("Volumes may be wrong.")
    assert checks["arterial"]["remark"].startswith("Phase: late arterial")
    # a run trained on the published mix (portal venous + late arterial KiTS19): arterial is in its domain
    published = training_domain(tmp_path / "run", {"data": {"source": "real"}})
    assert published.phases["kits19"] == {"arterial"} and published.phases["liver"] == {"portal"}
    case = phantom_case("arterial")
    fov = check_input(*write_phantom(tmp_path / "ct", "arterial", case), published)
    assert fov["remark"] == ""
    # a field of view far beyond the abdomen (extended 2 x 60 slices along the body): flagged, the phase still judged
    long = check_input(*write_phantom(tmp_path / "ct", "long", phantom_case("portal"), pad_z=60), domain)
    along = float(long["fov_mm"].split("x")[2])
    assert along > 1.2 * 260.0
    assert long["remark"].startswith(f"Field of view {along:.0f} mm along the body, the training CTs 148-260 mm: "
                                     "it reaches beyond the abdomen")
    assert long["phase_estimate"] == "portal"


def test_predict_writes_the_remark_into_volumes_csv_the_png_and_the_printout(tiny_run, tmp_path, capsys):
    run, _, cfg = tiny_run
    images = tmp_path / "long"
    images.mkdir()
    # one of the fixture's CTs with 30 mm slices: 480 mm along the body (small, so that inference stays fast)
    case = nib.load(str(next(tiny_run[1].glob("case_a.nii*"))))
    affine = case.affine.copy()
    affine[:3, 2] *= 30.0 / np.linalg.norm(affine[:3, 2])
    nib.save(nib.Nifti1Image(np.asarray(case.dataobj), affine), str(images / "long_ct.nii.gz"))
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    volumes = pd.read_csv(out / "volumes.csv", index_col="case", keep_default_na=False)
    text = volumes.loc["long_ct", "remark"]
    assert "Field of view" in text and "beyond the abdomen" in text  # random tiny models: the phase may be unknown
    assert f"Unlike the training data:\n- long_ct: {text}" in printed
    assert volume_table(volumes.assign(remark="")).count("\n") == len(volumes) + 1  # no remark, no section
    check_png(out / "long_ct.png")


def test_a_run_recorded_portably_answers_with_its_own_data_root(tiny_run, monkeypatch):
    """run.json names its data root portably (`<repo>/data/...`, as `fedseg run` writes it): `predict` finds it on
    this machine, so the checkpoints (which name their data) answer; before, the placeholder path matched no folder
    and every checkpoint of a real run was refused as trained on other data."""
    run, images, cfg = tiny_run
    project = Path(cfg["data_root"]).parent
    monkeypatch.setenv("FEDSEG_HOME", str(project))
    recorded = {**cfg, "data_root": f"<repo>/{Path(cfg['data_root']).name}"}
    (run / "run.json").write_text(json.dumps({"profile_config": recorded, "data_root": recorded["data_root"]}))
    assert run_config(run)["data_root"] == cfg["data_root"]
    out = predict(run, images, progress=False)
    assert len(out.volumes) == 2
    other = {**recorded, "data_root": "<repo>/nowhere"}  # a data root not on this machine: refused, not guessed
    (run / "run.json").write_text(json.dumps({"profile_config": other, "data_root": other["data_root"]}))
    with pytest.raises(StaleCheckpointError, match="trained on other data"):
        predict(run, images, progress=False)
