"""Domain randomisation's proxy experiment: default-trained vs randomised-trained models on unseen domains.

Trains each training dataset's standalone model twice (same steps, seed and network): on the CT-realistic
phantom and on the randomised phantom with MONAI's intensity augmentation; tests both on the same test cases
imaged as CT, by another scanner, and in the MRI-like contrast (`fedseg.experiments.randomisation`). Writes
scores.csv, organs.md (the table and the drops from CT) and organs.png to --out.

    .venv/bin/python benchmarks/domain_randomisation.py                  # laptop profile, ~15 min on 2 cores
    .venv/bin/python benchmarks/domain_randomisation.py --steps 300 --datasets spleen,liver
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedseg.config import load_profile, repo_root  # noqa: E402
from fedseg.data.labels import TRAIN_DATASETS  # noqa: E402
from fedseg.experiments import randomisation  # noqa: E402


def figure(table):
    organs = [o for o in table.index.get_level_values(1).unique() if o != "mean over organs"]
    tests = list(table.columns)
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 3.4), sharey=True)
    width = 0.38
    for ax, test in zip(np.atleast_1d(axes), tests):
        for k, regime in enumerate(randomisation.REGIMES):
            values = [table.loc[(regime, o), test] if (regime, o) in table.index else np.nan for o in organs]
            ax.bar(np.arange(len(organs)) + (k - 0.5) * width, values, width, label=f"trained on {regime} phantoms")
        ax.set_xticks(range(len(organs)), organs)
        ax.set_title(f"tested on {test}", fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Dice (%)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(TRAIN_DATASETS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the profile's)")
    parser.add_argument("--out", type=Path, default=repo_root() / "results" / "domain-randomisation")
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    profile = load_profile(args.profile)
    start = time.perf_counter()
    checkpoints = randomisation.train(profile, args.seed, args.out, datasets, steps=args.steps)
    scores = randomisation.score(profile, args.seed, checkpoints, datasets)
    args.out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(args.out / "scores.csv", index=False)
    table = randomisation.organ_table(scores)
    gaps = randomisation.gaps(table)
    steps = args.steps or profile["train"]["steps"]
    text = (f"# Domain randomisation proxy ({args.profile} profile, seed {args.seed}, {steps} steps per model)\n\n"
            f"{randomisation.NOTE}\n\n{table.reset_index().to_markdown(index=False)}\n\n"
            f"Drop from CT (Dice points, mean over organs):\n\n"
            f"{gaps.to_markdown()}\n\nCommand: `.venv/bin/python benchmarks/domain_randomisation.py "
            f"--profile {args.profile} --seed {args.seed} --datasets {','.join(datasets)} --steps {steps}`; "
            f"{time.perf_counter() - start:.0f} s.\n")
    (args.out / "organs.md").write_text(text)
    fig = figure(table)
    fig.savefig(args.out / "organs.png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
