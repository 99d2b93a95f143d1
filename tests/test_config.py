"""One configuration path (issue 28): the defaults in one file, the profiles as differences from it, every key
checked, one override function for notebook parameters, the command line and the Flower run config, and a
federation's settings resolved once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from fedseg import config
from fedseg.config import KNOBS, base_profile, load_profile, merge_profile, override, run_config_key
from fedseg.federated import settings
from fedseg.federated.simulation import federation_run_config
from fedseg.run.cli import _parse_param

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "src" / "fedseg" / "profiles"


def _leaves(profile, prefix=""):
    """Dotted key -> value of a profile's settings (sections opened, values kept whole)."""
    out = {}
    for key, value in profile.items():
        dotted = f"{prefix}{key}"
        if dotted in config.SECTIONS:
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def test_each_profile_lists_only_where_it_differs_from_the_base():
    base = _leaves(base_profile())
    for name in config.PROFILE_NAMES:
        given = _leaves(yaml.safe_load((PROFILES / f"{name}.yaml").read_text()))
        same = {key: value for key, value in given.items() if base.get(key) == value}
        assert not same, f"{name}.yaml repeats base.yaml's defaults: {same}"
        loaded = _leaves(load_profile(name))
        assert set(loaded) == set(base)  # every setting present after the merge
        assert all(loaded[key] == (given[key] if key in given else base[key]) for key in base)
    assert {**load_profile("laptop"), "name": "base"} == base_profile()  # the laptop profile is the defaults


def test_a_key_the_base_does_not_have_is_refused_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain:\n  stepz: 5\n")
    with pytest.raises(ValueError, match=r"mine.yaml: 'train.stepz' is not a setting.*steps"):
        load_profile(path)
    path.write_text("name: mine\npreprocess: [4, 4, 4]\n")
    with pytest.raises(ValueError, match="preprocess is a section of settings"):
        load_profile(path)
    path.write_text("name: mine\ntrain:\n  steps: '900'\n")  # the base is the typed schema
    with pytest.raises(ValueError, match=r"mine.yaml: train.steps='900': give a whole number, like the default 900"):
        load_profile(path)
    for wrong, says in (({"train": {"amp": 1}}, "true or false"), ({"federated": {"rounds": 2.5}}, "a whole number"),
                        ({"preprocess": {"spacing": 4}}, "a list")):
        with pytest.raises(ValueError, match=says):
            merge_profile(wrong)
    assert merge_profile({"train": {"lr": 1, "validations": None}})["train"]["lr"] == 1  # an int is a number; null
    path.write_text("name: mine\ntrain:\n  steps: 5\n")  # a partial profile: the rest are the base's
    assert load_profile(path)["train"]["steps"] == 5 and load_profile(path)["train"]["lr"] == base_profile()[
        "train"]["lr"]
    with pytest.raises(ValueError, match="federated.rouns is not a setting"):  # checked where the methods are known
        settings.federated_settings(merge_profile({"federated": {"rouns": 3}}))
    with pytest.raises(ValueError, match="notebook parameters: stepz is not a knob"):
        override(base_profile(), {"stepz": 3}, source="notebook parameters")


def test_one_knob_takes_one_path_from_a_parameter_the_command_line_and_the_run_config(tmp_path):
    """local_steps and pseudo_after (a method's knob), given as a notebook parameter, as `-p` on the command line
    (which papermill passes to the notebook) and as a Flower run-config key: the same settings come out."""
    assert _parse_param("local_steps=7") == ("local_steps", 7)  # the command line: a notebook parameter
    names = settings.knobs()
    assert set(KNOBS) <= set(names) and names["pseudo_after"] == "federated.pseudo_after"
    assert {run_config_key(n) for n in names} == set(settings.run_config_knobs())  # spelled mechanically
    given = {"local_steps": 7, "pseudo_after": 0, "method": "pseudo", "rounds": 3}
    by_parameter = override(config.resolve("smoke"), given, names)
    run_config = federation_run_config("smoke", tmp_path / "run", clients=("liver", "spleen"), **given)
    assert {k: run_config[k] for k in ("local-steps", "pseudo-after", "method", "rounds")} == {
        "local-steps": 7, "pseudo-after": 0, "method": "pseudo", "rounds": 3}
    by_run_config = settings.study_config(run_config)
    for name in given:
        section, key = names[name].split(".")
        assert by_parameter[section][key] == by_run_config[section][key] == given[name]
    # unset: None (a parameter) or "" (pyproject's declared default) keeps the profile's; 0 and False are values
    unset = settings.study_config({**run_config, "local-steps": "", "keep-optimizer": False})
    assert unset["federated"]["local_steps"] == load_profile("smoke")["federated"]["local_steps"]
    assert override(base_profile(), {"steps": None, "rounds": 0})["federated"]["rounds"] == 0


def test_a_federation_resolves_its_settings_once_and_never_from_a_stale_profile(tmp_path, monkeypatch):
    profile = tmp_path / "mine.yaml"
    profile.write_text("name: mine\nfederated:\n  rounds: 3\n")
    run_config = {"profile": str(profile), "run-dir": str(tmp_path / "run"), "clients": "liver,spleen"}
    calls = []
    real = settings._study_config
    monkeypatch.setattr(settings, "_study_config", lambda *a: calls.append(a) or real(*a))
    first = settings.study_config(run_config)
    first["federated"]["rounds"] = 99  # a caller changing its copy changes nobody else's
    again = [settings.study_config(run_config) for _ in range(5)]  # five more messages of the same federation
    assert len(calls) == 1 and all(cfg["federated"]["rounds"] == 3 for cfg in again)
    profile.write_text("name: mine\nfederated:\n  rounds: 4\n")  # the file edited: read again, not answered stale
    assert settings.study_config(run_config)["federated"]["rounds"] == 4 and len(calls) == 2


def test_no_default_is_written_in_code_beside_the_base_profile():
    """The FL defaults and the localiser's are the base profile's, and no stage reads a setting with a default of
    its own (`.get("amp", True)`): what a run gets when a profile says nothing is written once, in base.yaml. (The
    readers of a finished run's record, `reporting.readme` and `predict`, may meet records older than a setting.)"""
    from fedseg.train.training import LOCALISER

    assert settings.FL_DEFAULTS == base_profile()["federated"] and LOCALISER == base_profile()["localiser"]
    sections = "|".join(s.split(".")[-1] for s in config.SECTIONS) + "|train|pre|fl"
    stages = [str(ROOT / "src" / "fedseg" / part) for part in ("data", "train", "federated", "evaluate", "experiments")]
    found = subprocess.run(["grep", "-rnE", rf"(\[\"({sections})\"\]|\b({sections}))\.get\(\"[a-z_]+\", ", *stages],
                           capture_output=True, text=True).stdout
    assert found == "", found


def test_the_federation_stages_read_a_typed_section_not_the_whole_configuration():
    """The ServerApp, a client's local round and the simulation take `FederatedSettings` (typed, read-only); its
    fields are the base profile's `federated:` settings, and a method's own knobs sit under `knobs`."""
    import dataclasses

    from fedseg.federated.section import FederatedSettings

    cfg = config.resolve("smoke")
    cfg["federated"] = settings.federated_settings({**cfg, "federated": {**cfg["federated"], "rounds": "3"}})
    fl = FederatedSettings.of(cfg)
    fields = {f.name for f in dataclasses.fields(FederatedSettings)} - {"knobs"}
    assert fields == set(base_profile()["federated"])
    assert fl.rounds == 3 and isinstance(fl.fraction_train, float) and fl.compare_loss == "literal_dice_ce"
    assert dict(fl.knobs) == {"mu": 0.01, "distill_weight": 1.0, "pseudo_after": 1}
    assert [r for r in range(1, 4) if fl.validated(r)] == [1, 2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fl.rounds = 4
    with pytest.raises(TypeError):
        fl.knobs["mu"] = 1.0
    with pytest.raises(ValueError, match="resolve the profile first"):
        FederatedSettings.of({"federated": {"rounds": 3}})
    source = {name: (ROOT / "src" / "fedseg" / "federated" / name).read_text()
              for name in ("server_app.py", "task.py", "simulation.py")}
    assert all("FederatedSettings.of(cfg)" in text for text in source.values())
    assert not any('fl["' in text.split("def validated_round")[0] for text in source.values())
