"""The training loop on tiny hand-made volumes: it learns, it validates, and a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import VOXEL, make_records, new_model, training_config

from fedseg.train.models import build_network
from fedseg.train.training import train_model


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    records = make_records(tmp_path)
    return tmp_path, training_config(tmp_path / "root"), records


def test_training_learns_validates_and_keeps_the_best(setup):
    root, cfg, records = setup
    cfg["train"]["steps"] = 40
    cfg["train"]["val_every"] = 10
    result = train_model(cfg, new_model(cfg), records[:2], records[2:], root / "run", progress=False)
    history = result["history"]
    assert list(history["step"]) == [10, 20, 30, 40]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert result["best_val_mean_dice"] == history["val_mean_dice"].max()
    assert history["dice_liver"].max() > 0.5, history  # a sphere on noise is learnable in 40 steps
    best = torch.load(root / "run" / "best.pt", weights_only=False)
    assert best["step"] == result["best_step"]
    assert (root / "run" / "history.csv").exists()


def test_validation_scores_only_owned_channels(setup):
    root, cfg, records = setup
    cfg["train"]["steps"] = 4
    result = train_model(cfg, new_model(cfg), records[:2], records[2:], root / "run", progress=False)
    assert {c for c in result["history"].columns if c.startswith("dice_")} == {"dice_liver", "dice_liver_tumor"}


def test_an_interrupted_run_resumes_to_the_same_weights(setup):
    root, cfg, records = setup
    whole = new_model(cfg)
    train_model(cfg, whole, records[:2], records[2:], root / "whole", progress=False)
    part = new_model(cfg)
    first = train_model(cfg, part, records[:2], records[2:], root / "part", stop_after=6, progress=False)
    assert first["steps"] == 6 and not first["finished"]
    resumed = new_model(cfg)  # a fresh process: weights come from the checkpoint only
    second = train_model(cfg, resumed, records[:2], records[2:], root / "part", progress=False)
    assert second["steps"] == cfg["train"]["steps"] and second["finished"]
    for name, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import fedseg.train.training as training
    import fedseg.train.training.loop as loop
    from helpers import make_records, training_config, new_model
    from pathlib import Path
    slow = loop.build_loss
    def slowed(name):
        loss = slow(name)
        def wrapped(*args):
            time.sleep(0.3)
            return loss(*args)
        return wrapped
    loop.build_loss = slowed  # where train_model looks it up
    root = Path({root!r})
    cfg = training_config(root / "root", steps=40)
    records = make_records(root)
    training.train_model(cfg, new_model(cfg), records[:2], records[2:], root / "killed", progress=False)
""")


def test_a_killed_process_resumes_to_the_same_weights(setup):
    root, _, _ = setup
    cfg = training_config(root / "root", steps=40)
    records = make_records(root)
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), root=str(root))
    env = {**os.environ, "FEDSEG_CACHE": os.environ["FEDSEG_CACHE"]}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    last = root / "killed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["state"]["step"] >= 6:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=False)["state"]["step"]
    assert 6 <= killed_at < 40, "the run was not killed mid-way"
    resumed = new_model(cfg)
    train_model(cfg, resumed, records[:2], records[2:], root / "killed", progress=False)
    whole = new_model(cfg)
    train_model(cfg, whole, records[:2], records[2:], root / "whole", progress=False)
    for name, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name


def test_models_trained_in_parallel_processes_equal_those_trained_one_by_one(setup, monkeypatch):
    """fit_models with two worker processes (one torch thread each) gives every model the weights it gets
    trained alone with one thread: the parallelism changes when models train, not how."""
    from fedseg.train.training import fit_models

    root, cfg, records = setup
    cfg["train"].update(steps=4, val_every=2)
    jobs = {"a": (records[:2], records[2:], 4), "b": (records[1:], records[:1], 3)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = fit_models(cfg, jobs, root / "alone", workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one thread per worker, on any machine
    together = fit_models(cfg, jobs, root / "together", workers=2, progress=False)
    assert list(together) == ["a", "b"] and [together[n]["steps"] for n in together] == [4, 3]
    for name in jobs:
        one = torch.load(alone[name]["best"], weights_only=False)["model"]
        two = torch.load(together[name]["best"], weights_only=False)["model"]
        assert all(torch.equal(one[k], two[k]) for k in one), name


def test_learning_rate_schedule_and_budget_rules():
    from fedseg.config import load_profile
    from fedseg.train.training import (
        TrainSettings,
        budget_note,
        central_budget,
        learning_rate,
        validation_interval,
    )

    base = load_profile("laptop")["train"]
    train = TrainSettings.of({**base, "lr": 0.01, "schedule": "cosine", "warmup_steps": 0, "steps": 100,
                              "validations": None, "val_every": 7})
    assert learning_rate(train, 1, 100) == pytest.approx(0.01)
    assert learning_rate(train, 51, 100) == pytest.approx(0.005)  # half-way down the cosine
    assert learning_rate(train, 101, 100) == pytest.approx(0.0)  # past the horizon it stays at 0
    warm = train.replace(warmup_steps=10)
    assert [learning_rate(warm, s, 110) for s in (1, 5, 10, 11)] == pytest.approx([0.001, 0.005, 0.01, 0.01])
    assert learning_rate(warm, 61, 110) == pytest.approx(0.005)
    assert learning_rate(train.replace(schedule="constant"), 99, 100) == 0.01
    assert validation_interval(train, 100) == 7
    assert validation_interval(train.replace(validations=5), 900) == 180
    assert validation_interval(train.replace(validations=5), 3) == 1
    with pytest.raises(ValueError, match="both unset"):
        validation_interval(train.replace(val_every=None), 100)
    assert central_budget(train.replace(steps=900, central_steps=None), 4) == 3600
    assert central_budget({**base, "steps": 900, "central_steps": 500}, 4) == 500  # a profile's section also goes
    cfg = {**load_profile("laptop"), "seed": 0}
    cfg["train"] = {**cfg["train"], "lr": 0.01, "steps": 900, "cases_per_step": 2, "central_steps": None}
    cfg["preprocess"] = {**cfg["preprocess"], "patch_size": [32, 32, 32], "patches_per_volume": 2}
    note = budget_note(cfg, 4, {"rounds": 9, "local_steps": 100})
    assert "each SL model 900 steps" in note and "central model 3600 steps (the SL models together)" in note
    assert "9 rounds x 100 local steps = 900 (its SL model)" in note and "batches of 4 patches" in note
    assert "(its SL model)" not in budget_note(cfg, 4, {"rounds": 8, "local_steps": 25})


def test_the_localiser_trains_at_coarser_voxels_and_records_its_settings(setup):
    """Coarse-to-fine's first stage: the profile's network on voxels `factor` times larger (its own cache), its
    settings written beside it; 04 refuses it for another voxel size."""
    import json

    from fedseg.evaluate.external import load_localiser
    from fedseg.train.training import fit_localiser, localiser_config

    tmp_path, cfg, records = setup
    cfg = {**cfg, "localiser": {"factor": 2.0, "steps": 2}}
    coarse = localiser_config(cfg)
    assert coarse["preprocess"]["spacing"] == [2 * VOXEL] * 3 and coarse["train"]["steps"] == 2
    assert cfg["preprocess"]["spacing"] == [VOXEL] * 3  # the profile itself is left as it was
    result = fit_localiser(cfg, records[:2], records[2:], tmp_path / "run", progress=False)
    assert result["steps"] == 2 and result["best"].exists()
    record = json.loads((tmp_path / "run" / "checkpoints" / "localiser" / "localiser.json").read_text())
    assert record["factor"] == 2.0 and record["fine_spacing"] == [VOXEL] * 3 and record["model"] == cfg["model"]
    models, factor = load_localiser(tmp_path / "run", cfg, torch.device("cpu"))
    assert factor == 2.0 and set(models) == {"localiser"}
    other = {**cfg, "preprocess": {**cfg["preprocess"], "spacing": [VOXEL / 2] * 3}}
    with pytest.raises(ValueError, match="retrain it"):
        load_localiser(tmp_path / "run", other, torch.device("cpu"))
    assert load_localiser(tmp_path / "nothing", cfg, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="at least as large"):
        localiser_config({**cfg, "localiser": {"factor": 0.5}})


def test_a_checkpoint_is_never_resumed_under_other_settings(setup):
    """Issue: `-p loss masked_dice` on an existing run resumed the other loss's checkpoints and reported them as
    the new loss's; `-p steps 6` below the saved step crashed with a negative progress total. Every checkpoint
    now carries its training settings, and a resume under others is refused, naming each difference."""
    from fedseg.train.training import StaleCheckpointError

    tmp_path, cfg, records = setup
    out = tmp_path / "model"
    train_model(cfg, new_model(cfg), records[:2], records[2:], out, stop_after=4, progress=False)
    saved = torch.load(out / "last.pt", weights_only=False)
    assert saved["settings"]["loss"] == "masked_dice" and saved["settings"]["budget"] == 12
    assert torch.load(out / "best.pt", weights_only=False)["settings"] == saved["settings"]
    with pytest.raises(StaleCheckpointError, match=r"loss: 'masked_dice' -> 'dice_ce'.*--overwrite"):
        train_model(cfg, new_model(cfg), records[:2], records[2:], out, loss="dice_ce", progress=False)
    with pytest.raises(StaleCheckpointError, match=r"budget: 12 -> 6"):
        train_model(cfg, new_model(cfg), records[:2], records[2:], out, steps=6, progress=False)
    other = {**cfg, "train": {**cfg["train"], "lr": 0.5}}
    with pytest.raises(StaleCheckpointError, match=r"train.lr: 0.01 -> 0.5"):
        train_model(other, new_model(cfg), records[:2], records[2:], out, progress=False)
    with pytest.raises(StaleCheckpointError, match="train_cases"):
        train_model(cfg, new_model(cfg), records[:1], records[2:], out, progress=False)
    # what does not change the training may differ: a resume under it finishes the same model
    neutral = {**cfg, "train": {**cfg["train"], "checkpoint_every": 3}}
    done = train_model(neutral, new_model(cfg), records[:2], records[2:], out, progress=False)
    assert done["steps"] == 12 and done["finished"]
    del saved["settings"]
    torch.save(saved, out / "last.pt")
    with pytest.raises(StaleCheckpointError, match="records no training settings"):
        train_model(cfg, new_model(cfg), records[:2], records[2:], out, progress=False)


def write_phantom_record(root, version):
    """The data root's phantom.json as the generator writes it (version and parameters), without the cases."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "phantom.json").write_text(json.dumps({"generator": "fedseg.data.phantom", "version": version,
                                                   "parameters": {"seed": 0, "mri_like": []}}))


def test_a_checkpoint_of_another_phantom_version_is_neither_resumed_nor_loaded(setup):
    """Issue 27.2: the synthetic data folder's name does not change with the phantom's version and a new
    generator regenerates into the same folder, while checkpoints recorded only that name: a finished last.pt of
    phantom 1.0.0 passed the resume check on 2.0.0 data (0 steps run) and its best.pt answered for the new run."""
    from fedseg.evaluate.evaluation import load_best
    from fedseg.train.training import StaleCheckpointError

    tmp_path, cfg, records = setup
    root, out = Path(cfg["data_root"]), tmp_path / "model"
    write_phantom_record(root, "1.0.0")
    done = train_model(cfg, new_model(cfg), records[:2], records[2:], out, steps=4, progress=False)
    assert done["finished"]
    saved = torch.load(out / "best.pt", weights_only=False)
    assert saved["settings"]["data"] == {"root": "root", "generator": {"version": "1.0.0",
                                                                       "parameters": {"seed": 0, "mri_like": []}}}
    assert saved["code"]["fedseg"] and "commit" in saved["code"]  # the code version that trained it
    load_best(cfg, out / "best.pt", torch.device("cpu"))  # same data: it answers

    write_phantom_record(root, "2.0.0")  # the same folder, regenerated by a new generator
    with pytest.raises(StaleCheckpointError, match=r"data.generator: .*'1.0.0'.* -> .*'2.0.0'"):
        train_model(cfg, new_model(cfg), records[:2], records[2:], out, steps=4, progress=False)
    with pytest.raises(StaleCheckpointError, match=r"best.pt was trained on other data or preprocessing .*'2.0.0'"):
        load_best(cfg, out / "best.pt", torch.device("cpu"))
    other_voxel = {**cfg, "preprocess": {**cfg["preprocess"], "spacing": [3.0] * 3}}
    write_phantom_record(root, "1.0.0")
    with pytest.raises(StaleCheckpointError, match=r"spacing: \[2.0, 2.0, 2.0\] -> \[3.0, 3.0, 3.0\]"):
        load_best(other_voxel, out / "best.pt", torch.device("cpu"))
    del saved["settings"]
    torch.save(saved, out / "best.pt")
    with pytest.raises(StaleCheckpointError, match="records no training settings"):
        load_best(cfg, out / "best.pt", torch.device("cpu"))


def test_a_case_replaced_under_the_same_id_is_another_case(setup):
    """The case fingerprint a checkpoint carries holds the files' sizes (not their times, which a copy changes)."""
    from fedseg.train.training import case_fingerprint

    records = setup[2]
    stamped = [{**r, "files": f"{1000 + i}:{i}|{10 + i}:{i}"} for i, r in enumerate(records)]
    copied = [{**r, "files": f"{1000 + i}:999|{10 + i}:999"} for i, r in enumerate(records)]
    regenerated = [{**stamped[0], "files": "1234:0|10:0"}, *stamped[1:]]
    assert case_fingerprint(stamped) == case_fingerprint(copied) == case_fingerprint(stamped[::-1])
    assert case_fingerprint(regenerated) != case_fingerprint(stamped)
    assert case_fingerprint(stamped[:2]) != case_fingerprint(stamped)


def test_02s_models_spread_over_the_gpus_present_and_share_the_cpu_otherwise():
    from fedseg.config import load_profile
    from fedseg.train.training import model_workers

    laptop = {**load_profile("laptop"), "seed": 0}
    paper = {**laptop, "train": {**laptop["train"], "parallel_models": None}}
    assert laptop["train"]["parallel_models"] == 2
    assert model_workers(laptop, jobs=5, gpus=0) == (2, [None, None])  # the profile's CPU processes
    assert model_workers(paper, jobs=5, gpus=0) == (1, [None])
    assert model_workers(paper, jobs=5, gpus=1) == (1, ["cuda:0"])  # one GPU: one model at a time on it
    assert model_workers(paper, jobs=5, gpus=4) == (4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"])
    assert model_workers(paper, jobs=2, gpus=4) == (2, ["cuda:0", "cuda:1"])  # no idle process per spare GPU
    assert model_workers(laptop, jobs=5, gpus=4) == (2, ["cuda:0", "cuda:1"])  # parallel_models still decides


def test_cudnn_benchmarks_its_kernels_only_where_determinism_is_not_asked(setup):
    from fedseg.config import base_profile
    from fedseg.train.training import TrainSettings, configure_cudnn, seed_everything

    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        seed_everything(0)  # MONAI's set_determinism: benchmarking off for the whole process
        assert not torch.backends.cudnn.benchmark
        default = TrainSettings.of(base_profile()["train"])
        assert configure_cudnn(default.replace(deterministic=False)) and torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.deterministic
        # the default (the base profile's): deterministic
        assert not configure_cudnn(default) and torch.backends.cudnn.deterministic
        root, cfg, records = setup
        cfg["train"].update(steps=2, val_every=2, deterministic=False)
        train_model(cfg, build_network(**cfg["model"]), records[:2], records[2:], root / "fast", steps=2,
                    progress=False)
        assert torch.backends.cudnn.benchmark  # train_model applies the profile's choice after seeding
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


def test_a_validation_subset_is_the_first_cases_of_each_dataset_by_id_and_the_same_every_time():
    from fedseg.train.training import validation_subset

    records = [{"dataset": d, "case_id": f"{d}_{i}"}
               for d, n in (("spleen", 3), ("liver", 4)) for i in (2, 0, 1, 3)[:n]]
    subset = validation_subset(records, 2)
    assert [r["case_id"] for r in subset] == ["spleen_0", "spleen_1", "liver_0", "liver_1"]  # the list's order kept
    assert validation_subset(list(reversed(records)), 2) == list(reversed(subset))
    assert validation_subset(records, None) == records and validation_subset(records, 10) == records
