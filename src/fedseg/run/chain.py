"""The papermill chain: the notebooks 01-05 executed in order into a run folder.

A run executes the numbered notebooks in order into `results/<run-name>/`, passing each the same
`profile`, `run_dir`, `data_root` and `seed`. Notebooks talk to each other only through files in that
folder. `run.json` records what ran, with what, and what it cost, and is rewritten after every notebook
so an interrupted run keeps its record.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fedseg import run_folder
from fedseg.config import PROFILE_FILE, git_commit, notebooks_dir, project_env, repo_root, resolve
from fedseg.data import phantom
from fedseg.reporting.readme import results_readme
from fedseg.run.notebook import check_parameters
from fedseg.run.provenance import PeakMemory, _now, _write_json, host_record, package_versions

#: The chain, in order.
CHAIN: tuple[str, ...] = ("01_data_prep", "02_standalone_baselines", "03_federated_training", "04_external_evaluation",
                          "05_figures")


class ChainError(RuntimeError):
    """A notebook of the chain failed; the message names the notebook, the cell and the kept output."""


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
