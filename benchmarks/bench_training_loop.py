"""Overhead of the training loop: steps/s and voxels/s of `fedseg.train.training.train_model` on a profile's
data (cache reads, patch sampling, augmentation, loss, optimizer, checkpoints) against the bare network
forward + backward + optimizer step on random tensors of the same size, in one run.

    .venv/bin/python benchmarks/bench_training_loop.py --profile laptop --steps 60
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
import torch

from fedseg.config import resolve
from fedseg.data import datasets, transforms
from fedseg.train.losses import build_loss
from fedseg.train.models import build_network
from fedseg.train.training import TrainSettings, make_optimizer, select_device, train_model


def bare_steps(cfg, steps: int, device: torch.device) -> float:
    """Seconds per step of forward + loss + backward + Adam on random tensors shaped like a batch."""
    pre, train = cfg["preprocess"], cfg["train"]
    batch = train["cases_per_step"] * pre["patches_per_volume"]
    model = build_network(**cfg["model"]).to(device).train()
    optimizer = make_optimizer(model, TrainSettings.of(train))
    loss_fn = build_loss(train["loss"], **train.get("loss_options", {}))
    image = torch.rand(batch, 1, *pre["patch_size"], device=device)
    target = (torch.rand(batch, 8, *pre["patch_size"], device=device) > 0.9).to(torch.uint8)
    owned = torch.ones(batch, 8, dtype=torch.bool, device=device)
    for warm in range(3):
        optimizer.zero_grad()
        loss_fn(model(image), target, owned).backward()
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(image), target, owned).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = resolve(args.profile)
    device = select_device()
    data_root = datasets.obtain_data(cfg, progress=False)
    cases = datasets.manifest_for(data_root)
    train_cases = cases[(cases.split == "train") & (cases.dataset == "liver")]
    records = transforms.case_records(data_root, train_cases)
    transforms.build_cache(cfg, records, progress=False)  # the loop reads the cache, as in the study
    pre, train = cfg["preprocess"], cfg["train"]
    cfg["train"] = {**train, "checkpoint_every": 20}
    voxels = train["cases_per_step"] * pre["patches_per_volume"] * int(torch.tensor(pre["patch_size"]).prod())
    with tempfile.TemporaryDirectory() as out:
        model = build_network(**cfg["model"])
        # warm-up (imports, first reads)
        train_model(cfg, model, records, [], out, steps=3, progress=False, val_every=10**9)
    with tempfile.TemporaryDirectory() as out:
        model = build_network(**cfg["model"])
        start = time.perf_counter()
        train_model(cfg, model, records, [], out, steps=args.steps, progress=False, val_every=10**9)
        loop = (time.perf_counter() - start) / args.steps
    bare = bare_steps(cfg, args.steps, device)
    table = pd.DataFrame({
        "s/step": [bare, loop], "steps/s": [1 / bare, 1 / loop],
        "Mvoxels/s": [voxels / bare / 1e6, voxels / loop / 1e6],
    }, index=["bare forward+backward (random tensors)", "fedseg training loop (cache, patches, checkpoints)"])
    print(f"profile {args.profile} on {device}, torch threads {torch.get_num_threads()}, model {cfg['model']['name']}, "
          f"batch {train['cases_per_step']}x{pre['patches_per_volume']} patches of {pre['patch_size']}, "
          f"{args.steps} steps")
    print(table.to_markdown(floatfmt=".3f"))
    print(f"loop / bare = {loop / bare:.2f}x")


if __name__ == "__main__":
    main()
