"""Training options across contrast phases and scanners: the phase-robustness table and the option chosen on validation.

Trains each training dataset's standalone model under every training option (`--options`; the same steps, seed
and network; `fedseg.experiments.randomisation.OPTIONS`), scores every model on the validation split imaged as CT,
unenhanced and by another scanner (where the option is chosen, by the rule written in the output) and on the test
split imaged as CT (each dataset's published phase), in each contrast phase, by another scanner and MRI-like;
trains the coarse-to-fine localiser once on the default phantoms and records, per organ and phase, whether its
coarse pass finds each organ. Resumable: finished models, generated data and every score table already in
--work are reused. Writes scores.csv, phases.md, phases.png, localiser.csv and localiser.md to --out.

    .venv/bin/python benchmarks/domain_randomisation.py --out results/reference/phantom/phases   # laptop, ~1 h
    .venv/bin/python benchmarks/domain_randomisation.py --profile smoke --steps 20 --datasets spleen,kits19
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fedseg.config import load_profile, repo_root  # noqa: E402
from fedseg.data.labels import TRAIN_DATASETS  # noqa: E402
from fedseg.experiments import randomisation as rnd  # noqa: E402


def figure(table: pd.DataFrame, chosen: str | None = None):
    """Per test domain, Dice per organ for each option (the option chosen on validation marked)."""
    options = list(table.index.get_level_values(0).unique())
    organs = [o for o in table.index.get_level_values(1).unique()]
    tests = list(table.columns)
    cols = 4
    rows = int(np.ceil((len(tests) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), sharey=True)
    axes = np.atleast_1d(axes).ravel()
    width = 0.8 / len(options)
    colours = plt.get_cmap("tab10").colors
    for ax, test in zip(axes, tests):
        for k, option in enumerate(options):
            values = [table.loc[(option, o), test] for o in organs]
            ax.bar(np.arange(len(organs)) + (k - (len(options) - 1) / 2) * width, values, width,
                   color=colours[k % len(colours)], label=option)
        ax.set_xticks(range(len(organs)), [o.replace(" over organs", "") for o in organs], fontsize=8)
        ax.set_title(f"tested on {test}" + (" (published phases)" if test == "CT" else ""), fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel("Dice (%)")
    for ax in axes[len(tests):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [f"trained: {label}" + (" (chosen on validation)" if label == chosen != rnd.BASELINE else "")
              for label in labels]
    axes[len(tests)].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.tight_layout()
    return fig


def recorded_seconds(work: Path) -> dict[str, float]:
    """Compute recorded in the work folder, whichever invocation did it: each model's training and validation
    seconds (its history.csv; models trained in parallel overlap), and the seconds of each score table."""
    out = {"training": 0.0, "scoring": 0.0, "localiser": 0.0}
    for history in work.glob("*/checkpoints/*/history.csv"):
        try:
            last = pd.read_csv(history).iloc[-1]
        except (OSError, IndexError, pd.errors.EmptyDataError):
            continue
        out["localiser" if history.parts[-4] == "localiser" else "training"] += last["train_s"] + last["val_s"]
    for meta in [*work.glob("scores/*/*/*.json"), *work.glob("localiser/found/*.json")]:
        key = "localiser" if "localiser" in meta.parts else "scoring"
        out[key] += float(json.loads(meta.read_text()).get("seconds", 0.0))
    return {k: round(v) for k, v in out.items()}


def md(frame: pd.DataFrame, digits: int = 1) -> str:
    return frame.reset_index().to_markdown(index=False, floatfmt=f".{digits}f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(TRAIN_DATASETS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the profile's)")
    parser.add_argument("--options", default=",".join(rnd.OPTIONS),
                        help=f"training options, of {', '.join(rnd.OPTIONS)} ({rnd.BASELINE} is always trained)")
    parser.add_argument("--localiser", action=argparse.BooleanOptionalAction, default=True,
                        help="train the localiser and check it per organ and phase")
    parser.add_argument("--work", type=Path, default=repo_root() / "results" / "phase-robustness",
                        help="models and score tables (reused by a rerun)")
    parser.add_argument("--out", type=Path, default=None, help="the report (default: --work)")
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [o for o in args.options.split(",") if o and o not in rnd.OPTIONS]
    if unknown:
        parser.error(f"unknown option(s) {', '.join(unknown)}: use {', '.join(rnd.OPTIONS)}")
    options = [rnd.BASELINE] + [o for o in args.options.split(",") if o and o != rnd.BASELINE]
    out = args.out or args.work
    profile = load_profile(args.profile)
    steps = args.steps or profile["train"]["steps"]
    start = time.perf_counter()

    checkpoints = rnd.train(profile, args.seed, args.work, options, datasets, steps=args.steps)
    scores = pd.concat([rnd.score(profile, args.seed, checkpoints, args.work, split="val"),
                        rnd.score(profile, args.seed, checkpoints, args.work, split="test")], ignore_index=True)
    found = None
    if args.localiser:
        trained, best = rnd.train_localiser(profile, args.seed, args.work, datasets)
        found = rnd.localiser_scores(profile, args.seed, args.work, trained, best, datasets)

    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    selection = rnd.selection_table(scores)
    chosen = rnd.choose(selection)
    table = rnd.organ_table(scores, "test", options)
    bar = rnd.test_bar(scores)
    verdict = rnd.verdict(chosen, bar)
    beside = rnd.organ_table(scores, "test", list(dict.fromkeys([rnd.BASELINE, chosen])))
    wall = time.perf_counter() - start
    seconds = recorded_seconds(args.work)
    def shown(path: Path) -> str:
        path = path.resolve()
        return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)

    command = [".venv/bin/python", "benchmarks/domain_randomisation.py", "--profile", args.profile, "--seed",
               str(args.seed), "--datasets", ",".join(datasets), "--steps", str(steps), "--options", ",".join(options),
               "--work", shown(args.work)]
    command += ["--out", shown(args.out)] if args.out else []
    command += [] if args.localiser else ["--no-localiser"]
    described = "\n".join(f"| {name} | {rnd.OPTIONS[name].about} | {rnd.OPTIONS[name].overrides()} |"
                          for name in options)
    localiser_md = ""
    if found is not None:
        found.to_csv(out / "localiser.csv", index=False)
        loc = rnd.localiser_table(found)
        localiser_md = (f"# The coarse-to-fine localiser across phases ({args.profile} profile, seed {args.seed})\n\n"
                        f"Trained once as 02 trains it (`training.fit_localiser`, pooled {', '.join(datasets)} "
                        f"training cases, default phantoms, {profile.get('localiser', {}).get('steps', '300')} steps). "
                        "Per organ: % of the test cases whose label holds the organ where the coarse pass finds it "
                        "(coarse-to-fine's own rule: any voxel of the organ's channels > 0 on the image downsampled "
                        "by the localiser's factor), (found/cases); 'test splits': each training dataset's test cases, "
                        "its own organ; BTCV: all four organs. A miss makes the fine pass segment that organ over the "
                        f"whole image instead of the box.\n\n{loc.reset_index().to_markdown(index=False)}\n")
        (out / "localiser.md").write_text(localiser_md)
    text = (
        f"# Training options across phases and scanners ({args.profile} profile, seed {args.seed}, {steps} steps per "
        f"model)\n\n{rnd.NOTE}\n\n## Options\n\n| option | training images | profile overrides |\n| --- | --- | --- |\n"
        f"{described}\n\n## The option chosen on validation phantoms\n\n{rnd.RULE}\n\nValidation split, Dice % "
        f"(mean over organs) and change against {rnd.BASELINE} (points):\n\n{md(selection)}\n\n"
        f"**Chosen: {chosen}.**\n\n## The phase-robustness table: {rnd.BASELINE} vs the chosen option (test split)\n\n"
        f"{md(beside)}\n\nOn the test split, against {rnd.BASELINE} (Dice points, means over organs):\n\n{md(bar)}\n\n"
        f"**{verdict}**\n\n## Every option on every test domain (test split)\n\n{md(table)}\n\n"
        f"Drop from CT (Dice points, mean over organs):\n\n{md(rnd.gaps(table))}\n\n"
        + (f"## The localiser\n\n{localiser_md.split(chr(10), 2)[2]}\n" if localiser_md else "")
        + f"Command: `{shlex.join(command)}`; this invocation {wall:.0f} s wall on "
        f"{os.cpu_count()} cores; compute recorded in {args.work.name}/ over every invocation: training "
        f"{seconds['training']} s (models trained in parallel overlap), scoring {seconds['scoring']} s, localiser "
        f"{seconds['localiser']} s.\n")
    (out / "phases.md").write_text(text)
    fig = figure(table, chosen)
    fig.savefig(out / "phases.png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
