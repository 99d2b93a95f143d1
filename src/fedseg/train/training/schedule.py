"""The step budget and its schedule: the optimizer, the learning rate of each step, how often and on which cases a
model validates, the central model's budget and the note every Table 2 carries.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedseg.train.training.settings import TrainingSettings, TrainSettings


def make_optimizer(model: torch.nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    """Adam or AdamW from the profile's `train` section."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if train.optimizer not in kinds:
        raise ValueError(f"train.optimizer={train.optimizer!r}: use one of {', '.join(kinds)}.")
    return kinds[train.optimizer](model.parameters(), lr=train.lr, weight_decay=train.weight_decay)


def learning_rate(train: TrainSettings, step: int, horizon: int) -> float:
    """The learning rate of update `step` (1-based) of a schedule that spans `horizon` updates.

    `constant`, or `cosine`: annealed once from `lr` to 0 over the horizon, after `warmup_steps` linear
    warm-up steps. A pure function of the step, so a federation's clients anneal once over the whole
    federation (step = (round - 1) * local_steps + local step, horizon = rounds * local_steps) and a
    resumed or restarted optimizer gets the same rate as an uninterrupted one.
    """
    base, warmup = float(train.lr), int(train.warmup_steps or 0)
    if warmup and step <= warmup:
        return base * step / warmup
    if train.schedule != "cosine":
        return base
    span = max(1, horizon - warmup)
    progress = min(max(step - 1 - warmup, 0), span) / span
    return base * 0.5 * (1.0 + np.cos(np.pi * progress))


def validation_subset(records: Sequence[Mapping[str, Any]], cases: int | None) -> list[Mapping[str, Any]]:
    """The validation cases a model is scored on: all of them, or with the profile's `train.val_cases` = n the
    first n of each dataset by case id. The subset is the same at every validation, so the best checkpoint is
    still chosen on validation data, at the cost of n whole-volume inferences per dataset instead of the split.
    """
    if not cases:
        return list(records)
    chosen: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: (r["dataset"], r["case_id"])):
        ids = chosen.setdefault(record["dataset"], [])
        if len(ids) < int(cases):
            ids.append(record["case_id"])
    return [r for r in records if r["case_id"] in chosen[r["dataset"]]]


def validation_interval(train: TrainSettings, steps: int) -> int:
    """Steps between validations: `train.validations` spread evenly over `steps` when the profile gives a
    count (a model trained 4x longer then costs no more validation), else `train.val_every`."""
    if train.validations:
        return max(1, int(steps) // int(train.validations))
    if not train.val_every:
        raise ValueError("train.validations and train.val_every are both unset: give one (fedseg/profiles/base.yaml).")
    return int(train.val_every)


def central_budget(train: TrainSettings | Mapping[str, Any], n_sl_models: int) -> int:
    """Training steps of the central model: `train.central_steps`, or when unset (None) the SL models'
    steps together (`steps` x the number of SL models), so at the same batch size the central model
    sees as many training samples as all SL models together (the study's equal-budget rule)."""
    train = TrainSettings.of(train)
    given = train.central_steps
    return int(given) if given else int(train.steps) * int(n_sl_models)


def budget_note(cfg: TrainingSettings | Mapping[str, Any], n_sl_models: int,
                fl: Mapping[str, Any] | None = None) -> str:
    """The training budgets of a run (a resolved configuration or its `TrainingSettings`) in one sentence, written
    beside the tables that compare them; `fl`: the `federated` section."""
    settings = TrainingSettings.of(cfg)
    pre, train = settings.preprocess, settings.train
    batch = int(train.cases_per_step) * int(pre.patches_per_volume)
    steps, central = int(train.steps), central_budget(train, n_sl_models)
    text = (f"Training budgets (batches of {batch} patches of {'x'.join(map(str, pre.patch_size))} voxels): each SL "
            f"model {steps} steps; the central model {central} steps"
            f"{' (the SL models together)' if central == steps * n_sl_models else ''}")
    if fl:
        total = int(fl["rounds"]) * int(fl["local_steps"])
        text += (f"; each FL client {fl['rounds']} rounds x {fl['local_steps']} local steps = {total}"
                 f"{' (its SL model)' if total == steps else ''}")
    return text + ". Learning rate: one " + str(train.schedule) + " schedule over each budget."
