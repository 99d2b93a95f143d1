"""The FL playground's speed (notebooks/06_playground.ipynb): wall time of a preset's federation, 10 rounds x 4 sites
through the study's ServerApp, ClientApp and strategy in one process, with the dashboard drawn after every round as
the notebook draws it; beside it the process's CPU time and the machine's load, since a busy machine stretches the
wall time and not the work. Target: about a minute on 2 cores.

    .venv/bin/python benchmarks/bench_playground.py                       # every preset
    .venv/bin/python benchmarks/bench_playground.py --presets label_conflict --rounds 10 --no-dashboard
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from fedseg.experiments import playground
from fedseg.reporting import playground as draw
from fedseg.run import cpu_model


def load() -> str:
    """The 1, 5 and 15 minute load averages (`uptime`'s)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


#: each preset's outcome sentence (computed from its run), printed after the table
answers: dict[str, str] = {}


def bench(name: str, rounds: int, dashboard: bool, run_dir: Path, cases: pd.DataFrame, data_root: Path) -> dict:
    settings = playground.with_overrides(playground.PRESETS[name].settings, rounds=rounds)
    drawn = []

    def on_round(view: playground.RoundView) -> None:
        began = time.perf_counter()
        fig = draw.dashboard_figure(view, name, view.note)
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")  # what the notebook's inline display renders
        plt.close(fig)
        drawn.append(time.perf_counter() - began)

    before, cpu = load(), time.process_time()
    began = time.perf_counter()
    run = playground.run(settings, run_dir / name, cases, data_root, on_round=on_round if dashboard else None)
    wall = time.perf_counter() - began
    answer = playground.outcome(run, name)
    verdict = answer.verdict
    answers[name] = answer.answer
    return {"preset": name, "rounds x clients": f"{rounds} x {len(settings.clients())}",
            "local steps": settings.local_steps, "wall_s": wall, "dashboard_s": sum(drawn),
            "cpu_s": time.process_time() - cpu, "load before": before, "load after": load(), "verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(playground.PRESETS), help="comma-separated preset names")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-dashboard", action="store_true", help="do not draw the dashboard after each round")
    args = parser.parse_args()
    began = time.perf_counter()
    data_root, cases = playground.prepare_data(0)
    prepared = time.perf_counter() - began
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.presets.split(","):
            rows.append(bench(name, args.rounds, not args.no_dashboard, Path(folder), cases, data_root))
    table = pd.DataFrame(rows).set_index("preset")
    print(f"{os.cpu_count()} cores ({cpu_model()}), torch threads during a run {playground.THREADS}, "
          f"{torch.__version__}; phantom ready in {prepared:.1f} s ({data_root.name}); wall_s includes the dashboard "
          "(dashboard_s), cpu_s is this process's CPU time; load = 1/5/15-minute load averages")
    print(table.to_markdown(floatfmt=".1f"))
    for name, answer in answers.items():
        print(f"\n{name}: {answer}")


if __name__ == "__main__":
    main()
