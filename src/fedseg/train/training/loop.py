"""The loop: `train_model`, every model's training (SL, central, localiser, each FL client's local rounds), with the
`LocalHooks` a federated method changes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import code_version
from fedseg.data.transforms import (
    IMAGE,
    LABEL,
    evaluation_dataset,
)
from fedseg.train.losses import build_loss
from fedseg.train.models import load_weights, unique_state_dict
from fedseg.train.training.batches import PatchBatches
from fedseg.train.training.checkpoints import (
    check_resumable,
    save_atomic,
    save_checkpoint,
    training_settings,
)
from fedseg.train.training.runtime import (
    _is_out_of_memory,
    _memory_hint,
    autocast,
    configure_cudnn,
    seed_everything,
    select_device,
)
from fedseg.train.training.schedule import (
    learning_rate,
    make_optimizer,
    validation_interval,
    validation_subset,
)
from fedseg.train.training.settings import TrainingSettings
from fedseg.train.training.validation import channel_means, validate

#: A term added to the training loss: (model, logits, batch with the image on the device) -> scalar tensor.
ExtraLoss = Callable[[torch.nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LocalHooks:
    """What a federated method changes in one local training (`train_model`), and nothing else does; a method
    builds them each round (`fedseg.federated.methods`). The defaults train as SL does.

    - `extra_loss(model, logits, batch)`: added to the supervised loss every step (FedProx's proximal term,
      distillation from the global model); the logged loss includes it.
    - `volumes`: replace the cached training volumes (label completion trains on pseudo-labelled ones).
    - `block`: the block of a multi-block network the client trains and scores (SegViz's task block, the
      network's `task=` argument); checkpoints record it as their `task` setting.
    """
    extra_loss: ExtraLoss | None = None
    volumes: Sequence[dict[str, Any]] | None = None
    block: str | None = None


def train_model(cfg: TrainingSettings | Mapping[str, Any], model: torch.nn.Module, train_records: list[dict[str, Any]],
                val_records: list[dict[str, Any]], out_dir: str | Path, *, steps: int | None = None,
                loss: str | None = None, seed: int | None = None, resume: bool = True,
                stop_after: int | None = None, progress: bool = True, desc: str = "train",
                device: torch.device | None = None, hooks: LocalHooks | None = None, schedule_start: int | None = None,
                schedule_steps: int | None = None, val_every: int | None = None,
                validate_at_end: bool = True) -> dict[str, Any]:
    """Train `model` for `steps` local steps with validation, best-checkpoint tracking and resume, under `cfg`:
    a training's `TrainingSettings` (or a resolved configuration, read once through `TrainingSettings.of`).

    `hooks` (`LocalHooks`) are what a federated method changes: an extra loss term, other training volumes, the
    block of the network trained; None trains as SL does.
    The learning rate follows `learning_rate` over `schedule_steps` updates (default `steps`); the first
    update of this call is update `schedule_start + 1` of that schedule (default: the resumed step + 1),
    which is how an FL client anneals once over the whole federation instead of once per round.
    Validation runs every `val_every` steps (default: the profile's, `validation_interval`) and after the last
    unless `validate_at_end` is false (an FL round that is not validated).

    Writes `out_dir/last.pt` (everything needed to resume) every `train.checkpoint_every` steps and at the
    end, `out_dir/best.pt` (weights of the best validation mean Dice over owned channels) and
    `out_dir/history.csv` (per validation: step, mean loss since the last one, the learning rate of that
    step, Dice per channel, and the cumulative seconds spent training and validating). With `resume`, an existing
    `last.pt` is continued, but only if it was made under the same `training_settings`:
    otherwise `StaleCheckpointError` names the settings that differ and the fix. `stop_after` ends the call
    after that many steps of this call (as an interruption would), for tests and time-boxed runs.
    Returns a summary: steps done, best step and metric, seconds, the history table and the learning rate
    of each step of this call and their mean loss.
    """
    settings = TrainingSettings.of(cfg)
    train = settings.train
    hooks = hooks or LocalHooks()
    task, extra_loss = hooks.block, hooks.extra_loss
    steps = int(steps if steps is not None else train.steps)
    seed = int(settings.seed if seed is None else seed)
    val_records = validation_subset(val_records, train.val_cases)
    device = device or select_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = build_loss(loss or train.loss, **train.loss_options)
    recorded = training_settings(settings, loss=loss or train.loss, budget=int(schedule_steps or steps), seed=seed,
                                 task=task, train_records=train_records, val_records=val_records)
    model.to(device).train()
    optimizer = make_optimizer(model, train)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and train.amp)
    state = {"step": 0, "best_metric": -1.0, "best_step": 0, "history": [], "train_s": 0.0, "val_s": 0.0}
    last = out_dir / "last.pt"
    if resume and last.exists():
        saved = torch.load(last, map_location=device, weights_only=False)
        check_resumable(last, saved.get("settings"), recorded)
        load_weights(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
    else:
        seed_everything(seed)
    configure_cudnn(train)
    batches = PatchBatches(settings, train_records, seed, train.cases_per_step, hooks.volumes)
    val_volumes = evaluation_dataset(settings.data_config(), val_records)
    start, end = state["step"], steps if stop_after is None else min(steps, state["step"] + stop_after)
    schedule_steps = int(schedule_steps or steps)
    val_every = int(val_every or validation_interval(train, steps))
    schedule_offset = (start if schedule_start is None else int(schedule_start)) - start
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start, end)), batch_size=None,
        num_workers=settings.preprocess.num_workers, persistent_workers=False,
        pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU without a staging copy
    )
    began = tick = time.perf_counter()
    window: list[float] = []
    rates: list[float] = []  # the learning rate of each step of this call
    losses: list[float] = []  # and its loss
    bar = tqdm(loader, total=end - start, initial=0, desc=desc, disable=not progress, leave=False)
    try:
        for batch in bar:
            step = state["step"] + 1
            rate = learning_rate(train, step + schedule_offset, schedule_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            rates.append(rate)
            image, target = batch[IMAGE].to(device), batch[LABEL].to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, train):
                logits = model(image, task=task) if task else model(image)
            value = loss_fn(logits.float(), target, batch["owned"].to(device))
            if extra_loss is not None:
                value = value + extra_loss(model, logits.float(), {**batch, IMAGE: image})
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            state["step"] = step
            window.append(float(value.detach()))
            losses.append(window[-1])
            if step % val_every == 0 or (validate_at_end and step == steps):
                state["train_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                scores = validate(model, val_volumes, val_records, settings, device, task)
                means = channel_means(scores)
                metric = float(means.mean())
                state["val_s"] += time.perf_counter() - tick
                entry = {"step": step, "loss": float(np.mean(window)), "val_mean_dice": metric, "lr": rate,
                         "train_s": round(state["train_s"], 3), "val_s": round(state["val_s"], 3),
                         **{f"dice_{c}": v for c, v in means.items()}}
                state["history"].append(entry)
                window = []
                if metric > state["best_metric"]:
                    state.update(best_metric=metric, best_step=step)
                    save_checkpoint(unique_state_dict(model), out_dir / run_folder.BEST, step=step,
                                    val_mean_dice=metric, settings=recorded)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", dice=f"{metric:.3f}")
                tick = time.perf_counter()
            if step % train.checkpoint_every == 0 or step == end:
                state["train_s"] += time.perf_counter() - tick
                save_atomic({"model": unique_state_dict(model), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "state": state, "settings": recorded,
                             "code": code_version()}, last)
                tick = time.perf_counter()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if _is_out_of_memory(error):
            raise _memory_hint(settings, error) from error
        raise
    history = pd.DataFrame(state["history"])
    history.to_csv(out_dir / "history.csv", index=False)
    return {"steps": state["step"], "finished": state["step"] >= steps, "best_step": state["best_step"],
            "best_val_mean_dice": state["best_metric"], "seconds": round(time.perf_counter() - began, 2),
            "history": history, "learning_rates": rates, "mean_loss": float(np.mean(losses)) if losses else math.nan}
