"""Learning per CPU-second: validation Dice against training seconds for standalone models, several
settings side by side in one run (default: the laptop profile as it was before the convergence work,
`old`, and the laptop profile as it is, `new`), each on SL liver and SL kidney (KiTS19).

Validation (sliding-window inference on the dataset's validation split) runs every `--every` steps and
is not counted in the clock: the x-axis is the seconds spent training, the y-axis the mean validation
Dice over the dataset's channels. Only validation splits are read.

    .venv/bin/python benchmarks/bench_learning_efficiency.py --profile laptop
    .venv/bin/python benchmarks/bench_learning_efficiency.py --variant 'lr5e3={"train": {"lr": 5e-3}}'

Writes `<out>/learning_efficiency.csv` (every validation), `.md` (the table) and `.png` (the plot); the reference
copy is `results/reference/learning_efficiency.*`.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fedseg.config import resolve  # noqa: E402
from fedseg.data import datasets, transforms  # noqa: E402
from fedseg.train.models import build_network  # noqa: E402
from fedseg.train.training import seed_everything, train_model  # noqa: E402

#: The laptop profile's training settings before the convergence work (the 2026-11-26 reference run): one
#: residual unit per level, lr 2e-3, 200 steps, volumes read from the cache by a loader process every step.
#: The data are the current profile's for both, so the two columns differ in training settings only.
OLD_LAPTOP = {
    "preprocess": {"patch_size": [32, 32, 32], "patches_per_volume": 2, "num_workers": 1, "in_memory": False},
    "model": {"name": "UNet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1},
    "train": {"loss": "dice_ce", "lr": 2.0e-3, "schedule": "cosine", "warmup_steps": 0, "cases_per_step": 2,
              "steps": 200},
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_variant(cfg: dict, name: str, dataset: str, cases: pd.DataFrame, every: int) -> pd.DataFrame:
    """Train one SL model under `cfg`, validating every `every` steps; returns its history."""
    def records(split):
        return transforms.case_records(cfg["data_root"], cases[(cases.dataset == dataset) & (cases.split == split)])

    train, val = records("train"), records("val")
    transforms.build_cache(cfg, train + val, progress=False)
    cfg = merge(cfg, {"train": {"checkpoint_every": 10**9}})
    seed_everything(cfg["seed"])
    model = build_network(**cfg["model"])
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # checkpoints are not kept: only the curves matter here
        summary = train_model(cfg, model, train, val, Path(scratch) / f"{name}-{dataset}", resume=False,
                              progress=False, val_every=every)
    wall = time.perf_counter() - began
    history = summary["history"].assign(variant=name, dataset=dataset, wall_s=round(wall, 1),
                                        threads=torch.get_num_threads())
    print(f"{name:>12} {dataset:>8}: best val Dice {summary['best_val_mean_dice']:.3f} at step {summary['best_step']}, "
          f"training {history['train_s'].iloc[-1]:.1f} s, validation {history['val_s'].iloc[-1]:.1f} s, "
          f"wall {wall:.1f} s")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--datasets", default="liver,kits19")
    parser.add_argument("--every", type=int, default=0, help="validate every N steps (default: steps / 8)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME={"train": {...}}',
                        help="a named settings override (JSON) of the profile; default: old and new")
    parser.add_argument("--no-old", action="store_true", help="without the `old` reference variant")
    parser.add_argument("--out", default="results/bench-learning-efficiency")
    parser.add_argument("--replot", metavar="CSV", help="only redraw the plot of an earlier run's CSV into --out")
    args = parser.parse_args()
    if args.replot:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(pd.read_csv(args.replot)).savefig(Path(args.out) / "learning_efficiency.png", dpi=120)
        return
    base = resolve(args.profile)
    variants = {} if args.no_old else {"old": merge(base, OLD_LAPTOP)}
    variants["new"] = base
    for text in args.variant:
        name, _, override = text.partition("=")
        variants[name] = merge(base, json.loads(override))
    if args.variant:
        variants.pop("new")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = datasets.obtain_data(base, progress=False)
    cases = datasets.manifest_for(data_root)
    rows = []
    for name, cfg in variants.items():
        every = args.every or max(1, int(cfg["train"]["steps"]) // 8)
        for dataset in args.datasets.split(","):
            rows.append(run_variant(cfg, name, dataset, cases, every))
    table = pd.concat(rows, ignore_index=True)
    table.to_csv(out / "learning_efficiency.csv", index=False)
    summary = (table.groupby(["dataset", "variant"], sort=False)
               .agg(steps=("step", "max"), train_s=("train_s", "max"), val_s=("val_s", "max"), wall_s=("wall_s", "max"),
                    best_val_dice=("val_mean_dice", "max"), final_val_dice=("val_mean_dice", "last")))
    channels = [c for c in table.columns if c.startswith("dice_")]
    finals = table.groupby(["dataset", "variant"], sort=False)[channels].last().dropna(axis=1, how="all")
    summary = summary.join(finals.rename(columns=lambda c: f"final {c[5:]}"))
    text = summary.to_markdown(floatfmt=".3f")
    (out / "learning_efficiency.md").write_text(
        f"Validation Dice (mean over the dataset's channels) against training seconds, profile {args.profile}, "
        f"{torch.get_num_threads()} torch threads in this process.\n\n{text}\n")
    print(text)
    plot(table).savefig(out / "learning_efficiency.png", dpi=120)


def plot(table: pd.DataFrame):
    """One panel per dataset: each channel's validation Dice (organ solid, tumour dashed) per variant."""
    datasets = list(table.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    colours = dict(zip(table.variant.unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, dataset in zip(axes[0], datasets):
        part = table[table.dataset == dataset]
        channels = [c for c in part.columns if c.startswith("dice_") and part[c].notna().any()]
        for name, curve in part.groupby("variant", sort=False):
            for channel in channels:
                ax.plot(curve["train_s"], curve[channel], marker="o", markersize=3, color=colours[name],
                        linestyle="--" if "tumor" in channel else "-", label=f"{name}: {channel[5:].replace('_', ' ')}")
        ax.set(title=f"SL {dataset}", xlabel="training seconds (validation excluded)", ylabel="validation Dice",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
