"""What a federation runs with: a run's configuration comes only from `context.run_config`, the kebab-case keys of
pyproject's `[tool.flwr.app.config]` (overridden by `flwr run --run-config`): `profile` (a name or a profile YAML),
`seed`, `data-root`, `run-dir`, the clients and the knobs of `run_config_knobs()`. `study_config` merges them with the
profile, the one place where that happens; a notebook's simulation (`simulation.run_federation`) builds the same
keys. A site's identity comes only from `context.node_config`: its own `dataset` (and optionally `data-root`,
`run-dir`) in deployment, else `partition-id` into `clients`. The method's own knobs and network come from the
method (`methods.get`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from fedseg.config import KNOBS, base_profile, override, resolve, run_config_key
from fedseg.federated import methods
from fedseg.federated.sites import client_list, parse_client
from fedseg.train.losses import check_loss

#: FL knobs of a profile's `federated:` section and their defaults: the base profile's (`fedseg/profiles/base.yaml`,
#: the one place they are written). `local_steps` None: `train.steps // rounds`, i.e. the SL model's budget spread
#: over the rounds. Each method's own knobs follow them (`methods.knob_defaults`).
FL_DEFAULTS: dict[str, Any] = base_profile()["federated"]
def knobs() -> dict[str, str]:
    """Every knob a run can be given one by one (`fedseg.config.KNOBS`) and every method's own (`federated.<name>`,
    `methods.knob_defaults`): name -> where the profile keeps it. A knob's notebook parameter is its name, its
    run_config key the name with "-" for "_" (`config.run_config_key`)."""
    return {**KNOBS, **{name: f"federated.{name}" for name in methods.knob_defaults()}}


def run_config_knobs() -> dict[str, tuple[str, str]]:
    """The run_config key of every knob (local-steps, mu, distill-weight, ...) -> (section, name) in the profile:
    spelled mechanically from `knobs()`."""
    return {run_config_key(name): tuple(path.split(".")) for name, path in knobs().items()}


def federated_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The FL knobs of `cfg["federated"]` with defaults filled in (see FL_DEFAULTS, and each method's knobs)."""
    given = dict(cfg.get("federated") or {})
    known = {**FL_DEFAULTS, **methods.knob_defaults()}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"federated.{unknown[0]} is not a setting: the federated settings are {', '.join(known)} "
                         "(fedseg/profiles/base.yaml, and each method's own knobs: docs/methods.md).")
    fl = {**known, **given}
    fl["rounds"] = int(fl["rounds"])
    if fl["local_steps"] is None:
        fl["local_steps"] = max(1, int(cfg["train"]["steps"]) // fl["rounds"])
    fl["local_steps"], fl["min_clients"] = int(fl["local_steps"]), int(fl["min_clients"])
    fl["keep_optimizer"] = as_bool(fl["keep_optimizer"], "federated.keep_optimizer")
    fl["method"] = methods.check_method(str(fl["method"]))
    for method in methods.REGISTRY.values():  # every method's knobs, typed by the method
        method.resolve_knobs(fl)
    fl["val_every"] = int(fl["val_every"])
    if fl["val_every"] < 1:
        raise ValueError(f"federated.val_every={fl['val_every']}: validate every k >= 1 rounds (1: every round).")
    if fl["rounds"] < 1 or fl["local_steps"] < 1 or not 0.0 < float(fl["fraction_train"]) <= 1.0:
        raise ValueError(f"federated settings {fl}: rounds and local_steps must be >= 1, fraction_train in (0, 1].")
    return fl


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (bool, int)):
        return bool(value)
    raise ValueError(f"{name}={value!r}: use true or false.")


def study_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved profile a run (server) or site (client, with its node_config) works from: the one function
    that merges run_config with a profile, in deployment and in simulation alike.

    `profile` (a name, or a profile YAML), `seed` (-1: the profile's) and `data-root` are resolved with
    `fedseg.config.resolve`; a node_config `data-root` / `run-dir` replaces the run's (each site's own paths).
    Set knobs (`run_config_knobs()`) override the profile's through `fedseg.config.override`, the function the
    notebooks' parameters go through too; `clients` / `shards` set min_clients unless given.

    Resolved once per federation: a process keeps each resolution, keyed by the run_config, the node_config and the
    profile file's content, and answers the next message with a copy of it. A profile file edited during a run is
    read again (its content is part of the key), so no message gets a resolution of settings that no longer hold.
    """
    node_config = dict(node_config or {})
    key = json.dumps([dict(run_config), node_config, _profile_fingerprint(run_config)], sort_keys=True, default=str)
    if key not in _RESOLVED:
        if len(_RESOLVED) >= 64:  # a long-lived process that ran many federations: keep the memory bounded
            _RESOLVED.clear()
        _RESOLVED[key] = _study_config(run_config, node_config)
    return copy.deepcopy(_RESOLVED[key])


#: This process's resolutions (`study_config`), by run_config, node_config and profile content.
_RESOLVED: dict[str, dict[str, Any]] = {}


def _profile_fingerprint(run_config: Mapping[str, Any]) -> str:
    """The content of the profile file a run_config names (hashed), or its packaged name."""
    name = str(run_config.get("profile") or "smoke")
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return name


def _study_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    seed = int(run_config.get("seed", -1))
    data_root = node_config.get("data-root") or run_config.get("data-root") or None
    cfg = resolve(str(run_config.get("profile") or "smoke"), None if seed < 0 else seed, data_root)
    run_dir = node_config.get("run-dir") or run_config.get("run-dir")
    if not run_dir:
        raise ValueError("No run folder: set run-dir (e.g. flwr run --run-config 'run-dir=\"/abs/results/fl\"').")
    cfg["run_dir"] = str(Path(run_dir).resolve())
    given = {name: run_config[run_config_key(name)] for name in knobs() if run_config_key(name) in run_config}
    if (run_config.get("clients") or run_config.get("shards")) and given.get("min_clients") in (None, ""):
        given["min_clients"] = len(client_list(run_config))
    cfg = override(cfg, given, knobs(), unset=(None, ""), source="run_config")
    check_loss(cfg["train"]["loss"])
    cfg["federated"] = federated_settings(cfg)
    cfg["model"] = methods.get(cfg["federated"]["method"]).network(
        cfg["model"], [parse_client(name)[0] for name in client_list(run_config)])
    return cfg


def run_config_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Knobs by their names (local_steps, loss, ...) as run_config keys (local-steps, loss, ...): the mechanical
    spelling (`config.run_config_key`); None (unset) is left out. Refuses a name that is not a knob, naming them."""
    names = knobs()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"Not a federation setting: {', '.join(unknown)}; use {', '.join(sorted(names))}.")
    return {run_config_key(name): value for name, value in values.items() if value is not None}
