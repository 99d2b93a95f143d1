"""The papermill chain and the studies built on it (sweep, node sets, contrast, budget); `python -m fedseg` is its
command line. Profiles and the project a run works in are `fedseg.config`.

A run executes the numbered notebooks in order into `results/<run-name>/`, passing each the same
`profile`, `run_dir`, `data_root` and `seed`. Notebooks talk to each other only through files in that
folder. `run.json` records what ran, with what, and what it cost, and is rewritten after every notebook
so an interrupted run keeps its record.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import difflib
import json
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from fedseg import run_folder
from fedseg.config import (
    PROFILE_FILE,
    git_commit,
    load_profile,
    notebooks_dir,
    project_env,
    repo_root,
    resolve,
)
from fedseg.data import phantom
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.evaluate import metrics
from fedseg.experiments import budget, contrast
from fedseg.experiments import nodes as node_sets
from fedseg.federated.methods import check_method, check_network
from fedseg.predict import predict, volume_table
from fedseg.reporting import budget as budget_report
from fedseg.reporting import report
from fedseg.reporting.readme import results_readme
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
from fedseg.train.losses import LOSSES

#: The chain, in order.
CHAIN: tuple[str, ...] = ("01_data_prep", "02_standalone_baselines", "03_federated_training", "04_external_evaluation",
                          "05_figures")
VERSIONED_PACKAGES = (
    "fedseg", "torch", "monai", "flwr", "numpy", "nibabel", "pandas", "papermill", "matplotlib", "ray",
)


class ChainError(RuntimeError):
    """A notebook of the chain failed; the message names the notebook, the cell and the kept output."""

def notebook_setup(profile: str, run_dir: str | Path | None, data_root: str | Path | None,
                   seed: int | None) -> dict[str, Any]:
    """What each notebook's second cell calls: resolves its parameters and makes its run folder.

    Run alone in JupyterLab (run_dir None), a notebook works in `results/lab-<profile>`, which later
    notebooks opened the same way find again. Run by papermill, a parameter the notebook does not declare is
    refused (`refuse_injected_unknown`).
    """
    refuse_injected_unknown()
    cfg = resolve(profile, seed, data_root)
    run_dir = Path(run_dir) if run_dir else repo_root() / "results" / f"lab-{cfg['name']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.figures_dir(run_dir).mkdir(exist_ok=True)
    cfg["run_dir"] = str(run_dir.resolve())
    return cfg


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_record() -> dict[str, Any]:
    """What a run's numbers depend on beyond the code and settings: the CPU, the thread counts the
    notebooks' kernels inherit (OMP/MKL variables; torch's own default is the number of cores) and
    torch's deterministic settings. Float sums in convolutions differ with the thread count, so two
    machines agree to rounding, not bit for bit (see the README's reproducibility section)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def portable(value: Any, run_dir: Path) -> Any:
    """`value` with this machine's absolute paths replaced by placeholders (`<run_dir>`, `<repo>`,
    `<home>`), so a committed run.json names no machine's folders."""
    if isinstance(value, dict):
        return {k: portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, run_dir) for v in value]
    if isinstance(value, str):
        for path, name in ((str(run_dir), "<run_dir>"), (str(repo_root()), "<repo>"), (str(Path.home()), "<home>")):
            if path and path != "/":
                value = value.replace(path, name)
    return value


class PeakMemory:
    """Samples the resident memory of a process tree (the notebook's kernel and its children)."""
    def __init__(self, interval: float = 0.25):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._root = psutil.Process()

    def _tree_rss(self) -> int:
        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(portable(record, path.parent.resolve()), indent=2, default=str))
    os.replace(tmp, path)


def default_run_name(profile_name: str) -> str:
    """A new run's folder name when none is given: `<profile>-<timestamp>`."""
    return f"{profile_name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(results: Path, run_name: str | None, profile: str, overwrite: bool, only: str | None) -> Path:
    """The run folder; an earlier run's folder is never overwritten unless asked. With `only` (one notebook
    rerun into it) the folder is kept, since that notebook reads the earlier ones' files; `run_chain` passes
    `overwrite` on to a notebook that has that parameter (03: replace its finished federation)."""
    run_dir = results / (run_name or default_run_name(profile))
    if run_dir.exists() and any(p.name != PROFILE_FILE for p in run_dir.iterdir()):
        if overwrite and not only:
            shutil.rmtree(run_dir)
        elif not only:
            raise FileExistsError(
                f"Run folder {run_dir} already holds a run: choose another --run-name, rerun one notebook "
                "into it with --only NAME, or pass --overwrite to replace it."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _unknown_parameters(unknown: Sequence[str], known: set[str], where: str) -> ValueError:
    """The refusal of `unknown` parameters, each with the closest of `known` (difflib)."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"Unknown parameter {', '.join(hints)}: {where} take {', '.join(sorted(known))}.")


def check_parameters(params: Mapping[str, Any], notebooks: Sequence[str]) -> None:
    """Refuse a parameter that none of `notebooks` has (papermill would only warn and run with the default),
    naming the closest parameter they do have."""
    import papermill as pm

    known: set[str] = {"seed", "data_root"}
    for name in notebooks:
        known |= set(pm.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb")))
    unknown = sorted(set(params) - known)
    if unknown:
        raise _unknown_parameters(unknown, known, ", ".join(notebooks))


def _assigned(source: str) -> list[str]:
    """The names a cell assigns at its top level, in order (a parameters cell, or papermill's injected one)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def injected_unknown(history: Sequence[str]) -> tuple[list[str], set[str]]:
    """The parameters papermill injected that the notebook does not declare, and those it declares, from the
    cells a kernel executed (`In`): papermill's cell starts with "# Parameters" and runs right after the cell
    tagged parameters. ([], set()) when nothing was injected (JupyterLab)."""
    for index in range(len(history) - 1, 0, -1):
        if history[index].lstrip().startswith("# Parameters"):
            declared = set(_assigned(history[index - 1]))
            return [name for name in _assigned(history[index]) if name not in declared], declared
    return [], set()


def refuse_injected_unknown() -> None:
    """In a notebook run by papermill by hand (`papermill ... -p stepz 5`), refuse a parameter the notebook
    does not declare: papermill only warns and the notebook would run with its default."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    unknown, declared = injected_unknown(shell.user_ns.get("In", []))
    if unknown:
        raise _unknown_parameters(unknown, declared, "this notebook's parameters (its cell tagged parameters)")


def run_chain(profile: str = "laptop", *, run_name: str | None = None, params: dict[str, Any] | None = None,
              only: str | None = None, overwrite: bool = False, results: str | Path | None = None,
              notebooks: tuple[str, ...] = CHAIN, log_output: bool = False) -> Path:
    """Execute the chain (or one notebook) with papermill into a run folder; returns that folder."""
    import papermill as pm

    params = dict(params or {})
    names = notebooks
    if only:
        stem = Path(only).stem
        matches = [n for n in notebooks if n == stem or n.split("_", 1)[-1] == stem or n.startswith(stem + "_")]
        if len(matches) != 1:
            raise ValueError(f"--only {only!r} names no single notebook of the chain: "
                             f"use one of {', '.join(notebooks)}.")
        names = tuple(matches)
    check_parameters(params, notebooks)  # a parameter of any notebook of the chain (sweeps pass 02 and 03 theirs)
    seed = params.pop("seed", None)
    data_root = params.pop("data_root", None)
    cfg = resolve(profile, seed, data_root)
    results = Path(results) if results else repo_root() / "results"
    run_dir = new_run_dir(results, run_name, cfg["name"], overwrite, only).resolve()
    record_path = run_folder.run_record(run_dir)
    record = json.loads(record_path.read_text()) if record_path.exists() else {"notebooks": {}}
    record.update({
        "profile": cfg["name"], "profile_config": cfg, "seed": cfg["seed"], "data_root": cfg["data_root"],
        "parameters": params, "versions": package_versions(), "git": git_commit(),
        "host": host_record(),
        "status": "running", "started": _now(), "ended": None,
    })
    _write_json(record_path, record)
    print(f"fedseg: writing {run_dir} (project {repo_root()}; data {cfg['data_root']})", flush=True)
    with project_env():  # the kernels find this project's data and cache wherever the run folder is
        for name in names:
            source = notebooks_dir() / f"{name}.ipynb"
            output = run_dir / f"{name}.ipynb"
            # data_root stays None unless given: each notebook then resolves the same synthetic root itself
            nb_params = {"profile": profile, "run_dir": str(run_dir), "data_root": data_root,
                         "seed": cfg["seed"], **params}
            declared = pm.inspect_notebook(str(source))
            if "interactive" in declared:
                # a browser viewer would wait for ever under papermill (itkwidgets): off unless asked
                nb_params.setdefault("interactive", False)
            if overwrite and "overwrite" in declared:
                nb_params.setdefault("overwrite", True)
            # each notebook gets only the parameters it declares (the chain's were checked against all of them)
            nb_params = {key: value for key, value in nb_params.items() if key in declared}
            entry = {"status": "running", "started": _now(), "parameters": nb_params}
            record["notebooks"][name] = entry
            _write_json(record_path, record)
            t0 = time.perf_counter()
            error = None
            with PeakMemory() as memory:
                try:
                    pm.execute_notebook(str(source), str(output), parameters=nb_params, cwd=str(run_dir),
                                        kernel_name="python3", progress_bar=sys.stderr.isatty(),
                                        log_output=log_output, report_mode=False)
                except pm.PapermillExecutionError as exc:
                    error = (f"Notebook {name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                             f"{exc.ename}: {exc.evalue}. The executed notebook is kept at {output}.")
                except Exception as exc:  # kernel died, missing notebook, ...: still recorded, then re-raised
                    error = f"Notebook {name} could not run: {type(exc).__name__}: {exc}. Output (if any): {output}."
            entry.update({"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(memory.peak / 2**20, 1),
                          "ended": _now(), "status": "failed" if error else "ok"})
            if error:
                entry["error"] = error
                record.update({"status": "failed", "ended": _now()})
                _write_json(record_path, record)
                _write_readme(run_dir)
                raise ChainError(error)
            record["phantom"] = phantom.generation(cfg["data_root"])  # the generator behind synthetic data (01)
            _write_json(record_path, record)
    record.update({"status": "ok", "ended": _now()})
    record["wall_s"] = round(sum(e.get("wall_s", 0) for e in record["notebooks"].values()), 2)
    record["peak_rss_mb"] = max((e.get("peak_rss_mb", 0) for e in record["notebooks"].values()), default=0)
    _write_json(record_path, record)
    _write_readme(run_dir)
    return run_dir


def _write_readme(run_dir: Path) -> None:
    """The run's README.md from its final run.json, tables and figures (`readme.results_readme`)."""
    results_readme(run_dir)


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
    """03 alone into `folder` (a sub-run of `run_dir`), reading 01's cases and 02's SL test metrics. Its second
    federation (`compare_loss`) is off unless `params` asks: the experiments say which federations they run."""
    params = {"compare_loss": "", **params}
    run_folder.cases_file(folder).parent.mkdir(parents=True, exist_ok=True)
    run_folder.metrics_dir(folder).mkdir(exist_ok=True)
    shutil.copy(run_folder.cases_file(run_dir), run_folder.cases_file(folder))
    for name in ("test_dice_per_channel.csv", "test_dice_per_case.csv"):  # the SL row, and its cases for the claims
        shutil.copy(run_folder.metrics_file(run_dir, name), run_folder.metrics_file(folder, name))
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
    profile_path = run_dir / PROFILE_FILE
    if profile_path.exists():
        earlier = yaml.safe_load(profile_path.read_text())["data"]["phantom"]["mri_like"]
        if earlier != sorted(mri_like):
            raise ValueError(f"{run_dir} was run with mri_like {earlier}, not {sorted(mri_like)}: "
                             "choose another --run-name.")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"Run folder {run_dir} holds another run (no {PROFILE_FILE}): choose another --run-name.")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        profile_path.write_text(yaml.safe_dump(derived, sort_keys=False))
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


def _budget_point(study: Path, name: str, derived: dict[str, Any]) -> Path:
    """A budget point's folder with its derived profile written once into `profile.yaml`; a folder run with
    another profile (or holding another run) is refused, naming what differs."""
    folder = (study / name).resolve()
    path = folder / PROFILE_FILE
    if path.exists():
        differ = budget.profile_difference(yaml.safe_load(path.read_text()) or {}, derived)
        if differ:
            raise ValueError(f"{folder} was run with another profile ({'; '.join(differ[:6])}): rerun with the "
                             "settings it was run with, or choose another --run-name.")
    elif folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} holds another run (no {PROFILE_FILE}): choose another --run-name.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(derived, sort_keys=False))
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
    """SegViz's node sets into a budget point's folder, unless every piece and the scores are there already."""
    methods = node_sets.FL_ROWS.values()
    finished = run_folder.metrics_file(folder, "segviz_nodes_per_case.csv").exists() and all(
        node_sets.central_checkpoint(folder, n).exists()
        and all(node_sets.finished_federation(node_sets.federation_dir(folder, n, m)) for m in methods)
        for n in nodes)
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


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"-p {text!r}: write parameters as key=value, e.g. -p seed=1.")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _add_common(parser: argparse.ArgumentParser, run_name_help: str) -> None:
    """The options every command shares."""
    parser.add_argument("--profile", default="laptop", help="smoke, laptop (default), paper, or a YAML path")
    parser.add_argument("-p", "--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE",
                        help="notebook parameter (repeatable), e.g. -p seed=1 -p data_root=/data")
    parser.add_argument("--run-name", help=run_name_help)
    parser.add_argument("--results", help="results folder (default: results/ in the checkout)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


#: The experiments beyond the chain: how each starts from its arguments, and the table it prints at the end.
EXPERIMENTS: dict[str, tuple[Any, str, str]] = {
    "sweep": (lambda a, common: run_sweep(a.profile, _names(a.methods), losses=_names(a.losses) if a.losses else (),
                                          overwrite=a.overwrite, **common),
              "sweep_methods", "sweep {run_dir} finished"),
    "nodes": (lambda a, common: run_nodes(a.profile, tuple(int(n) for n in _names(a.nodes)), **common),
              "segviz_nodes", "SegViz node sets in {run_dir}"),
    "contrast": (lambda a, common: run_contrast(a.profile, _names(a.mri_like), _names(a.methods), **common),
                 "contrast_summary", "cross-contrast run {run_dir}"),
}


def _predict(args: argparse.Namespace) -> int:
    """`python -m fedseg predict`: `fedseg.predict.predict`, then the volumes table."""
    try:
        result = predict(args.run, args.images, args.model, out=args.out, device=args.device, profile=args.profile)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(result.volumes)} predictions (label maps, overlays, volumes.csv) in {result.out}\n"
          f"Volumes (mL):\n{volume_table(result.volumes)}")
    return 0


def _scales(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(k) for k in _names(text) if k not in ("0", "none"))


def _budget(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`python -m fedseg budget`: `run_budget`, then where its report is and each claim's line."""
    import shlex

    words = sys.argv[1:] if argv is None else argv
    try:
        fine = _scales(args.fine_scale)
        path = run_budget(args.profile, _scales(args.scales), fine_scale=fine[0] if fine else None,
                          fine_spacing=args.fine_spacing, nodes_scales=_scales(args.nodes_scales),
                          contrast_scales=_scales(args.contrast_scales), nodes=_scales(args.nodes),
                          scale_rounds=args.scale_rounds, report_only=args.report_only, run_name=args.run_name,
                          params=dict(args.param), results=args.results, log_output=args.log_output,
                          command="python -m fedseg " + " ".join(shlex.quote(w) for w in words))
    except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [line for line in path.read_text().splitlines() if line.startswith("- **")]
    print(f"budget study {path.parent}: {path.name}, budget.csv, budget.png, claims_by_scale.md\n" + "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebook chain with papermill into results/<run-name>/")
    _add_common(run, "folder name under results/ (default: <profile>-<timestamp>)")
    run.add_argument("--only", help="run one notebook of the chain (e.g. 01_data_prep or data_prep)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder of that name (with "
                     "--only: keep the folder and let that notebook replace its own results, e.g. 03's federation)")
    sweep = sub.add_parser("sweep", help="01 and 02 once, then 03 once per federated method, into one run folder")
    _add_common(sweep, "folder name under results/ (default: <profile>-<timestamp>)")
    sweep.add_argument("--methods", default="fedavg,ownerfedavg,fedprox,segviz",
                       help="comma-separated federated methods")
    sweep.add_argument("--losses", default="", help="comma-separated client losses, each method run with each "
                       "(e.g. dice_ce,literal_dice_ce); default: the profile's loss")
    sweep.add_argument("--overwrite", action="store_true", help="replace an existing run folder of that name")
    nodes = sub.add_parser("nodes", help="SegViz's 2-, 3-, 4-node table (central, FedAvg, SegViz on BTCV) into a "
                           "run folder")
    _add_common(nodes, "run folder under results/ to add to (e.g. a sweep's), or a new one")
    nodes.add_argument("--nodes", default="2,3,4", help="comma-separated node sets (2: liver, spleen; 3: + pancreas; "
                       "4: + kidney)")
    gin = sub.add_parser("contrast", help="FedGIN's cross-contrast experiment: some clients MRI-like, every model "
                         "tested in both contrasts")
    _add_common(gin, "folder name under results/ (default: <profile>-mri-<timestamp>)")
    gin.add_argument("--mri-like", default="", help="comma-separated datasets generated MRI-like "
                     "(default: liver,spleen)")
    gin.add_argument("--methods", default="fedavg,fedgin", help="comma-separated federated methods")
    bud = sub.add_parser("budget", help="the budget-response study: the chain, FedAvg with both losses and "
                         "ownerfedavg at several training budgets (and a finer voxel), SegViz's node sets and FedGIN's "
                         "contrast study at two of them; Dice and the claims against budget. Resumable")
    _add_common(bud, "study folder under results/ (default: budget-<profile>); a rerun resumes it")
    bud.add_argument("--scales", default="1,3,10", help="comma-separated budget scales: k x every training budget "
                     "of the profile (default 1,3,10)")
    bud.add_argument("--fine-scale", default="3", help="the scale also run at --fine-spacing (default 3; '' or 0: "
                     "none)")
    bud.add_argument("--fine-spacing", type=float, default=3.0, help="the finer voxel in mm (default 3.0)")
    bud.add_argument("--nodes-scales", default=None, help="scales with SegViz's node sets (default: the two "
                     "smallest; '' for none)")
    bud.add_argument("--contrast-scales", default=None, help="scales with FedGIN's contrast study (default: the two "
                     "smallest; '' for none)")
    bud.add_argument("--nodes", default="2,3,4", help="the node sets of `nodes` (default 2,3,4)")
    bud.add_argument("--scale-rounds", action="store_true", help="scale the FL rounds with the budget and keep the "
                     "local steps (default: keep the rounds, scale the local steps)")
    bud.add_argument("--report-only", action="store_true", help="only rebuild the report from the study folder")
    pred = sub.add_parser("predict", help="apply a trained run's model to your own CT (a folder of NIfTI): label "
                          "maps, overlays and organ volumes, with 04's preprocessing and inversion")
    pred.add_argument("--run", required=True, help="the run's folder, e.g. results/<run-name> (its checkpoints/)")
    pred.add_argument("--model", default="fl-local-ensemble", help="fl-local-ensemble (default), fl-local-processed, "
                      "fl-global, sl-ensemble, sl-processed or central (those the run has)")
    pred.add_argument("--images", required=True, help="folder of 3D CT volumes (*.nii.gz, *.nii)")
    pred.add_argument("--out", help="output folder (default: <run>/predictions/own/<model>/)")
    pred.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (default: CUDA when present)")
    pred.add_argument("--profile", help="the profile the run was trained with, only for a folder without run.json")
    args = parser.parse_args(argv)
    if args.command == "predict":
        return _predict(args)
    if args.command == "budget":
        return _budget(args, argv)
    if args.command in EXPERIMENTS:
        start, table, title = EXPERIMENTS[args.command]
        common = {"run_name": args.run_name, "params": dict(args.param), "results": args.results,
                  "log_output": args.log_output}
        try:
            run_dir = start(args, common)
        except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{title.format(run_dir=run_dir)}:\n{(run_dir / 'tables' / f'{table}.md').read_text()}")
        return 0
    try:
        run_dir = run_chain(args.profile, run_name=args.run_name, params=dict(args.param), only=args.only,
                            overwrite=args.overwrite, results=args.results, log_output=args.log_output)
    except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record = json.loads(run_folder.run_record(run_dir).read_text())
    print(f"run {run_dir} finished in {record['wall_s']} s (peak memory {record['peak_rss_mb']} MB)")
    for name, entry in record["notebooks"].items():
        print(f"  {name:28s} {entry['status']:6s} {entry['wall_s']:8.1f} s {entry['peak_rss_mb']:9.1f} MB")
    return 0
