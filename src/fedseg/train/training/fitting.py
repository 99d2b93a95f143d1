"""Fitting models into a run folder: `fit` (one model), the coarse-to-fine localiser, and `fit_models` (several at
once, in worker processes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import base_profile
from fedseg.train.models import build_network
from fedseg.train.training.loop import train_model
from fedseg.train.training.runtime import (
    seed_everything,
)
from fedseg.train.training.settings import TrainingSettings


def fit(cfg: TrainingSettings | Mapping[str, Any], name: str, train_records: list[dict[str, Any]],
        val_records: list[dict[str, Any]], run_dir: str | Path, *, steps: int | None = None, loss: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Build the profile's network from the run's seed and train it into `run_dir/checkpoints/<name>/`, under a
    training's settings (`TrainingSettings`, or a resolved configuration's).

    The SL baselines, central aggregation (and the FL clients through `train_model`) share this path;
    a notebook rerun after an interruption continues from the last checkpoint.
    """
    settings = TrainingSettings.of(cfg)
    seed_everything(settings.seed)
    model = build_network(**settings.model)
    out_dir = run_folder.model_dir(run_dir, name)
    summary = train_model(settings, model, train_records, val_records, out_dir, steps=steps, loss=loss,
                          progress=progress, desc=name)
    return {**summary, "best": out_dir / run_folder.BEST, "name": name}


#: Wang & Ma's first stage (coarse-to-fine): a network of the profile's design trained on the pooled data at
#: `factor` times the profile's voxel size, for `steps` steps: the base profile's `localiser:` section (the defaults a
#: profile's own `localiser:` overrides; written once, in `fedseg/profiles/base.yaml`).
LOCALISER: dict[str, Any] = base_profile()["localiser"]


LOCALISER_NAME = run_folder.LOCALISER


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


def model_workers(cfg: TrainingSettings | Mapping[str, Any], jobs: int, workers: int | None = None,
                  gpus: int | None = None) -> tuple[int, list[str | None]]:
    """How `fit_models` spreads `jobs` models: the number of worker processes and each one's GPU (None: CPU).

    `workers` (default: the profile's `train.parallel_models`; on a machine with several GPUs, one per GPU)
    is capped at the number of jobs; worker i trains on GPU i mod `gpus` (default: the GPUs torch sees).
    """
    gpus = torch.cuda.device_count() if gpus is None else int(gpus)
    default = gpus if gpus > 1 else 1
    workers = min(max(1, int(workers or TrainingSettings.of(cfg).train.parallel_models or default)), max(1, jobs))
    return workers, [f"cuda:{i % gpus}" if gpus else None for i in range(workers)]


def fit_models(cfg: TrainingSettings | Mapping[str, Any],
               jobs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], int]], run_dir: str | Path, *,
               loss: str | None = None, workers: int | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """`fit` every job (name -> (train records, val records, steps)); returns name -> `fit`'s summary.

    With more than one worker (`model_workers`: the profile's `train.parallel_models`, else one per GPU when
    there are several) the models train in that many processes at once, longest job first. On CPUs each
    worker has cores / workers torch threads and loads in-process: small 3D networks on a few CPU cores gain
    less from a second intra-op thread than from a second model (on 2 cores one thread per model trains ~1.5x
    more steps per second in all than two threads per model; see docs/convergence.md). On GPUs each
    worker keeps one GPU and its data-loading workers. Each model's training is the same as alone.
    """
    settings = TrainingSettings.of(cfg)
    workers, devices = model_workers(settings, len(jobs), workers)
    if workers <= 1:
        return {name: fit(settings, name, train, val, run_dir, steps=steps, loss=loss, progress=progress)
                for name, (train, val, steps) in jobs.items()}
    threads = max(1, (os.cpu_count() or 1) // workers)
    on_gpus = devices[0] is not None
    in_process = settings if on_gpus else settings.replace(preprocess={"num_workers": 0})
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
