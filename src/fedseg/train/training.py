"""The one training loop of the study: standalone (SL), central aggregation and every FL client call it.

Iteration-based (a number of local steps, not epochs). The batch of step s depends only on (seed, s),
so a run resumed from its last checkpoint draws exactly the batches an uninterrupted run would have and
ends with the same weights. Validation runs sliding-window inference on whole preprocessed volumes,
thresholds sigmoid outputs at 0.5 and scores Dice per channel the validation case's dataset owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from monai.data import PersistentDataset
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.utils import set_determinism
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import code_version
from fedseg.data import phantom
from fedseg.data.labels import CHANNELS
from fedseg.data.patches import patch_starts
from fedseg.data.transforms import (
    IMAGE,
    LABEL,
    augment,
    evaluation_dataset,
    patch_augment,
    patch_cache,
    sampling_indices,
    stored_case,
)
from fedseg.train.losses import build_loss
from fedseg.train.models import build_network, load_weights, unique_state_dict

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


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or as asked), else CPU; never a hard-coded `cuda:0`."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (MONAI's helper) so a run can be repeated."""
    set_determinism(seed=seed)


def configure_cudnn(train: Mapping[str, Any]) -> bool:
    """cuDNN's kernel choice for the profile's `train.deterministic` (default true); returns whether cuDNN
    benchmarks its convolution kernels.

    MONAI's `set_determinism` (called by `seed_everything`) turns benchmarking off for the whole process.
    `deterministic: false` (the paper profile) turns it back on: cuDNN times its kernels for each shape once and
    keeps the fastest, and a GPU run's numbers then vary in their last bits from run to run. No effect on a CPU.
    """
    fast = not bool(train.get("deterministic", True))
    torch.backends.cudnn.benchmark = fast
    torch.backends.cudnn.deterministic = not fast
    return fast


class PatchBatches(torch.utils.data.Dataset):
    """Item s is the training batch of step s: cases and patch positions drawn from (seed, s) alone.

    Reads whole preprocessed volumes from the cache and applies the random part of the pipeline
    (patches, intensity shift) with a generator seeded per step, so resuming at step s is exact.
    """
    def __init__(self, cfg: dict[str, Any], records: list[dict[str, Any]], seed: int, cases_per_step: int,
                 volumes: Sequence[dict[str, Any]] | None = None):
        if not records:
            raise ValueError("No training cases: check the manifest's train split for this client.")
        # `volumes`: preprocessed cases to draw from instead of the cache (e.g. with completed pseudo-labels)
        self.seed, self.cases_per_step = seed, cases_per_step
        pre = cfg["preprocess"]
        # the patch cache (`preprocess.cache: patches`): patches sliced from memory-mapped cases, not cut from
        # whole volumes read every step
        self.stored = [stored_case(cfg, r) for r in records] if volumes is None and patch_cache(cfg) else None
        self.patch, self.count, self.sampling = pre["patch_size"], pre["patches_per_volume"], pre["patch_sampling"]
        self.owned = [np.asarray(r["owned"]) for r in records]
        self.tail = patch_augment(cfg)
        self.volumes = self.stored if self.stored is not None else (
            evaluation_dataset(cfg, records) if volumes is None else volumes)
        self.augment = augment(cfg)
        # `preprocess.in_memory`: each volume is read from the cache once and kept, with the positions of
        # its foreground and background voxels that the patch sampler would otherwise search every step
        self.in_memory = bool(cfg["preprocess"].get("in_memory", False))
        self.indexer = sampling_indices(cfg)
        self.memory: dict[int, dict[str, Any]] = {}

    def volume(self, index: int) -> dict[str, Any]:
        if not self.in_memory:
            return self.volumes[index]
        if index not in self.memory:
            self.memory[index] = self.indexer(dict(self.volumes[index]))
        return self.memory[index]

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.volumes), size=self.cases_per_step, replace=len(self.volumes) < self.cases_per_step)
        patches = []
        for index in picks:
            seed = int(rng.integers(2**31 - 1))
            if self.stored is not None:
                patches.extend(self._stored_patches(int(index), seed))
                continue
            self.augment.set_random_state(seed=seed)
            patches.extend(self.augment(self.volume(int(index))))
        return {
            IMAGE: torch.stack([torch.as_tensor(p[IMAGE]) for p in patches]),
            LABEL: torch.stack([torch.as_tensor(p[LABEL]) for p in patches]),
            "owned": torch.stack([torch.as_tensor(np.asarray(p["owned"])) for p in patches]).bool(),
        }

    def _stored_patches(self, index: int, seed: int) -> list[dict[str, Any]]:
        """`patches_per_volume` patches of stored case `index`, read by slicing, then `patch_augment`."""
        case, rng = self.stored[index], np.random.default_rng(seed)
        self.tail.set_random_state(seed=seed)
        out = []
        for start in patch_starts(case, self.patch, self.count, self.sampling, rng):
            image, label = case.crop(start, self.patch)
            out.append(self.tail({IMAGE: torch.from_numpy(image), LABEL: torch.from_numpy(label),
                                  "owned": self.owned[index]}))
        return out


def make_optimizer(model: torch.nn.Module, train: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam or AdamW from the profile's `train` section."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if train["optimizer"] not in kinds:
        raise ValueError(f"train.optimizer={train['optimizer']!r}: use one of {', '.join(kinds)}.")
    return kinds[train["optimizer"]](model.parameters(), lr=train["lr"], weight_decay=train.get("weight_decay", 0.0))


def learning_rate(train: dict[str, Any], step: int, horizon: int) -> float:
    """The learning rate of update `step` (1-based) of a schedule that spans `horizon` updates.

    `constant`, or `cosine`: annealed once from `lr` to 0 over the horizon, after `warmup_steps` linear
    warm-up steps. A pure function of the step, so a federation's clients anneal once over the whole
    federation (step = (round - 1) * local_steps + local step, horizon = rounds * local_steps) and a
    resumed or restarted optimizer gets the same rate as an uninterrupted one.
    """
    base, warmup = float(train["lr"]), int(train.get("warmup_steps", 0) or 0)
    if warmup and step <= warmup:
        return base * step / warmup
    if train.get("schedule", "constant") != "cosine":
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


def validation_interval(train: dict[str, Any], steps: int) -> int:
    """Steps between validations: `train.validations` spread evenly over `steps` when the profile gives a
    count (a model trained 4x longer then costs no more validation), else `train.val_every`."""
    if train.get("validations"):
        return max(1, int(steps) // int(train["validations"]))
    return int(train["val_every"])


def central_budget(train: dict[str, Any], n_sl_models: int) -> int:
    """Training steps of the central model: `train.central_steps`, or when unset (None) the SL models'
    steps together (`steps` x the number of SL models), so at the same batch size the central model
    sees as many training samples as all SL models together (the study's equal-budget rule)."""
    given = train.get("central_steps")
    return int(given) if given else int(train["steps"]) * int(n_sl_models)


def budget_note(cfg: dict[str, Any], n_sl_models: int, fl: dict[str, Any] | None = None) -> str:
    """The training budgets of a run in one sentence, written beside the tables that compare them."""
    pre, train = cfg["preprocess"], cfg["train"]
    batch = int(train["cases_per_step"]) * int(pre["patches_per_volume"])
    steps, central = int(train["steps"]), central_budget(train, n_sl_models)
    text = (f"Training budgets (batches of {batch} patches of {'x'.join(map(str, pre['patch_size']))} voxels): each SL "
            f"model {steps} steps; the central model {central} steps"
            f"{' (the SL models together)' if central == steps * n_sl_models else ''}")
    if fl:
        total = int(fl["rounds"]) * int(fl["local_steps"])
        text += (f"; each FL client {fl['rounds']} rounds x {fl['local_steps']} local steps = {total}"
                 f"{' (its SL model)' if total == steps else ''}")
    return text + ". Learning rate: one " + str(train.get("schedule", "constant")) + " schedule over each budget."


def predictor(model: torch.nn.Module, task: str | None) -> Callable:
    """The callable sliding-window inference runs: the model, or one task block of a SegViz network."""
    return functools.partial(model, task=task) if task else model


@torch.no_grad()
def validate(model: torch.nn.Module, volumes: PersistentDataset, records: list[dict[str, Any]], cfg: dict[str, Any],
             device: torch.device, task: str | None = None) -> pd.DataFrame:
    """Dice per case and owned channel (sigmoid > 0.5), from sliding-window inference on whole volumes.

    Returns long-form rows: dataset, case_id, channel, dice (NaN where the case has none of that channel).
    """
    model.eval()
    train = cfg["train"]
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    rows = []
    for index, record in enumerate(records):
        case = volumes[index]
        image = torch.as_tensor(case[IMAGE])[None].to(device)
        with autocast(device, train):
            logits = sliding_window_inference(image, cfg["preprocess"]["patch_size"], train["sw_batch_size"],
                                              predictor(model, task), overlap=train["sw_overlap"])
        prediction = (torch.sigmoid(logits.float()) > 0.5).cpu()
        target = torch.as_tensor(case[LABEL])[None]
        dice = metric(prediction, target)[0]
        for channel in np.flatnonzero(np.asarray(record["owned"])):
            rows.append({"dataset": record["dataset"], "case_id": record["case_id"],
                         "channel": CHANNELS[channel], "dice": float(dice[channel])})
    model.train()
    return pd.DataFrame(rows, columns=["dataset", "case_id", "channel", "dice"])


def channel_means(scores: pd.DataFrame) -> pd.Series:
    """Mean Dice per channel over the cases that have it (NaN cases, i.e. channel absent, left out)."""
    return scores.groupby("channel", sort=False)["dice"].mean()


def autocast(device: torch.device, train: dict[str, Any]):
    """Mixed precision on GPU when the profile allows it (`amp`); on CPU bfloat16 autocast only when the
    profile asks (`cpu_bf16`) and the CPU has native bfloat16 (AVX512-BF16 / AMX), else full precision."""
    if device.type == "cuda" and train.get("amp", True):
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and train.get("cpu_bf16", False) and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check), where bf16 autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def save_atomic(obj: Any, path: Path) -> None:
    """Atomic torch.save: a checkpoint is either the old one or the complete new one, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: Path, **info: Any) -> Path:
    """A weights checkpoint (`best.pt` format: {"model": state_dict, "step": ..., "val_mean_dice": ...,
    "settings": ..., "code": the code version that trained it}), written atomically; the SL/central best and the
    FL global and local bests all use it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": dict(state_dict), "code": code_version(), **info}, path)
    return path


def _memory_hint(cfg: dict[str, Any], error: BaseException) -> RuntimeError:
    pre, train = cfg["preprocess"], cfg["train"]
    return RuntimeError(
        f"Out of memory in training ({type(error).__name__}): lower preprocess.patch_size (now {pre['patch_size']}), "
        f"train.cases_per_step (now {train['cases_per_step']}) or preprocess.patches_per_volume "
        f"(now {pre['patches_per_volume']}), e.g. with -p or a profile copy; train.sw_batch_size "
        f"(now {train['sw_batch_size']}) if it happened in validation."
    )


def _is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
            or "out of memory" in str(error))


class StaleCheckpointError(RuntimeError):
    """A checkpoint was made under other settings than those a run now asks for: resuming it would mix two trainings."""

#: Settings that change neither the weights a training produces nor which checkpoint is kept as the best.
NEUTRAL_TRAIN_KEYS = ("checkpoint_every", "parallel_models", "sw_batch_size", "steps", "central_steps",
                      "deterministic")
NEUTRAL_PREPROCESS_KEYS = ("num_workers", "in_memory", "cache_workers")


def _file_sizes(record: Mapping[str, Any]) -> str:
    """The sizes of a record's files (its `files` stamp without the modification times, which a copy changes)."""
    return "|".join(stamp.split(":")[0] for stamp in str(record.get("files", "")).split("|"))


def case_fingerprint(records: Sequence[Mapping[str, Any]]) -> str:
    """A short, order-free fingerprint of the cases a model trains or validates on and of their files' sizes
    (a case replaced under the same id, e.g. regenerated or re-downloaded, is another case): count and hash."""
    ids = sorted(f"{r['dataset']}/{r['case_id']}:{_file_sizes(r)}" for r in records)
    return f"{len(ids)} cases, sha256 {hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:12]}"


def data_identity(data_root: str | Path | None) -> dict[str, Any]:
    """What identifies the data a model is trained on beyond its cases: the data root's name and, for synthetic
    data, the generator's version and parameters (its phantom.json). A root regenerated by another phantom
    version keeps its name, not its identity; real data has no generator (its cases' file sizes are in the case
    fingerprints)."""
    return {"root": Path(str(data_root or "")).name,
            "generator": phantom.generation(data_root) if data_root else None}


def weight_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings of `cfg` that change the weights a training produces: the network, the training and
    preprocessing settings (less the neutral keys) and the data's identity (`data_identity`). Every checkpoint
    carries them (`training_settings`, and a federation's `task.federation_settings`)."""
    train, pre = cfg["train"], cfg["preprocess"]
    return {"model": dict(cfg["model"]),
            "train": {k: v for k, v in train.items() if k not in NEUTRAL_TRAIN_KEYS},
            "preprocess": {k: v for k, v in pre.items() if k not in NEUTRAL_PREPROCESS_KEYS},
            "data": data_identity(cfg.get("data_root"))}


#: The preprocessing a model's inputs depend on at inference: a checkpoint answers only under the same.
INFERENCE_PREPROCESS_KEYS = ("spacing", "hu_window", "mri_percentiles")


def check_answers_for(path: str | Path, saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Refuse (`StaleCheckpointError`) a checkpoint loaded to answer for a run (`cfg`) that was trained on other
    data (`data_identity`: another data root, or the same folder written by another phantom version) or for
    other inference preprocessing (voxel size, intensity window); one that records no settings predates them
    and is refused too. The error names what differs and the fix."""
    path = Path(path)
    fix = (f"Retrain it into this run folder (rerun the notebook that made {path.parent.name}, e.g. with "
           f"--overwrite), or evaluate it with the data and profile it was trained on.")
    settings = saved.get("settings")
    if not settings:
        raise StaleCheckpointError(f"{path} records no training settings (it predates them), so nothing says which "
                                   f"data it was trained on. {fix}")
    expected = {"data": data_identity(cfg.get("data_root")),
                **{k: cfg["preprocess"].get(k) for k in INFERENCE_PREPROCESS_KEYS}}
    found = {"data": settings.get("data"),
             **{k: (settings.get("preprocess") or {}).get(k) for k in INFERENCE_PREPROCESS_KEYS}}
    differing = setting_differences(found, expected)
    if differing:
        raise StaleCheckpointError(f"{path} was trained on other data or preprocessing than this run's "
                                   f"({'; '.join(differing)}), so it cannot answer for it. {fix}")


def training_settings(cfg: dict[str, Any], *, loss: str, budget: int, seed: int, task: str | None,
                      train_records: Sequence[Mapping[str, Any]],
                      val_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a model's training depends on, stored in its checkpoints (`train_model`): `weight_settings`, the
    loss, the step budget its schedule runs over, the seed, the task block and the training and validation
    cases. A checkpoint is resumed only under equal settings."""
    return {**weight_settings(cfg), "loss": loss, "budget": int(budget), "seed": int(seed), "task": task,
            "train_cases": case_fingerprint(train_records), "val_cases": case_fingerprint(val_records)}


def _json_equal(a: Any, b: Any) -> bool:
    """Equal once both went through JSON (tuples and lists, int and float keys alike)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def setting_differences(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """Each setting in which `saved` differs from `settings`, as "key: old -> new" (a section's keys as
    "section.key")."""
    differing = []
    for key in sorted(set(saved) | set(settings)):
        old, new = saved.get(key), settings.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differing += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                          if not _json_equal(old.get(k), new.get(k))]
        elif not _json_equal(old, new):
            differing.append(f"{key}: {old!r} -> {new!r}")
    return differing


def check_resumable(path: Path, saved: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> None:
    """Raise `StaleCheckpointError` naming every setting in which `saved` differs from `settings`, and the fix."""
    fix = (f"Start a new run folder (another --run-name), pass --overwrite to replace this one, or delete "
           f"{path.parent} to train this model afresh.")
    if saved is None:
        raise StaleCheckpointError(f"{path} records no training settings (it predates them), so resuming it could "
                                   f"mix two trainings. {fix}")
    differing = setting_differences(saved, settings)
    if differing:
        raise StaleCheckpointError(f"{path} was trained under other settings than this run asks for "
                                   f"({'; '.join(differing)}); resuming it would mix two trainings. {fix}")


def train_model(cfg: dict[str, Any], model: torch.nn.Module, train_records: list[dict[str, Any]],
                val_records: list[dict[str, Any]], out_dir: str | Path, *, steps: int | None = None,
                loss: str | None = None, seed: int | None = None, resume: bool = True,
                stop_after: int | None = None, progress: bool = True, desc: str = "train",
                device: torch.device | None = None, hooks: LocalHooks | None = None, schedule_start: int | None = None,
                schedule_steps: int | None = None, val_every: int | None = None,
                validate_at_end: bool = True) -> dict[str, Any]:
    """Train `model` for `steps` local steps with validation, best-checkpoint tracking and resume.

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
    train = cfg["train"]
    hooks = hooks or LocalHooks()
    task, extra_loss = hooks.block, hooks.extra_loss
    steps = int(steps if steps is not None else train["steps"])
    seed = int(cfg["seed"] if seed is None else seed)
    val_records = validation_subset(val_records, train.get("val_cases"))
    device = device or select_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = build_loss(loss or train["loss"], **train.get("loss_options", {}))
    settings = training_settings(cfg, loss=loss or train["loss"], budget=int(schedule_steps or steps), seed=seed,
                                 task=task, train_records=train_records, val_records=val_records)
    model.to(device).train()
    optimizer = make_optimizer(model, train)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and train.get("amp", True))
    state = {"step": 0, "best_metric": -1.0, "best_step": 0, "history": [], "train_s": 0.0, "val_s": 0.0}
    last = out_dir / "last.pt"
    if resume and last.exists():
        saved = torch.load(last, map_location=device, weights_only=False)
        check_resumable(last, saved.get("settings"), settings)
        load_weights(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
    else:
        seed_everything(seed)
    configure_cudnn(train)
    batches = PatchBatches(cfg, train_records, seed, train["cases_per_step"], hooks.volumes)
    val_volumes = evaluation_dataset(cfg, val_records)
    start, end = state["step"], steps if stop_after is None else min(steps, state["step"] + stop_after)
    schedule_steps = int(schedule_steps or steps)
    val_every = int(val_every or validation_interval(train, steps))
    schedule_offset = (start if schedule_start is None else int(schedule_start)) - start
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start, end)), batch_size=None,
        num_workers=cfg["preprocess"].get("num_workers", 0), persistent_workers=False,
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
                scores = validate(model, val_volumes, val_records, cfg, device, task)
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
                                    val_mean_dice=metric, settings=settings)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", dice=f"{metric:.3f}")
                tick = time.perf_counter()
            if step % train["checkpoint_every"] == 0 or step == end:
                state["train_s"] += time.perf_counter() - tick
                save_atomic({"model": unique_state_dict(model), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "state": state, "settings": settings,
                             "code": code_version()}, last)
                tick = time.perf_counter()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if _is_out_of_memory(error):
            raise _memory_hint(cfg, error) from error
        raise
    history = pd.DataFrame(state["history"])
    history.to_csv(out_dir / "history.csv", index=False)
    return {"steps": state["step"], "finished": state["step"] >= steps, "best_step": state["best_step"],
            "best_val_mean_dice": state["best_metric"], "seconds": round(time.perf_counter() - began, 2),
            "history": history, "learning_rates": rates, "mean_loss": float(np.mean(losses)) if losses else math.nan}


def fit(cfg: dict[str, Any], name: str, train_records: list[dict[str, Any]], val_records: list[dict[str, Any]],
        run_dir: str | Path, *, steps: int | None = None, loss: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Build the profile's network from the run's seed and train it into `run_dir/checkpoints/<name>/`.

    The SL baselines, central aggregation (and the FL clients through `train_model`) share this path;
    a notebook rerun after an interruption continues from the last checkpoint.
    """
    seed_everything(cfg["seed"])
    model = build_network(**cfg["model"])
    out_dir = run_folder.model_dir(run_dir, name)
    summary = train_model(cfg, model, train_records, val_records, out_dir, steps=steps, loss=loss,
                          progress=progress, desc=name)
    return {**summary, "best": out_dir / run_folder.BEST, "name": name}


#: Wang & Ma's first stage (coarse-to-fine): a network of the profile's design trained on the pooled data at
#: `factor` times the profile's voxel size, for `steps` steps; a profile's `localiser:` section overrides these.
LOCALISER: dict[str, Any] = {"factor": 2.0, "steps": 300}
LOCALISER_NAME = "localiser"


def localiser_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration the localiser trains and runs under: the profile's, voxels `factor` times larger (its
    own preprocessed cache) and its own step budget; the settings are kept under `localiser`."""
    settings = {**LOCALISER, **(cfg.get("localiser") or {})}
    factor = float(settings["factor"])
    if factor < 1:
        raise ValueError(f"localiser.factor={factor}: the localiser works on voxels at least as large as the "
                         "profile's.")
    spacing = [float(s) * factor for s in cfg["preprocess"]["spacing"]]
    return {**cfg, "preprocess": {**cfg["preprocess"], "spacing": spacing},
            "train": {**cfg["train"], "steps": int(settings["steps"])},
            "localiser": {**settings, "factor": factor, "spacing": spacing}}


def fit_localiser(cfg: dict[str, Any], train_records: list[dict[str, Any]], val_records: list[dict[str, Any]],
                  run_dir: str | Path, *, loss: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the coarse-to-fine localiser (`localiser_config`) on pooled records into
    `run_dir/checkpoints/localiser/`, beside a `localiser.json` with the settings it was trained under."""
    coarse = localiser_config(cfg)
    result = fit(coarse, LOCALISER_NAME, train_records, val_records, run_dir, steps=coarse["train"]["steps"],
                 loss=loss, progress=progress)
    record = {**coarse["localiser"], "model": coarse["model"], "loss": loss or coarse["train"]["loss"],
              "fine_spacing": cfg["preprocess"]["spacing"], "patch_size": coarse["preprocess"]["patch_size"]}
    run_folder.localiser_record_file(run_dir).write_text(json.dumps(record, indent=1))
    return result


def _worker_init(threads: int, devices: Any) -> None:
    """Initializer of a `fit_models` worker process: its share of the cores, no oversubscription, and on a GPU
    machine the GPU it keeps for its life (taken from the `devices` queue, one per worker)."""
    torch.set_num_threads(threads)
    device = devices.get()
    if device is not None:
        torch.cuda.set_device(device)  # select_device()'s "cuda" is then this GPU


def model_workers(cfg: Mapping[str, Any], jobs: int, workers: int | None = None,
                  gpus: int | None = None) -> tuple[int, list[str | None]]:
    """How `fit_models` spreads `jobs` models: the number of worker processes and each one's GPU (None: CPU).

    `workers` (default: the profile's `train.parallel_models`; on a machine with several GPUs, one per GPU)
    is capped at the number of jobs; worker i trains on GPU i mod `gpus` (default: the GPUs torch sees).
    """
    gpus = torch.cuda.device_count() if gpus is None else int(gpus)
    default = gpus if gpus > 1 else 1
    workers = min(max(1, int(workers or cfg["train"].get("parallel_models") or default)), max(1, jobs))
    return workers, [f"cuda:{i % gpus}" if gpus else None for i in range(workers)]


def fit_models(cfg: dict[str, Any], jobs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], int]],
               run_dir: str | Path, *, loss: str | None = None, workers: int | None = None,
               progress: bool = True) -> dict[str, dict[str, Any]]:
    """`fit` every job (name -> (train records, val records, steps)); returns name -> `fit`'s summary.

    With more than one worker (`model_workers`: the profile's `train.parallel_models`, else one per GPU when
    there are several) the models train in that many processes at once, longest job first. On CPUs each
    worker has cores / workers torch threads and loads in-process: small 3D networks on a few CPU cores gain
    less from a second intra-op thread than from a second model (on 2 cores one thread per model trains ~1.5x
    more steps per second in all than two threads per model; see docs/convergence.md). On GPUs each
    worker keeps one GPU and its data-loading workers. Each model's training is the same as alone.
    """
    workers, devices = model_workers(cfg, len(jobs), workers)
    if workers <= 1:
        return {name: fit(cfg, name, train, val, run_dir, steps=steps, loss=loss, progress=progress)
                for name, (train, val, steps) in jobs.items()}
    threads = max(1, (os.cpu_count() or 1) // workers)
    on_gpus = devices[0] is not None
    in_process = cfg if on_gpus else {**cfg, "preprocess": {**cfg["preprocess"], "num_workers": 0}}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for device in devices:
        queue.put(device)
    if progress:
        where = f"GPUs {', '.join(sorted(set(devices)))}" if on_gpus else f"the CPU, {threads} thread(s) each"
        print(f"{len(jobs)} models, {workers} at a time on {where}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(threads, queue)) as pool:
        futures = {pool.submit(fit, in_process, name, train, val, run_dir, steps=steps, loss=loss, progress=False): name
                   for name, (train, val, steps) in sorted(jobs.items(), key=lambda job: -job[1][2])}
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"{len(jobs)} models, {workers} at a time",
                   disable=not progress)
        for future in bar:
            name = futures[future]
            results[name] = done = future.result()
            bar.set_postfix_str(f"{name}: best val Dice {done['best_val_mean_dice']:.3f}")
            if progress:  # a line per model that stays readable in a saved notebook, where the bar does not
                print(f"{name}: {done['steps']} steps, best validation Dice {done['best_val_mean_dice']:.3f} at step "
                      f"{done['best_step']} ({done['seconds']:.0f} s)", flush=True)
    return {name: results[name] for name in jobs}
