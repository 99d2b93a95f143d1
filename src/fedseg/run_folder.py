"""The run folder: the one contract between the notebooks, and where every artifact of a run lives.

Notebooks talk to each other only through files in a run's folder; each artifact has one function here that
names its path, and `require` says, once, which notebook makes a file that is missing::

    <run_dir>/
      run.json, README.md          what ran, with what, and what it cost (`fedseg.run`)
      data/cases.csv               the cases the run uses, with their split (01); data/data.json: 01's summary
      checkpoints/<model>/best.pt  each model's best checkpoint (final.pt: the federation's last round); models
                                   sl-<dataset>, central, localiser (02), fl-global, fl-local-<dataset> (03)
      metrics/*.csv                per-case and per-round numbers (02-04)
      models/baselines.json        02's loss and checkpoints
      tables/<name>.csv|.md        the tables (02-05)
      figures/<name>.png           the figures (02-05)
      predictions/btcv/<method>/   04's BTCV label maps; predictions/own/<model>/: `fedseg predict`
      fl/                          the federation's own files (03): config.json, cases.csv, status.json,
                                   state.pt (to resume), summary.json, <client>/ (each client's local best)
      loss-<loss>/                 03's compared federation (compare_loss), a run folder of its own
      baselines.json               in a sub-run (a sweep's `<method>-<loss>/`): the run whose 01 and 02 it reads
                                   (`link_baselines`, `baselines_dir`), instead of copies of their files

This module imports nothing of fedseg, so every layer can use it.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

#: The notebook that makes each kind of artifact (for the "missing: run ... first" message).
DATA_PREP, BASELINES, FEDERATED, EXTERNAL, FIGURES = (
    "01_data_prep", "02_standalone_baselines", "03_federated_training", "04_external_evaluation", "05_figures")
#: A model folder's best checkpoint and (a federation's) last round's.
BEST, FINAL = "best.pt", "final.pt"
#: The model folder of the coarse-to-fine localiser (02).
LOCALISER = "localiser"
#: The notebook that trains each model folder under checkpoints/ (by prefix).
MODEL_NOTEBOOK = {"sl-": BASELINES, "central": BASELINES, LOCALISER: BASELINES, "fl-": FEDERATED}


#: In a sub-run (a sweep's or a study's federation), the file naming the run whose 01 and 02 it uses.
BASELINES_LINK = "baselines.json"


def link_baselines(folder: str | Path, run_dir: str | Path) -> Path:
    """Make `folder` a sub-run of `run_dir`: it reads `run_dir`'s cases (01) and SL scores (02) through
    `baselines_dir`, not copies of them. The link is relative, so the two folders move together."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BASELINES_LINK
    path.write_text(json.dumps({"run": os.path.relpath(Path(run_dir).resolve(), folder.resolve())}) + "\n")
    return path


def baselines_dir(run_dir: str | Path) -> Path:
    """The run folder holding this run's 01 and 02 outputs: `run_dir` itself, or the run its `baselines.json`
    names (`link_baselines`)."""
    run_dir = Path(run_dir)
    link = run_dir / BASELINES_LINK
    if link.is_file():
        return (run_dir / json.loads(link.read_text())["run"]).resolve()
    return run_dir


def cases_file(run_dir: str | Path) -> Path:
    """`data/cases.csv`: the cases the run uses (01), read by every later notebook (a sub-run's: its baselines')."""
    return baselines_dir(run_dir) / "data" / "cases.csv"


def sl_metrics_file(run_dir: str | Path, name: str) -> Path:
    """02's score file `name` (test_dice_per_case.csv, test_dice_per_channel.csv) for this run: its own, or for a
    sub-run its baselines' (`baselines_dir`)."""
    return metrics_file(baselines_dir(run_dir), name)


def data_summary(run_dir: str | Path) -> Path:
    """`data/data.json`: 01's summary (data root, profile, counts)."""
    return Path(run_dir) / "data" / "data.json"


def baselines_file(run_dir: str | Path) -> Path:
    """`models/baselines.json`: the loss and checkpoints 02 trained."""
    return Path(run_dir) / "models" / "baselines.json"


def compared_run_dir(run_dir: str | Path, loss: str) -> Path:
    """`loss-<loss>/`: the run folder of 03's second federation, trained with the compared loss."""
    return Path(run_dir) / f"loss-{loss}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def model_dir(run_dir: str | Path, model: str) -> Path:
    """`checkpoints/<model>/`: e.g. sl-liver, central, localiser, fl-global, fl-local-spleen."""
    return checkpoints_dir(run_dir) / model


def checkpoint(run_dir: str | Path, model: str, which: str = "best") -> Path:
    """`checkpoints/<model>/<which>.pt` (which: best, or final for the federation's last round)."""
    return model_dir(run_dir, model) / {"best": BEST, "final": FINAL}[which]


def run_dir_of(checkpoint_path: str | Path) -> Path | None:
    """The run folder a `checkpoints/<model>/<file>.pt` lies in, None for a checkpoint outside one."""
    folder = Path(checkpoint_path).parent
    return folder.parent.parent if folder.parent.name == "checkpoints" else None


def model_groups(run_dir: str | Path, datasets: Sequence[str]) -> dict[str, dict[str, Path]]:
    """Where a run keeps each group of best checkpoints, whether or not they exist: "sl" and "fl-local" (dataset ->
    path, one per training dataset in `datasets`), "fl-global" and "central" (one path under key "model")."""
    groups = {group: {d: checkpoint(run_dir, f"{prefix}{d}") for d in datasets}
              for group, prefix in (("sl", "sl-"), ("fl-local", "fl-local-"))}
    groups.update({model: {"model": checkpoint(run_dir, model)} for model in ("fl-global", "central")})
    return groups


def trained_groups(run_dir: str | Path, datasets: Sequence[str]) -> dict[str, dict[str, Path]]:
    """The groups of `model_groups` a run holds: a group counts only when every checkpoint of it is on disk (a client
    group, one for each of `datasets`)."""
    return {group: paths for group, paths in model_groups(run_dir, datasets).items()
            if paths and all(p.exists() for p in paths.values())}


def metrics_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics"


def metrics_file(run_dir: str | Path, name: str) -> Path:
    """`metrics/<name>` (name with its suffix, e.g. fl_rounds.csv)."""
    return metrics_dir(run_dir) / name


def dilution_not_measured(run_dir: str | Path) -> Path:
    """`metrics/fl_dilution_not_measured.txt`: why a federation measured no dilution (its network has no output
    layer of its own, `models.output_layer`), written instead of `metrics/fl_dilution.csv`."""
    return metrics_file(run_dir, "fl_dilution_not_measured.txt")


def tables_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tables"


def table_file(run_dir: str | Path, name: str, suffix: str = ".csv") -> Path:
    """`tables/<name><suffix>` (.csv or .md)."""
    return tables_dir(run_dir) / f"{name}{suffix}"


def figures_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "figures"


def figure_file(run_dir: str | Path, name: str) -> Path:
    """`figures/<name>.png`."""
    return figures_dir(run_dir) / f"{name}.png"


def predictions_dir(run_dir: str | Path, *parts: str) -> Path:
    """`predictions/<parts...>`: btcv/<method> (04), own/<model> (`fedseg predict`)."""
    return Path(run_dir).joinpath("predictions", *parts)


def fl_dir(run_dir: str | Path) -> Path:
    """`fl/`: the federation's own files."""
    return Path(run_dir) / "fl"


def fl_file(run_dir: str | Path, name: str) -> Path:
    """`fl/<name>`; the named ones below are the federation's files."""
    return fl_dir(run_dir) / name


def fl_config(run_dir: str | Path) -> Path:
    """`fl/config.json`: the federation's resolved configuration (03)."""
    return fl_file(run_dir, "config.json")


def fl_cases(run_dir: str | Path) -> Path:
    """`fl/cases.csv`: the cases table every client of a simulated federation reads."""
    return fl_file(run_dir, "cases.csv")


def fl_status(run_dir: str | Path) -> Path:
    """`fl/status.json`: running, finished, or failed with the reason."""
    return fl_file(run_dir, "status.json")


def fl_state(run_dir: str | Path) -> Path:
    """`fl/state.pt`: the server's state after its last finished round (to resume)."""
    return fl_file(run_dir, "state.pt")


def fl_summary(run_dir: str | Path) -> Path:
    """`fl/summary.json`: best round and metric, seconds; written when the federation finished."""
    return fl_file(run_dir, "summary.json")


def federation_config(run_dir: str | Path) -> dict | None:
    """The federation's resolved configuration (`fl/config.json`, written by the ServerApp), None when it has none."""
    path = fl_config(run_dir)
    return json.loads(path.read_text()) if path.exists() else None


def federation_id(run_dir: str | Path) -> str | None:
    """The id of the run's finished federation (`fl/summary.json`), None before one finished (or from before ids)."""
    path = fl_summary(run_dir)
    return json.loads(path.read_text()).get("federation_id") if path.exists() else None


def localiser_record_file(run_dir: str | Path) -> Path:
    """`checkpoints/localiser/localiser.json`: the settings the coarse-to-fine localiser was trained under (02)."""
    return model_dir(run_dir, LOCALISER) / "localiser.json"


def localiser_record(run_dir: str | Path) -> dict | None:
    """The run's localiser record (`localiser_record_file`) when the run has a trained localiser, else None; a
    localiser checkpoint without its record is refused, naming 02."""
    if not checkpoint(run_dir, LOCALISER).exists():
        return None
    return json.loads(require(localiser_record_file(run_dir), BASELINES, run_dir).read_text())


# A federation's status (fl/status.json): written by the ServerApp, read by every stage after it

def write_federation_status(run_dir: str | Path, status: str, reason: str = "") -> None:
    """`<run_dir>/fl/status.json`: running, finished or failed (with the reason), written atomically."""
    path = fl_status(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "reason": reason[:4000],
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _status_record(run_dir: str | Path) -> dict | None:
    """`fl/status.json` as written by `write_federation_status`, None when the folder has none."""
    path = fl_status(run_dir)
    return json.loads(path.read_text()) if path.exists() else None


def federation_status(run_dir: str | Path) -> str | None:
    """The federation's status in `run_dir` (running, finished, failed), None when it has none."""
    record = _status_record(run_dir)
    return record.get("status") if record else None


def refuse_finished_federation(run_dir: str | Path, overwrite: bool) -> None:
    """A finished federation is never replaced silently (by `flwr run` or a notebook): refuse it unless asked."""
    if federation_status(run_dir) == "finished" and not overwrite:
        raise FileExistsError(f"{Path(run_dir)} holds a finished federation ({fl_status(run_dir)}): choose another "
                              "run folder, or replace it with --run-config 'overwrite=true' (flwr run), "
                              "overwrite=True (notebook 03, run_federation) or --overwrite (fedseg run).")


def require_finished_federation(run_dir: str | Path) -> None:
    """Refuse to evaluate a federation that did not finish: its folder holds the rounds and bests it reached,
    which look like a finished run's. A folder without a status (made before it was written) passes."""
    record = _status_record(run_dir)
    if record is None:
        return
    if record.get("status") != "finished":
        why = f": {record['reason']}" if record.get("reason") else ""
        raise RuntimeError(f"The federation in {Path(run_dir)} is {record.get('status')} ({fl_status(run_dir)}){why}. "
                           "Its checkpoints are those of an unfinished run: rerun 03 into this folder (--only 03) "
                           "before evaluating it.")


def client_dir(run_dir: str | Path, client: str) -> Path:
    """`fl/<client>/`: a client's own training state between rounds."""
    return fl_file(run_dir, client)


def pseudo_dir(run_dir: str | Path, client: str) -> Path:
    """`fl/<client>/pseudo/`: the `pseudo` method's completed training targets of the current round."""
    return client_dir(run_dir, client) / "pseudo"


def require(path: str | Path, notebook: str, run_dir: str | Path | None = None) -> Path:
    """`path`, or FileNotFoundError naming the notebook that makes it and how to run it into this run folder."""
    path = Path(path)
    if not path.exists():
        how = f" (python -m fedseg run --only {notebook[:2]} --run-name {Path(run_dir).name})" if run_dir else ""
        raise FileNotFoundError(f"{path} is missing: run {notebook} with this run_dir first{how}.")
    return path


def model_notebook(model: str) -> str:
    """The notebook that trains the model folder `model` (sl-liver -> 02, fl-global -> 03)."""
    return next(notebook for prefix, notebook in MODEL_NOTEBOOK.items() if model.startswith(prefix))


def read_cases(run_dir: str | Path) -> pd.DataFrame:
    """`data/cases.csv` as a DataFrame; refused, naming 01, when the run has none."""
    return pd.read_csv(require(cases_file(run_dir), DATA_PREP, run_dir))


def run_record(run_dir: str | Path) -> Path:
    """`run.json`: what ran, with what, and what it cost (rewritten after every notebook)."""
    return Path(run_dir) / "run.json"


def finished_notebooks(run_dir: str | Path) -> set[str]:
    """The notebooks that ran to the end in `run_dir` (its run.json)."""
    record = run_record(run_dir)
    if not record.exists():
        return set()
    return {name for name, entry in json.loads(record.read_text()).get("notebooks", {}).items()
            if entry.get("status") == "ok"}
