"""The torch/MONAI side of a client (Flower examples' `task.py`): its cases, its local training (a thin wrapper around
`fedseg.train.training.train_model`), what a federation's checkpoints carry, and the federation's status.

What a run is configured with (run_config merged with the profile) is `settings.study_config`'s.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from fedseg import run_folder
from fedseg.data.datasets import manifest_for
from fedseg.data.labels import FOREGROUND, TRAIN_DATASETS
from fedseg.data.transforms import case_records
from fedseg.federated.section import FederatedSettings
from fedseg.federated.sites import parse_client
from fedseg.train.models import unique_state_dict
from fedseg.train.training import (
    LocalHooks,
    TrainingSettings,
    case_fingerprint,
    save_atomic,
    train_model,
    validation_subset,
    weight_settings,
)

#: The train message's config key that names the federation (`strategies.StudyFedAvg.federation_id`).
FEDERATION_KEY = "federation-id"
#: The query message's config key that asks a site for its cases' fingerprints, and the reply's record of them.
CASES_KEY = "cases"
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
                  train_records: list, val_records: list, hooks: LocalHooks | None = None) -> dict[str, Any]:
    """`local_steps` of `train_model` from the global weights in `model`, into `<run_dir>/fl/<client>/`.

    Without keep_optimizer every round starts a fresh optimizer (resume=False) on batches seeded by
    (seed, client, round). With it, the last round's optimizer state is resumed under the new global
    weights, and the step count (hence the batches) continues. Either way the learning rate is that of
    the federation-wide schedule: local step s of round r is update (r - 1) * local_steps + s of a
    schedule over rounds * local_steps updates, so it anneals once, not once per round. `hooks` are the method's
    (`methods.Method.hooks`). Returns train_model's summary plus the mean loss of this round's steps and the
    validation row of the final (sent) model.
    """
    fl = FederatedSettings.of(cfg)
    # A data-loading worker per client and round costs more than it hides in a short local round, and
    # multiplies the memory of every virtual client: clients load in-process unless the profile says.
    settings = TrainingSettings.of(cfg).replace(preprocess={"num_workers": fl.client_workers})
    out_dir = run_folder.client_dir(cfg["run_dir"], client)
    last = out_dir / "last.pt"
    start, resume = 0, False
    if fl.keep_optimizer and server_round > 1:
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
    seed = round_seed(settings.seed, client, 0 if fl.keep_optimizer else server_round)
    validated = fl.validated(server_round)
    summary = train_model(settings, model, train_records, val_records, out_dir, steps=start + fl.local_steps,
                          seed=seed, resume=resume, progress=False, desc=f"fl-{client}", hooks=hooks,
                          schedule_start=(server_round - 1) * fl.local_steps,
                          schedule_steps=fl.rounds * fl.local_steps,
                          # validated once a validated round, after its last local step (the FL local best is
                          # chosen among these); a validation inside the round would only cost time
                          val_every=fl.local_steps if validated else 2**31 - 1, validate_at_end=validated)
    if summary["steps"] != start + fl.local_steps:
        raise RuntimeError(f"Local training of {client} stopped at step {summary['steps']}, "
                           f"not {start + fl.local_steps}.")
    if fl.keep_optimizer:  # this round's end state, for the next round (and the rounds before it dropped)
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


def validated_round(fl: FederatedSettings | Mapping[str, Any], server_round: int) -> bool:
    """Whether round `server_round` validates the models: every `federated.val_every`-th round and the last
    (`FederatedSettings.validated`; `fl` may also be a federation's recorded `federated` settings, a dict).

    On a validated round each client scores its local model after training (its FL local best is chosen among
    these) and the global model on its validation cases (the FL global best); the other rounds only train.
    """
    if isinstance(fl, FederatedSettings):
        return fl.validated(server_round)
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
