"""The studies built on the chain, each into one run folder that a rerun resumes: the sweep of federated methods
(`run_sweep`), SegViz's node sets (`run_nodes`) and FedGIN's cross-contrast experiment (`run_contrast`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedseg import run_folder
from fedseg.config import PROFILE_FILE, load_profile, repo_root, resolve
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.evaluate import metrics
from fedseg.experiments import contrast
from fedseg.experiments import nodes as node_sets
from fedseg.federated.methods import check_method, check_network
from fedseg.reporting import report
from fedseg.reporting.report import (
    dilution_figure,
    dilution_note,
    dilution_summary,
    read_dilution,
    save_figure,
    save_table,
    sweep_table,
    unmeasured_dilution,
)
from fedseg.run.chain import CHAIN, _write_readme, default_run_name, run_chain
from fedseg.train.losses import LOSSES


def write_profile_once(folder: Path, derived: dict[str, Any], refusal: Callable[[Any], str | None],
                       holder: str) -> Path:
    """`folder`'s `profile.yaml` (returned), with the derived profile `derived` written into it once, into a new or
    empty folder. A folder whose profile.yaml differs is refused: `refusal` gets the profile written there and
    returns the message naming what differs (ValueError), or None when it matches. A folder holding files but no
    profile.yaml is refused as `holder` holding another run (FileExistsError)."""
    path = folder / PROFILE_FILE
    if path.exists():
        differ = refusal(yaml.safe_load(path.read_text()))
        if differ:
            raise ValueError(differ)
    elif folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{holder} holds another run (no {PROFILE_FILE}): choose another --run-name.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(derived, sort_keys=False))
    return path


def run_sweep(profile: str = "laptop", methods: tuple[str, ...] = ("fedavg",), *, losses: tuple[str, ...] = (),
              federations: Sequence[tuple[str, str | None]] = (), run_name: str | None = None,
              params: dict[str, Any] | None = None, overwrite: bool = False, results: str | Path | None = None,
              log_output: bool = False) -> Path:
    """The federated methods side by side in one run folder: 01 and 02 once, then 03 once per method (and per
    loss of `losses`, default the profile's) into `<run>/<method>/` or `<run>/<method>-<loss>/` (its own
    checkpoints, rounds, dilution, tables), then `tables/sweep_methods.*` collecting every federation's FL
    global and local Dice per channel with the SL row and its wall time. `federations`, (method, loss) pairs
    (loss None: the profile's), replaces methods x losses when given. 03's own second federation
    (`compare_loss`) is switched off here: the sweep's losses say what runs. A folder that already holds 01 and
    02 (a chain's run) keeps them, and federations that finished there are not run again."""
    base = load_profile(profile)
    pairs = list(federations) or [(method, loss) for method in methods for loss in losses or (None,)]
    methods = tuple(dict.fromkeys(method for method, _ in pairs))
    losses = tuple(dict.fromkeys(loss for _, loss in pairs if loss))
    for method in methods:
        check_method(method)
        # ownerfedavg on a network without an output layer of its own: refused before 01 and 02 run
        check_network({**base, "federated": {**(base.get("federated") or {}), "method": method}})
    unknown = [loss for loss in losses if loss not in LOSSES]
    if unknown:
        raise ValueError(f"Unknown loss {', '.join(unknown)}: use {', '.join(LOSSES)}.")
    results = Path(results) if results else repo_root() / "results"
    run_dir = (results / (run_name or default_run_name(load_profile(profile)["name"]))).resolve()
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    _run_baselines(profile, run_dir, dict(params or {}), log_output)  # kept when the folder has them (e.g. a chain's)
    folders = []
    for method, loss in pairs:
        folder = method if loss is None else f"{method}-{loss}"
        # a rerun resumes the sweep
        if "03_federated_training" not in run_folder.finished_notebooks(run_dir / folder):
            extra = {"method": method, **({"loss": loss} if loss else {})}
            _run_federation_notebook(profile, run_dir, run_dir / folder, {**(params or {}), **extra}, log_output)
        folders.append(folder)
    table = sweep_table(run_dir, tuple(folders))
    federations = {folder: run_dir / folder for folder in folders}
    dilution, unmeasured = read_dilution(federations), unmeasured_dilution(federations)
    if dilution or unmeasured:  # the mechanism of each swept federation side by side ("not measured": no head)
        save_table(dilution_summary(dilution, unmeasured), run_dir, "sweep_dilution", note=dilution_note(unmeasured))
    if dilution:
        save_figure(dilution_figure(dilution), run_dir, "sweep_dilution")
    save_table(table, run_dir, "sweep_methods", note="Dice (%) on each task's test split; Avg. = mean of the 7 "
               "channels. Each method trained from the same seed, data and 02 baselines (SL row).")
    _write_readme(run_dir)
    return run_dir


def _run_federation_notebook(profile: str, run_dir: Path, folder: Path, params: dict[str, Any],
                             log_output: bool) -> Path:
    """03 alone into `folder` (a sub-run of `run_dir`: `run_folder.link_baselines`), reading 01's cases and 02's SL
    test metrics from `run_dir`. Its second
    federation (`compare_loss`) is off unless `params` asks: the experiments say which federations they run."""
    params = {"compare_loss": "", **params}
    run_folder.link_baselines(folder, run_dir)  # 01's cases and 02's SL scores read from run_dir, not copied
    return run_chain(profile, run_name=folder.name, params=params, only="03", results=folder.parent,
                     notebooks=CHAIN, log_output=log_output)


def _run_baselines(profile: str, run_dir: Path, params: dict[str, Any], log_output: bool) -> None:
    """01 and 02 into `run_dir` unless they already finished there; an interrupted one runs again (its
    training resumes from its last checkpoint)."""
    for name in CHAIN[:2]:
        if name not in run_folder.finished_notebooks(run_dir):
            run_chain(profile, run_name=run_dir.name, params=params, only=name, results=run_dir.parent,
                      notebooks=CHAIN, log_output=log_output)


def run_nodes(profile: str = "laptop", nodes: tuple[int, ...] = (2, 3, 4), *, run_name: str | None = None,
              params: dict[str, Any] | None = None, results: str | Path | None = None, n_boot: int = 2000,
              log_output: bool = False) -> Path:
    """SegViz's node-set experiment (`fedseg.experiments.nodes`) into one run folder, resuming whatever it
    already holds.

    01 and 02 once (kept if the folder has them, e.g. a sweep's); per node set, the central model on its pooled
    data and 03 with `method` fedavg and segviz on its clients into `<run>/nodes-<n>/`; then every model on
    BTCV: `metrics/segviz_nodes_per_case.csv`, `metrics/segviz_nodes_summary.csv` (bootstrap CIs),
    `tables/segviz_nodes.*` and `figures/segviz_nodes.png`, with the wall time of each step in
    `metrics/segviz_nodes_time.csv`.
    """
    nodes = node_sets.check_nodes(nodes)
    params = dict(params or {})
    results = Path(results) if results else repo_root() / "results"
    run_dir = (results / (run_name or default_run_name(load_profile(profile)["name"]))).resolve()
    _run_baselines(profile, run_dir, params, log_output)
    cfg = resolve(profile, params.get("seed"), params.get("data_root"))
    cfg["run_dir"] = str(run_dir)
    cases = run_folder.read_cases(run_dir)
    timing_file = run_folder.metrics_file(run_dir, "segviz_nodes_time.csv")
    timing = pd.read_csv(timing_file).to_dict("records") if timing_file.exists() else []
    done = {(t["setup"], t["model"]) for t in timing}

    def timed(setup: str, model: str, step) -> None:
        start = time.perf_counter()
        step()
        timing.append({"setup": setup, "model": model, "wall_s": round(time.perf_counter() - start, 1)})
        timing_file.parent.mkdir(exist_ok=True)
        pd.DataFrame(timing).to_csv(timing_file, index=False)

    for n in nodes:
        setup = node_sets.setup_name(n)
        if not node_sets.central_checkpoint(run_dir, n).exists():
            timed(setup, node_sets.CENTRAL, lambda: node_sets.train_central(cfg, run_dir, cases, n))
        for row, method in node_sets.FL_ROWS.items():
            folder = node_sets.federation_dir(run_dir, n, method)
            if node_sets.finished_federation(folder):
                if (setup, row) not in done:
                    wall = (json.loads(run_folder.run_record(folder).read_text())
                            ["notebooks"]["03_federated_training"]["wall_s"])
                    timing.append({"setup": setup, "model": row, "wall_s": wall})
                continue
            clients = ",".join(node_sets.NODE_SETS[n])
            timed(setup, row, lambda: _run_federation_notebook(profile, run_dir, folder,
                                                                {**params, "method": method, "clients": clients},
                                                                log_output))
    models = node_sets.table_models(run_dir, nodes)
    start = time.perf_counter()
    scores = node_sets.score_btcv(cfg, cases, models)
    timing.append({"setup": "all", "model": "BTCV scoring", "wall_s": round(time.perf_counter() - start, 1)})
    pd.DataFrame(timing).drop_duplicates(["setup", "model"], keep="last").to_csv(timing_file, index=False)
    scores.to_csv(run_folder.metrics_file(run_dir, "segviz_nodes_per_case.csv"), index=False)
    metrics.summarise(scores, by=("setup", "model", "organ"), n_boot=n_boot, seed=cfg["seed"]).to_csv(
        run_folder.metrics_file(run_dir, "segviz_nodes_summary.csv"), index=False)
    report.save_table(node_sets.segviz_table(scores), run_dir, "segviz_nodes", note=node_sets.NOTE)
    report.save_figure(node_sets.segviz_figure(scores), run_dir, "segviz_nodes")
    _write_readme(run_dir)
    return run_dir


def run_contrast(profile: str = "laptop", mri_like: tuple[str, ...] | None = None,
                 methods: tuple[str, ...] = ("fedavg", "fedgin"), *, run_name: str | None = None,
                 params: dict[str, Any] | None = None, results: str | Path | None = None,
                 log_output: bool = False) -> Path:
    """FedGIN's cross-contrast experiment (`fedseg.experiments.contrast`) into one run folder, resuming what it holds.

    The profile with `mri_like` clients (default `contrast.DEFAULT_MRI_LIKE`) MRI-like is written to
    `<run>/profile.yaml`; 01 and 02 run on it once, then 03 per method into `<run>/<method>/`; then SL, FL
    global and FL local models are tested on every test case in both contrasts: `metrics/contrast_per_case.csv`,
    `tables/contrast_channels.*`, `tables/contrast_summary.*`, `figures/contrast_channels.png`.
    """
    for method in methods:
        check_method(method)
    mri_like = tuple(mri_like or contrast.DEFAULT_MRI_LIKE)
    params = dict(params or {})
    results = Path(results) if results else repo_root() / "results"
    base = load_profile(profile)
    derived = contrast.contrast_profile(base, mri_like)
    run_dir = (results / (run_name or default_run_name(derived["name"]))).resolve()

    def other_clients(written: Any) -> str | None:
        earlier = written["data"]["phantom"]["mri_like"]
        if earlier != sorted(mri_like):
            return f"{run_dir} was run with mri_like {earlier}, not {sorted(mri_like)}: choose another --run-name."
        return None

    profile_path = write_profile_once(run_dir, derived, other_clients, f"Run folder {run_dir}")
    _run_baselines(str(profile_path), run_dir, params, log_output)
    for method in methods:
        folder = run_dir / method
        if run_folder.FEDERATED not in run_folder.finished_notebooks(folder):
            _run_federation_notebook(str(profile_path), run_dir, folder, {**params, "method": method}, log_output)
    cfg = resolve(str(profile_path), params.get("seed"))
    cases = run_folder.read_cases(run_dir)
    start = time.perf_counter()
    roots = contrast.test_roots(derived, cfg["seed"])
    contrast.check_same_cases(cases, roots)
    checkpoints = {f"sl-{d}": run_folder.checkpoint(run_dir, f"sl-{d}") for d in TRAIN_DATASETS}
    rows = {"SL": {d: f"sl-{d}" for d in TRAIN_DATASETS}}
    for method in methods:
        checkpoints[f"{method}-global"] = run_folder.checkpoint(run_dir / method, "fl-global")
        checkpoints.update({f"{method}-local-{d}": run_folder.checkpoint(run_dir / method, f"fl-local-{d}")
                            for d in TRAIN_DATASETS})
        rows[f"{method}: FL global model"] = {d: f"{method}-global" for d in TRAIN_DATASETS}
        rows[f"{method}: FL local model"] = {d: f"{method}-local-{d}" for d in TRAIN_DATASETS}
    scores = contrast.score_contrasts(cfg, cases, checkpoints, roots)
    scores.to_csv(run_folder.metrics_file(run_dir, "contrast_per_case.csv"), index=False)
    # the work outside the notebooks (both contrasts' test data, every model on them), for the study's cost
    pd.DataFrame([{"step": "test data and scoring", "wall_s": round(time.perf_counter() - start, 1)}]).to_csv(
        run_folder.metrics_file(run_dir, "contrast_time.csv"), index=False)
    channels = contrast.channel_table(scores, rows)
    note = f"MRI-like clients: {', '.join(sorted(mri_like))}; the others CT. " + contrast.NOTE
    report.save_table(channels, run_dir, "contrast_channels", note=note)
    report.save_table(contrast.contrast_summary(channels, mri_like), run_dir, "contrast_summary", note=note)
    report.save_figure(contrast.contrast_figure(channels, mri_like), run_dir, "contrast_channels")
    _write_readme(run_dir)
    return run_dir
