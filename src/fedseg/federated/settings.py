"""What a federation runs with: a run's configuration comes only from `context.run_config`, the kebab-case keys of
pyproject's `[tool.flwr.app.config]` (overridden by `flwr run --run-config`): `profile` (a name or a profile YAML),
`seed`, `data-root`, `run-dir`, the clients and the knobs of `run_config_knobs()`. `study_config` merges them with the
profile, the one place where that happens; a notebook's simulation (`simulation.run_federation`) builds the same
keys. A site's identity comes only from `context.node_config`: its own `dataset` (and optionally `data-root`,
`run-dir`) in deployment, else `partition-id` into `clients`. The method's own knobs and network come from the
method (`methods.get`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedseg.config import resolve
from fedseg.federated import methods
from fedseg.federated.sites import client_list, parse_client
from fedseg.train.losses import check_loss

#: FL knobs of a profile's `federated:` section and their values when the profile has none.
#: `local_steps` None: `train.steps // rounds`, i.e. the SL model's budget spread over the rounds. Each method's
#: own knobs follow them (`methods.knob_defaults`).
FL_DEFAULTS: dict[str, Any] = {"rounds": 2, "local_steps": None, "fraction_train": 1.0, "min_clients": 4,
                               "client_cpus": 1, "client_gpus": 0.0, "cpu_clients": False, "keep_optimizer": False,
                               "client_workers": 0,
                               "round_timeout": 86400, "wait_timeout": 1800, "compare_loss": None,
                               "val_every": 1, "method": "fedavg"}
#: run_config keys (kebab-case) that override a setting of the profile: (section, name). Unset (absent, or "" as
#: pyproject's `[tool.flwr.app.config]` declares them) keeps the profile's; any other value is set, 0 included.
#: Each method's own knobs are added by `run_config_knobs`.
RUN_CONFIG_KNOBS: dict[str, tuple[str, str]] = {
    "rounds": ("federated", "rounds"), "local-steps": ("federated", "local_steps"),
    "fraction-train": ("federated", "fraction_train"), "min-clients": ("federated", "min_clients"),
    "keep-optimizer": ("federated", "keep_optimizer"), "method": ("federated", "method"),
    "wait-timeout": ("federated", "wait_timeout"), "loss": ("train", "loss"),
    "val-every": ("federated", "val_every"), "val-cases": ("train", "val_cases"),
}


def run_config_knobs() -> dict[str, tuple[str, str]]:
    """RUN_CONFIG_KNOBS and every method's own knobs (`methods.knob_defaults`: mu as `mu`, distill_weight as
    `distill-weight`, ...): the run_config spelling of a knob is its profile name with `-` for `_`."""
    return {**RUN_CONFIG_KNOBS, **{name.replace("_", "-"): ("federated", name) for name in methods.knob_defaults()}}


def federated_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The FL knobs of `cfg["federated"]` with defaults filled in (see FL_DEFAULTS, and each method's knobs)."""
    fl = {**FL_DEFAULTS, **methods.knob_defaults(), **(cfg.get("federated") or {})}
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
    Set knobs of `run_config_knobs()` override the profile's; `clients` / `shards` set min_clients unless given.
    """
    node_config = node_config or {}
    seed = int(run_config.get("seed", -1))
    data_root = node_config.get("data-root") or run_config.get("data-root") or None
    cfg = resolve(str(run_config.get("profile") or "smoke"), None if seed < 0 else seed, data_root)
    run_dir = node_config.get("run-dir") or run_config.get("run-dir")
    if not run_dir:
        raise ValueError("No run folder: set run-dir (e.g. flwr run --run-config 'run-dir=\"/abs/results/fl\"').")
    cfg["run_dir"] = str(Path(run_dir).resolve())
    cfg["federated"] = dict(cfg.get("federated") or {})
    if (run_config.get("clients") or run_config.get("shards")) and not run_config.get("min-clients"):
        cfg["federated"]["min_clients"] = len(client_list(run_config))
    for key, (section, name) in run_config_knobs().items():
        if run_config.get(key) not in (None, ""):  # unset: the profile's value
            cfg[section] = {**cfg[section], name: run_config[key]}
    check_loss(cfg["train"]["loss"])
    cfg["federated"] = federated_settings(cfg)
    cfg["model"] = methods.get(cfg["federated"]["method"]).network(
        cfg["model"], [parse_client(name)[0] for name in client_list(run_config)])
    return cfg


def run_config_keys(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Knobs by their profile names (local_steps, loss, ...) as run_config keys (local-steps, loss, ...); None
    (unset) is left out. Refuses a name that is not a knob, naming the knobs."""
    names = {name: key for key, (_, name) in run_config_knobs().items()}
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise ValueError(f"Not a federation setting: {', '.join(unknown)}; use {', '.join(sorted(names))}.")
    return {names[name]: value for name, value in knobs.items() if value is not None}
