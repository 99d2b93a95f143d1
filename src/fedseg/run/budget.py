"""The budget-response study's runner (`run_budget`, `python -m fedseg budget`): the chain, the sweep, the node
sets and the contrast study at several training budgets, one folder per budget point, resumable, then the
study's report (`fedseg.reporting.budget`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedseg import run_folder
from fedseg.config import PROFILE_FILE, load_profile, merge_profile, repo_root
from fedseg.experiments import budget
from fedseg.experiments import nodes as node_sets
from fedseg.reporting import budget as budget_report
from fedseg.run.chain import CHAIN, run_chain
from fedseg.run.provenance import _now
from fedseg.run.studies import run_contrast, run_nodes, run_sweep, write_profile_once


def _budget_point(study: Path, name: str, derived: dict[str, Any]) -> Path:
    """A budget point's folder with its derived profile written once into `profile.yaml`; a folder run with
    another profile (or holding another run) is refused, naming what differs."""
    folder = (study / name).resolve()

    def other_profile(written: Any) -> str | None:
        # compared as loaded (onto the base profile), so a point written before a setting existed still matches
        differ = budget.profile_difference(merge_profile(written or {}, str(folder / PROFILE_FILE)), derived)
        if differ:
            return (f"{folder} was run with another profile ({'; '.join(differ[:6])}): rerun with the settings it "
                    "was run with, or choose another --run-name.")
        return None

    write_profile_once(folder, derived, other_profile, str(folder))
    return folder


def _budget_chain_and_sweep(folder: Path, params: dict[str, Any], log_output: bool) -> None:
    """The chain (01-05, each notebook unless it finished there; its 03 is FedAvg with the profile's loss, 03's
    compared federation off) and the sweep's other federations (`budget.SWEEP`) into a budget point's folder."""
    profile = str(folder / PROFILE_FILE)
    for name in CHAIN:
        if name not in run_folder.finished_notebooks(folder):
            print(f"fedseg budget: {folder.name}: {name}", flush=True)
            run_chain(profile, run_name=folder.name, params={**params, "compare_loss": ""}, only=name,
                      results=folder.parent, log_output=log_output)
    finished = all(run_folder.FEDERATED in run_folder.finished_notebooks(folder / f"{m}-{loss}")
                   for m, loss in budget.SWEEP)
    if not (finished and run_folder.table_file(folder, "sweep_methods").exists()):
        print(f"fedseg budget: {folder.name}: sweep {', '.join(f'{m}-{loss}' for m, loss in budget.SWEEP)}",
              flush=True)
        run_sweep(profile, federations=budget.SWEEP, run_name=folder.name, results=folder.parent, params=params,
                  log_output=log_output)


def _budget_nodes(folder: Path, nodes: tuple[int, ...], params: dict[str, Any], log_output: bool) -> None:
    """SegViz's node sets into a budget point's folder, unless its BTCV scores (written once every model of the
    node sets was trained and scored) cover every node set and model: what the folder holds decides, so a point kept
    without its checkpoints (e.g. committed as reference results and copied back) is not trained again."""
    scores = run_folder.metrics_file(folder, "segviz_nodes_per_case.csv")
    finished = False
    if scores.exists():
        held = set(map(tuple, pd.read_csv(scores, usecols=["setup", "model"]).drop_duplicates().to_numpy()))
        finished = all((node_sets.setup_name(n), model) in held for n in nodes
                       for model in (node_sets.CENTRAL, *node_sets.FL_ROWS))
    if not finished:
        print(f"fedseg budget: {folder.name}: node sets {', '.join(map(str, nodes))}", flush=True)
        run_nodes(str(folder / PROFILE_FILE), nodes, run_name=folder.name, results=folder.parent, params=params,
                  log_output=log_output)


def _budget_contrast(folder: Path, params: dict[str, Any], log_output: bool) -> None:
    """FedGIN's contrast study into a budget point's `contrast/` (its own profile), unless it finished there."""
    study = folder / budget.CONTRAST
    methods = ("fedavg", "fedgin")
    finished = run_folder.metrics_file(study, "contrast_per_case.csv").exists() and all(
        run_folder.FEDERATED in run_folder.finished_notebooks(study / m) for m in methods)
    if not finished:
        print(f"fedseg budget: {folder.name}: contrast study", flush=True)
        run_contrast(str(folder / PROFILE_FILE), None, methods, run_name=budget.CONTRAST, results=folder,
                     params=params, log_output=log_output)


def _budget_report(study: Path, strict: bool = True) -> Path:
    """The study's report from the points its folder holds (`reporting.budget.write_report`), naming the last
    command that trained it (`budget_runs.csv`)."""
    runs = study / BUDGET_RUNS
    command = ""
    if runs.exists():
        trained = pd.read_csv(runs)
        command = str(trained["command"].dropna().iloc[-1]) if trained["command"].notna().any() else ""
    try:
        return budget_report.write_report(study, budget.find_points(study), command=command)["md"]
    except Exception as exc:  # an intermediate report must not stop hours of training; the final one raises
        if strict:
            raise
        print(f"fedseg budget: the intermediate report failed ({type(exc).__name__}: {exc}); training goes on, "
              "and `--report-only` rebuilds it", file=sys.stderr, flush=True)
        return study / "budget.md"


#: Each `budget` command that trained, with its wall time (the study's wall time is their sum).
BUDGET_RUNS = "budget_runs.csv"


def run_budget(profile: str = "laptop", scales: Sequence[int] = (1, 3, 10), *, fine_scale: int | None = 3,
               fine_spacing: float | None = 3.0, nodes_scales: Sequence[int] | None = None,
               contrast_scales: Sequence[int] | None = None, nodes: tuple[int, ...] = (2, 3, 4),
               scale_rounds: bool = False, report_only: bool = False, run_name: str | None = None,
               params: dict[str, Any] | None = None, results: str | Path | None = None, log_output: bool = False,
               command: str = "") -> Path:
    """The budget-response study (`fedseg.experiments.budget`) into `results/<run-name>/`, resuming what it holds;
    returns the report's path (`budget.md`).

    Per scale k a point `scale-<k>/` (and `scale-<fine>-<spacing>mm/` at the finer voxel) with its derived profile
    (`budget.budget_profile`) in `profile.yaml`: the chain (SL, central, localiser, FedAvg with the profile's loss,
    BTCV) and the sweep's federations (`budget.SWEEP`: FedAvg with the paper's loss, ownerfedavg); at
    `nodes_scales` (default the two smallest) SegViz's node sets and at `contrast_scales` (default the two
    smallest) FedGIN's contrast study (`<point>/contrast/`). Every finished piece is kept, so a rerun goes on
    where the last stopped; the folder's profiles must match. Then the report (`reporting.budget`): budget.csv,
    budget.md, budget.png, claims_by_scale.{md,csv} in the study folder. `report_only` rebuilds the report only.
    """
    base = load_profile(profile)
    scales = budget.check_scales(scales)
    chosen = {}
    for what, given in (("nodes", nodes_scales), ("contrast", contrast_scales)):
        picked = scales[:2] if given is None else (budget.check_scales(given) if len(given) else ())
        outside = [k for k in picked if k not in scales]
        if outside:
            raise ValueError(f"--{what}-scales {list(outside)}: not among --scales {list(scales)} (the {what} study "
                             "runs into a scale's folder).")
        chosen[what] = picked
    nodes = node_sets.check_nodes(nodes)
    points = [(k, None) for k in scales]
    if fine_scale and fine_spacing:
        fine_scale = budget.check_scales([fine_scale])[0]
        if [float(fine_spacing)] * 3 == [float(v) for v in base["preprocess"]["spacing"]]:
            raise ValueError(f"--fine-spacing {fine_spacing} is the profile's own voxel: choose a finer one.")
        points.append((fine_scale, float(fine_spacing)))
    results = Path(results) if results else repo_root() / "results"
    study = (results / (run_name or f"budget-{base['name']}")).resolve()
    if report_only:
        if not study.is_dir():
            raise FileNotFoundError(f"{study} does not exist: run the study first (without --report-only).")
        return _budget_report(study)
    params = dict(params or {})
    study.mkdir(parents=True, exist_ok=True)
    # every point's profile written (or checked) before anything trains
    folders = {(k, spacing): _budget_point(study, budget.point_name(k, spacing),
                                           budget.budget_profile(base, k, spacing, scale_rounds))
               for k, spacing in points}
    started, t0, status = _now(), time.perf_counter(), "failed"
    try:
        for (k, spacing), folder in folders.items():
            _budget_chain_and_sweep(folder, params, log_output)
            if spacing is None and k in chosen["nodes"]:
                _budget_nodes(folder, nodes, params, log_output)
            if spacing is None and k in chosen["contrast"]:
                _budget_contrast(folder, params, log_output)
            _budget_report(study, strict=False)
        status = "ok"
    finally:
        runs = study / BUDGET_RUNS
        earlier = pd.read_csv(runs) if runs.exists() else pd.DataFrame()
        row = {"started": started, "ended": _now(), "wall_s": round(time.perf_counter() - t0, 1), "status": status,
               "command": command or None}
        pd.concat([earlier, pd.DataFrame([row])], ignore_index=True).to_csv(runs, index=False)
    return _budget_report(study)
