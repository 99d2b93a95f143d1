"""What a federated run works from, and the torch/MONAI side of a client (Flower examples' `task.py`).

A run's configuration comes only from `context.run_config`, the kebab-case keys of pyproject's
`[tool.flwr.app.config]` (overridden by `flwr run --run-config`): `profile` (a name or a profile YAML), `seed`,
`data-root`, `run-dir`, the clients and the knobs of RUN_CONFIG_KNOBS. `study_config` merges them with the
profile, the one place where that happens; a notebook's simulation (`simulation.run_federation`) builds the same
keys. A site's identity comes only from `context.node_config`: its own `dataset` (and optionally `data-root`,
`run-dir`) in deployment, else `partition-id` into `clients`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from fedseg import run_folder
from fedseg.config import resolve
from fedseg.data.datasets import manifest_for
from fedseg.data.labels import CHANNELS, TRAIN_DATASETS
from fedseg.data.transforms import case_records
from fedseg.federated.methods import METHOD_DEFAULTS, check_method, network_config
from fedseg.federated.sites import client_list, parse_client
from fedseg.train.losses import check_loss
from fedseg.train.models import unique_state_dict
from fedseg.train.training import (
    case_fingerprint,
    save_atomic,
    train_model,
    validation_subset,
    weight_settings,
)

FOREGROUND = CHANNELS[1:]
#: The train message's config key that names the federation (`strategies.StudyFedAvg.federation_id`).
FEDERATION_KEY = "federation-id"
#: The query message's config key that asks a site for its cases' fingerprints, and the reply's record of them.
CASES_KEY = "cases"
#: FL knobs of a profile's `federated:` section and their values when the profile has none.
#: `local_steps` None: `train.steps // rounds`, i.e. the SL model's budget spread over the rounds.
FL_DEFAULTS: dict[str, Any] = {"rounds": 2, "local_steps": None, "fraction_train": 1.0, "min_clients": 4,
                               "client_cpus": 1, "client_gpus": 0.0, "cpu_clients": False, "keep_optimizer": False,
                               "client_workers": 0,
                               "round_timeout": 86400, "wait_timeout": 1800, "compare_loss": None,
                               "val_every": 1,
                               **METHOD_DEFAULTS}
#: run_config keys (kebab-case) that override a setting of the profile: (section, name). Their "unset" value
#: (0, 0.0, "") keeps the profile's.
RUN_CONFIG_KNOBS: dict[str, tuple[str, str]] = {
    "rounds": ("federated", "rounds"), "local-steps": ("federated", "local_steps"),
    "fraction-train": ("federated", "fraction_train"), "min-clients": ("federated", "min_clients"),
    "keep-optimizer": ("federated", "keep_optimizer"), "method": ("federated", "method"), "mu": ("federated", "mu"),
    "distill-weight": ("federated", "distill_weight"), "pseudo-after": ("federated", "pseudo_after"),
    "wait-timeout": ("federated", "wait_timeout"), "loss": ("train", "loss"),
    "val-every": ("federated", "val_every"), "val-cases": ("train", "val_cases"),
}


def federated_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The FL knobs of `cfg["federated"]` with defaults filled in (see FL_DEFAULTS)."""
    fl = {**FL_DEFAULTS, **(cfg.get("federated") or {})}
    fl["rounds"] = int(fl["rounds"])
    if fl["local_steps"] is None:
        fl["local_steps"] = max(1, int(cfg["train"]["steps"]) // fl["rounds"])
    fl["local_steps"], fl["min_clients"] = int(fl["local_steps"]), int(fl["min_clients"])
    fl["keep_optimizer"] = as_bool(fl["keep_optimizer"], "federated.keep_optimizer")
    fl["method"], fl["mu"] = check_method(str(fl["method"])), float(fl["mu"])
    fl["distill_weight"], fl["pseudo_after"] = float(fl["distill_weight"]), fl["pseudo_after"]
    if fl["pseudo_after"] is None:
        fl["pseudo_after"] = fl["rounds"] // 2
    fl["pseudo_after"] = int(fl["pseudo_after"])
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
    Set knobs of RUN_CONFIG_KNOBS override the profile's; `clients` / `shards` set min_clients unless given.
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
    for key, (section, name) in RUN_CONFIG_KNOBS.items():
        if run_config.get(key) not in (None, "", 0, 0.0):
            cfg[section] = {**cfg[section], name: run_config[key]}
    check_loss(cfg["train"]["loss"])
    cfg["federated"] = federated_settings(cfg)
    cfg["model"] = network_config(cfg, [parse_client(name)[0] for name in client_list(run_config)])
    return cfg


def run_config_keys(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Knobs by their profile names (local_steps, loss, ...) as run_config keys (local-steps, loss, ...); None
    (unset) is left out. Refuses a name that is not a knob, naming the knobs."""
    names = {name: key for key, (_, name) in RUN_CONFIG_KNOBS.items()}
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise ValueError(f"Not a federation setting: {', '.join(unknown)}; use {', '.join(sorted(names))}.")
    return {names[name]: value for name, value in knobs.items() if value is not None}


def load_cases(cfg: Mapping[str, Any], run_config: Mapping[str, Any]) -> pd.DataFrame:
    """The cases table: run_config `cases`, else `<run_dir>/data/cases.csv` (01_data_prep), else the manifest."""
    for path in (run_config.get("cases"), run_folder.cases_file(cfg["run_dir"])):
        if path and Path(path).exists():
            return pd.read_csv(path)
    return manifest_for(cfg["data_root"])


def client_records(cfg: Mapping[str, Any], cases: pd.DataFrame, client: str) -> tuple[list, list]:
    """(train, val) MONAI records of one client: a client sees only its own cases.

    A shard `<dataset>-<k>of<n>` trains on every n-th training case of its dataset (sorted by case id,
    starting at the k-th) and validates on the dataset's whole validation split, or on its first
    `train.val_cases` cases by case id when the profile sets that (`training.validation_subset`).
    """
    dataset, shard, shards = parse_client(client)
    own = cases[cases["dataset"] == dataset].sort_values("case_id")
    train_cases = own[own["split"] == "train"]
    if shards > len(train_cases):
        raise ValueError(f"Client {client!r}: {dataset} has {len(train_cases)} training cases, too few for "
                         f"{shards} shards; use at most {len(train_cases)} shards for it (run_config shards).")
    train = case_records(cfg["data_root"], train_cases.iloc[shard::shards])
    val = validation_subset(case_records(cfg["data_root"], own[own["split"] == "val"]), cfg["train"].get("val_cases"))
    if not train or not val:
        raise ValueError(f"Client {client!r} has {len(train)} train and {len(val)} val cases in the cases table: "
                         "each client needs both (check data/cases.csv from 01_data_prep).")
    return train, val


def site_cases(train_records: list, val_records: list) -> dict[str, str]:
    """The fingerprints (`training.case_fingerprint`: count and hash of case ids and file sizes) of the training
    and validation cases a site trains on (`client_records`): what a federation's resumable state is stamped with,
    so a federation never continues on other cases than it started with."""
    return {"train": case_fingerprint(train_records), "val": case_fingerprint(val_records)}


def round_seed(seed: int, client: str, server_round: int = 0) -> int:
    """A seed per (study seed, client, round): each round draws new batches, yet reruns are identical, in
    simulation and deployment alike (seeded by the client's dataset and shard, not by a partition id that
    differs between them)."""
    dataset, shard, shards = parse_client(client)
    key = [seed, TRAIN_DATASETS.index(dataset), server_round] + ([shard, shards] if shards > 1 else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0] % 2**31)


def train_locally(cfg: dict[str, Any], model: torch.nn.Module, client: str, server_round: int,
                  train_records: list, val_records: list, task: str | None = None,
                  extra_loss: Any = None, volumes: Any = None) -> dict[str, Any]:
    """`local_steps` of `train_model` from the global weights in `model`, into `<run_dir>/fl/<client>/`.

    Without keep_optimizer every round starts a fresh optimizer (resume=False) on batches seeded by
    (seed, client, round). With it, the last round's optimizer state is resumed under the new global
    weights, and the step count (hence the batches) continues. Either way the learning rate is that of
    the federation-wide schedule: local step s of round r is update (r - 1) * local_steps + s of a
    schedule over rounds * local_steps updates, so it anneals once, not once per round. Returns train_model's summary
    plus the mean loss of this round's steps and the validation row of the final (sent) model.
    """
    fl = cfg["federated"]
    # A data-loading worker per client and round costs more than it hides in a short local round, and
    # multiplies the memory of every virtual client: clients load in-process unless the profile says.
    cfg = {**cfg, "preprocess": {**cfg["preprocess"], "num_workers": int(fl["client_workers"])}}
    out_dir = run_folder.client_dir(cfg["run_dir"], client)
    last = out_dir / "last.pt"
    start, resume = 0, False
    if fl["keep_optimizer"] and server_round > 1:
        # the state the previous round ended with, not last.pt: after a cut in the middle of a round, a client that
        # finished the cut round holds that round's state in last.pt, and the rerun round must not start from it
        kept = round_state_path(out_dir, server_round - 1)
        if not kept.exists():
            raise FileNotFoundError(f"{kept} is missing: with federated.keep_optimizer a client continues the "
                                    f"optimizer state of round {server_round - 1}, which this site did not keep. "
                                    "Start the federation afresh (overwrite) or set keep_optimizer: false.")
        saved = torch.load(kept, map_location="cpu", weights_only=False)
        saved["model"] = state_dict_cpu(model)
        save_atomic(saved, last)
        start, resume = int(saved["state"]["step"]), True
    seed = round_seed(cfg["seed"], client, 0 if fl["keep_optimizer"] else server_round)
    validated = validated_round(fl, server_round)
    summary = train_model(cfg, model, train_records, val_records, out_dir, steps=start + fl["local_steps"],
                          seed=seed, resume=resume, progress=False, desc=f"fl-{client}", task=task,
                          extra_loss=extra_loss, volumes=volumes,
                          schedule_start=(server_round - 1) * fl["local_steps"],
                          schedule_steps=fl["rounds"] * fl["local_steps"],
                          # validated once a validated round, after its last local step (the FL local best is
                          # chosen among these); a validation inside the round would only cost time
                          val_every=fl["local_steps"] if validated else 2**31 - 1, validate_at_end=validated)
    if summary["steps"] != start + fl["local_steps"]:
        raise RuntimeError(f"Local training of {client} stopped at step {summary['steps']}, "
                           f"not {start + fl['local_steps']}.")
    if fl["keep_optimizer"]:  # this round's end state, for the next round (and the rounds before it dropped)
        kept = round_state_path(out_dir, server_round)
        shutil.copyfile(last, kept.with_suffix(".pt.tmp"))
        os.replace(kept.with_suffix(".pt.tmp"), kept)  # whole or absent, never half-copied
        for old in out_dir.glob("round-*.pt"):
            if old != round_state_path(out_dir, server_round) and old != round_state_path(out_dir, server_round - 1):
                old.unlink(missing_ok=True)
    if not validated:  # a round between validations: no scores, the loss of its steps
        final = pd.Series({"step": summary["steps"], "val_mean_dice": math.nan,
                           **{f"dice_{c}": math.nan for c in FOREGROUND}})
        return {**summary, "train_loss": summary["mean_loss"], "final": final}
    history = summary["history"]
    this_round = history[history["step"] > start]
    spans = np.diff(np.concatenate([[start], this_round["step"].to_numpy()]))
    return {**summary, "train_loss": float(np.average(this_round["loss"], weights=spans)), "final": history.iloc[-1]}


def round_state_path(client_dir: Path, server_round: int) -> Path:
    """`fl/<client>/round-<r>.pt`: a client's training state (weights, optimizer, step) at the end of round r,
    kept with `federated.keep_optimizer` so round r + 1 continues exactly it, even when rerun after a cut."""
    return Path(client_dir) / f"round-{int(server_round):04d}.pt"


def validated_round(fl: Mapping[str, Any], server_round: int) -> bool:
    """Whether round `server_round` validates the models: every `federated.val_every`-th round and the last.

    On a validated round each client scores its local model after training (its FL local best is chosen among
    these) and the global model on its validation cases (the FL global best); the other rounds only train.
    """
    return server_round % int(fl["val_every"]) == 0 or server_round == int(fl["rounds"])


def channel_dice(means: Mapping[str, float], prefix: str = "dice-") -> dict[str, float]:
    """Dice of every foreground channel by name, NaN where this client has none (not owned / absent)."""
    return {f"{prefix}{c}": float(means.get(c, math.nan)) for c in FOREGROUND}


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a message or checkpoint carries: each tensor once (`models.unique_state_dict`), on the CPU."""
    return {k: v.cpu() for k, v in unique_state_dict(model).items()}


#: Federated knobs that change neither the weights nor the chosen bests (resources, time-outs).
NEUTRAL_FL_KEYS = ("client_cpus", "client_gpus", "cpu_clients", "client_workers", "round_timeout", "wait_timeout",
                   "compare_loss")


def federation_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What every checkpoint of a federation carries (its FL global and local bests, the final model): the
    settings that change the weights (`training.weight_settings`), the loss, the seed and the federation's
    knobs; the clients' cases are in `fl/cases.csv` beside them."""
    return {**weight_settings(cfg), "loss": cfg["train"]["loss"], "seed": int(cfg["seed"]),
            "federated": {k: v for k, v in cfg["federated"].items() if k not in NEUTRAL_FL_KEYS}}


def status_path(run_dir: str | Path) -> Path:
    return run_folder.fl_status(run_dir)


def write_status(run_dir: str | Path, status: str, reason: str = "") -> None:
    """`<run_dir>/fl/status.json`: running, finished or failed (with the reason), written atomically."""
    path = status_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "reason": reason[:4000],
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_status(run_dir: str | Path) -> str | None:
    """The federation's status in `run_dir` (running, finished, failed), None when it has none."""
    path = status_path(run_dir)
    return json.loads(path.read_text()).get("status") if path.exists() else None


def refuse_finished(run_dir: str | Path, overwrite: bool) -> None:
    """A finished federation is never replaced silently (by `flwr run` or a notebook): refuse it unless asked."""
    if read_status(run_dir) == "finished" and not overwrite:
        raise FileExistsError(f"{Path(run_dir)} holds a finished federation ({status_path(run_dir)}): choose another "
                              "run folder, or replace it with --run-config 'overwrite=true' (flwr run), "
                              "overwrite=True (notebook 03, run_federation) or --overwrite (fedseg run).")


def require_finished(run_dir: str | Path) -> None:
    """Refuse to evaluate a federation that did not finish: its folder holds the rounds and bests it reached,
    which look like a finished run's. A folder without a status (made before it was written) passes."""
    path = status_path(run_dir)
    if not path.exists():
        return
    record = json.loads(path.read_text())
    if record.get("status") != "finished":
        why = f": {record['reason']}" if record.get("reason") else ""
        raise RuntimeError(f"The federation in {Path(run_dir)} is {record.get('status')} ({path}){why}. Its "
                           "checkpoints are those of an unfinished run: rerun 03 into this folder (--only 03) "
                           "before evaluating it.")


def local_best_path(run_dir: str | Path, client: str) -> Path:
    return run_folder.checkpoint(run_dir, f"fl-local-{client}")


def saved_metric(path: Path, federation: str | None = None) -> float:
    """The `val_mean_dice` of a checkpoint on disk; -inf when there is none, or when `federation` is given and the
    checkpoint was written by another federation (its `federation_id`)."""
    if not path.exists():
        return -math.inf
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if federation is not None and saved.get("federation_id") != federation:
        return -math.inf
    return float(saved.get("val_mean_dice", -math.inf))
