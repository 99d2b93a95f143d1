"""The training stage's typed settings (`fedseg.train.training.settings`): the base profile's sections field by field,
refusals of what is not a setting, and a training that is the same whether given the settings or the configuration."""

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from helpers import make_records, new_model, training_config

import fedseg.train.training as training_package
from fedseg.config import base_profile, load_profile
from fedseg.train.training import (
    PreprocessSettings,
    TrainingSettings,
    TrainSettings,
    train_model,
    training_settings,
    weight_settings,
)


@pytest.mark.parametrize("section, kind", [("train", TrainSettings), ("preprocess", PreprocessSettings)])
def test_each_section_has_exactly_the_base_profiles_settings(section, kind):
    # a setting added to base.yaml without its field here (or the reverse) fails this test
    assert [f.name for f in dataclasses.fields(kind)] == list(base_profile()[section])


@pytest.mark.parametrize("profile", ["smoke", "laptop", "paper"])
def test_a_profiles_settings_read_back_exactly_as_the_profile_gives_them(profile):
    cfg = {**load_profile(profile), "data_root": "/somewhere/laptop-seed0-abc"}
    settings = TrainingSettings.of(cfg)
    assert settings.train.as_dict() == cfg["train"] and settings.preprocess.as_dict() == cfg["preprocess"]
    assert settings.seed == cfg["seed"] and dict(settings.model) == cfg["model"]
    assert weight_settings(settings) == weight_settings(cfg)  # what checkpoints record: the same either way
    assert TrainingSettings.of(settings) is settings
    assert pickle.loads(pickle.dumps(settings)) == settings  # fit_models sends it to worker processes
    changed = settings.replace(train={"steps": 5}, preprocess={"num_workers": 3})
    assert (changed.train.steps, changed.preprocess.num_workers, settings.train.steps) == (5, 3, cfg["train"]["steps"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.steps = 1


def test_a_section_with_a_missing_or_unknown_setting_is_refused_by_name():
    train = base_profile()["train"]
    with pytest.raises(ValueError, match=r"train settings without lr\b"):
        TrainSettings.of({k: v for k, v in train.items() if k != "lr"})
    with pytest.raises(ValueError, match="with learning_rate, which is not a setting"):
        TrainSettings.of({**train, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="without seed"):
        TrainingSettings.of({k: v for k, v in base_profile().items() if k != "seed"})


def test_a_training_given_its_settings_equals_one_given_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    records = make_records(tmp_path)
    cfg = training_config(tmp_path / "root", steps=4)
    cfg["train"]["val_every"] = 2
    runs = {}
    for name, given in (("cfg", cfg), ("settings", TrainingSettings.of(cfg))):
        model = new_model(cfg)
        runs[name] = train_model(given, model, records[:2], records[2:], tmp_path / name, progress=False)
        runs[name]["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        runs[name]["recorded"] = torch.load(tmp_path / name / "last.pt", weights_only=False)["settings"]
    a, b = runs["cfg"], runs["settings"]
    assert a["steps"] == b["steps"] == 4 and a["learning_rates"] == b["learning_rates"]
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["recorded"] == b["recorded"] == training_settings(
        cfg, loss=cfg["train"]["loss"], budget=4, seed=0, task=None, train_records=records[:2],
        val_records=records[2:])


def test_the_stage_reads_its_typed_settings_not_the_configuration():
    # in the loop, batches, validation, checkpoints, schedule and runtime no `cfg[...]` is read: each entry point
    # reads a configuration once through TrainingSettings.of. (fitting.localiser_config derives the localiser's
    # configuration, a configuration by design, and is left out.)
    folder = Path(training_package.__file__).parent
    for name in ("loop", "batches", "validation", "checkpoints", "schedule", "runtime"):
        tree = ast.parse((folder / f"{name}.py").read_text())
        reads = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Subscript)
                 and isinstance(node.value, ast.Name) and node.value.id in ("cfg", "train", "pre")]
        assert not reads, f"{name}.py reads the configuration by key on lines {reads}"


def test_a_runs_record_that_predates_newer_settings_reads_them_as_their_defaults():
    # run.json of a run made before preprocess.cache existed, and one that leaves unset settings out: a finished run
    # is still read for inference (`recorded`), while a training refuses the incomplete section (`of`)
    cfg = {**load_profile("laptop"), "data_root": "/data/laptop-seed0-abc"}
    old = {**cfg, "preprocess": {k: v for k, v in cfg["preprocess"].items() if k not in ("cache", "cache_dtype")},
           "train": {**{k: v for k, v in cfg["train"].items() if k != "val_every"}, "retired_setting": 1}}
    settings = TrainingSettings.recorded(old)
    assert settings.preprocess.cache == base_profile()["preprocess"]["cache"]
    assert settings.train.val_every is None and settings.preprocess.spacing == cfg["preprocess"]["spacing"]
    with pytest.raises(ValueError, match="retired_setting, which is not a setting"):
        TrainingSettings.of(old)
    with pytest.raises(ValueError, match="preprocess settings without cache, cache_dtype"):
        TrainingSettings.of({**old, "train": cfg["train"]})
    # an unset setting left out of a record is not missing: its default is null
    assert TrainSettings.of({k: v for k, v in cfg["train"].items() if k != "val_every"}).val_every is None
