"""The study's Flower App run by Flower's simulation engine from Python (a notebook), not `flwr run`.

`run_simulation` takes no run_config, so `simulation_apps` wraps the very same handlers of
`client_app` / `server_app` and hands them a Context whose run_config carries the resolved profile
(`study-config`, JSON), the cases table and the client list (docs/flower.md). The wrappers are closures,
which Ray pickles by value, so the configuration reaches every client actor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedseg import run_folder
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.federated import client_app, server_app, sites, task


def _with_run_config(context: Context, run_config: dict[str, Any]) -> Context:
    """The same node and state (so state persists across rounds), with the study's run_config."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **run_config})


def simulation_apps(run_config: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp of the study that see `run_config` as if it came from `flwr run`."""
    client = ClientApp()

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return client_app.query(msg, _with_run_config(context, run_config))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return client_app.train(msg, _with_run_config(context, run_config))

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return client_app.evaluate(msg, _with_run_config(context, run_config))

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        server_app.main(grid, _with_run_config(context, run_config))

    return server, client


def run_federation(cfg: dict[str, Any], run_dir: str | Path, cases: pd.DataFrame | None = None,
                   clients: Sequence[str] = TRAIN_DATASETS, progress: bool = True, shards: int | str = 1,
                   overwrite: bool = False) -> dict[str, Any]:
    """Conventional FL (FedAvg) of `clients` (one dataset each) in Flower's simulation engine.

    `shards` splits each dataset's training cases into that many virtual clients (an int, or per dataset
    "liver=5,spleen=2"; see `sites.client_list`), e.g. 16 virtual clients from four datasets.
    Knobs come from `cfg["federated"]` (see `task.FL_DEFAULTS`); `min_clients` is set to the client count.
    `cases` (default `<run_dir>/data/cases.csv`, else the data root's manifest) is copied to
    `<run_dir>/fl/cases.csv`, which every client reads. Raises if any client fails in any round.
    A finished federation in `run_dir` is refused unless `overwrite`; an unfinished one with the same settings
    resumes after its last finished round (`server_app.main`).
    Returns the paths of the global best / final and local best checkpoints, the rounds table
    (`metrics/fl_rounds.csv`) and the summary (best round and metric, seconds).
    """
    from flwr.simulation import run_simulation

    run_dir = Path(run_dir).resolve()
    names = sites.client_list({"clients": ",".join(clients), "shards": shards})  # checks the names
    cfg = copy.deepcopy(cfg)
    cfg["run_dir"] = str(run_dir)
    cfg["federated"] = {**(cfg.get("federated") or {}), "min_clients": len(names)}
    fl = task.federated_settings(cfg)
    cfg["federated"] = fl
    task.refuse_finished(run_dir, overwrite)
    run_folder.fl_dir(run_dir).mkdir(parents=True, exist_ok=True)
    cases = cases if cases is not None else task.load_cases(cfg, {})
    cases_file = run_folder.fl_cases(run_dir)
    cases.to_csv(cases_file, index=False)
    summary_file = run_folder.fl_summary(run_dir)

    run_config = {"study-config": json.dumps(cfg, default=str), "cases": str(cases_file),
                  "clients": ",".join(clients), "shards": str(shards), "progress": bool(progress),
                  "overwrite": bool(overwrite)}
    server, client = simulation_apps(run_config)
    run_simulation(server_app=server, client_app=client, num_supernodes=len(names),
                   backend_config={"client_resources": {"num_cpus": fl["client_cpus"], "num_gpus": fl["client_gpus"]}})
    if not summary_file.exists():  # the ServerApp's errors are re-raised above; this catches any other way out
        raise RuntimeError(f"The federation ended without writing {summary_file}: see the log above.")
    summary = json.loads(summary_file.read_text())
    return {**summary, "rounds": pd.read_csv(summary["rounds_csv"]),
            "local_best": {name: str(task.local_best_path(run_dir, name)) for name in names}}
