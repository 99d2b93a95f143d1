"""The study's Flower App run by Flower's simulation engine from Python (a notebook), not `flwr run`.

`run_simulation` takes no run_config, so `simulation_apps` wraps the very same handlers of
`client_app` / `server_app` and hands them a Context whose run_config holds the keys `flwr run --run-config`
would (`federation_run_config`: profile, seed, data-root, run-dir, cases, clients and the knobs), merged with the
profile by the same `settings.study_config` as in deployment (docs/flower.md). The wrappers are closures, which Ray
pickles by value, so the configuration reaches every client actor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedseg import run_folder
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.federated import client_app, methods, server_app, settings, sites, task
from fedseg.federated.section import FederatedSettings


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


def federation_run_config(profile: str | Path | Mapping[str, Any], run_dir: str | Path, *, seed: int | None = None,
                          data_root: str | Path | None = None, clients: Sequence[str] = TRAIN_DATASETS,
                          shards: int | str = 1, progress: bool = True, overwrite: bool = False,
                          **knobs: Any) -> dict[str, Any]:
    """The run_config of a simulated federation: the keys `flwr run --run-config` takes, nothing else.

    `profile` is a profile's name or YAML path, or a resolved configuration (a dict, e.g. a test's), which is
    written to `<run_dir>/fl/profile.yaml` and named by its path, as a deployment would. `seed` and `data_root`
    default to the dict's. `knobs` by their profile names (rounds, local_steps, method, mu, loss, ...; None: the
    profile's). `settings.study_config(run_config)` is the configuration the federation runs with.
    """
    run_dir = Path(run_dir).resolve()
    if isinstance(profile, Mapping):
        seed = profile.get("seed") if seed is None else seed
        data_root = profile.get("data_root") if data_root is None else data_root
        path = run_folder.fl_file(run_dir, "profile.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(json.loads(json.dumps(dict(profile), default=str)), sort_keys=False))
        profile = path
    return {"profile": str(profile), "seed": -1 if seed is None else int(seed),
            "data-root": str(data_root or ""), "run-dir": str(run_dir), "cases": str(run_folder.fl_cases(run_dir)),
            "clients": ",".join(clients), "shards": str(shards), "progress": bool(progress),
            "overwrite": bool(overwrite), **settings.run_config_keys(knobs)}


def run_federation(profile: str | Path | Mapping[str, Any], run_dir: str | Path, cases: pd.DataFrame | None = None,
                   clients: Sequence[str] = TRAIN_DATASETS, progress: bool = True, shards: int | str = 1,
                   overwrite: bool = False, *, seed: int | None = None, data_root: str | Path | None = None,
                   **knobs: Any) -> dict[str, Any]:
    """A federation of `clients` (one dataset each) in Flower's simulation engine, configured as `flwr run`
    configures one (`federation_run_config`: profile, seed, data root, knobs).

    `shards` splits each dataset's training cases into that many virtual clients (an int, or per dataset
    "liver=5,spleen=2"; see `sites.client_list`), e.g. 16 virtual clients from four datasets; `min_clients` is
    the client count. `cases` (default `<run_dir>/data/cases.csv`, else the data root's manifest) is copied to
    `<run_dir>/fl/cases.csv`, which every client reads. Raises if any client fails in any round.
    A finished federation in `run_dir` is refused unless `overwrite`; an unfinished one with the same settings
    resumes after its last finished round (`server_app.main`).
    Returns the paths of the global best / final and local best checkpoints, the rounds table
    (`metrics/fl_rounds.csv`) and the summary (best round and metric, seconds).
    """
    run_dir = Path(run_dir).resolve()
    # before anything is written into a finished federation's folder
    run_folder.refuse_finished_federation(run_dir, overwrite)
    return simulate(federation_run_config(profile, run_dir, seed=seed, data_root=data_root, clients=clients,
                                          shards=shards, progress=progress, overwrite=overwrite, **knobs), cases)


def client_devices(fl: FederatedSettings, gpus: int) -> str:
    """Where a simulation's virtual clients train, as a line for the log, given the `federated` settings and the
    GPUs torch sees; refuses the two silent failures of Ray's resource requests.

    `client_gpus: 0` on a GPU machine makes Ray hide the GPUs from the clients, which then train on the CPU
    without a word: refused unless `cpu_clients: true` asks for it. `client_gpus > 0` where there is no GPU
    leaves the clients waiting for one that never comes: refused, naming the setting.
    """
    share, cpus = fl.client_gpus, fl.client_cpus
    if gpus and share <= 0 and not fl.cpu_clients:
        raise ValueError(f"This machine has {gpus} GPU(s) and federated.client_gpus is 0: Ray would hide them "
                         "and the virtual clients would train on the CPU. Give each client a share of a GPU "
                         "(client_gpus: 1.0, or 0.25 for four clients per GPU), or set federated.cpu_clients: true "
                         "to train them on the CPU on purpose.")
    if not gpus and share > 0:
        raise ValueError(f"federated.client_gpus is {share:g} but torch sees no GPU on this machine: the virtual "
                         "clients would wait for one. Set federated.client_gpus: 0 to train them on the CPU.")
    if share > 0:
        return (f"virtual clients on the GPUs: {share:g} GPU and {cpus:g} CPU(s) each, up to "
                f"{int(gpus / share + 1e-9)} training at once on {gpus} GPU(s)")
    return f"virtual clients on the CPU: {cpus:g} core(s) each" + (" (cpu_clients: true)" if gpus else "")


def refuse_other_cases(run_dir: Path, path: Path, cases: pd.DataFrame, overwrite: bool) -> None:
    """An unfinished federation (`fl/state.pt`) resumes only on the cases it started with: refuse, before its
    `fl/cases.csv` is replaced, a cases table that differs from it (the server's resume check would refuse it
    too, but only after the record of the old cases was gone)."""
    if overwrite or not run_folder.fl_state(run_dir).exists() or not path.exists():
        return
    if path.read_text() != cases.to_csv(index=False):
        raise ValueError(f"{run_dir} holds an unfinished federation ({run_folder.fl_state(run_dir)}) on other cases "
                         f"than these ({path}): resuming it would mix two trainings. Rerun it on the same cases, "
                         "pass overwrite=True (--overwrite) to start it afresh, or choose another run folder.")


def simulate(run_config: Mapping[str, Any], cases: pd.DataFrame | None = None) -> dict[str, Any]:
    """The federation `run_config` describes (`federation_run_config`), in Flower's simulation engine: one
    virtual SuperNode per client, the App's own handlers, and `cases` (default `<run-dir>/data/cases.csv`, else
    the data root's manifest) copied to `fl/cases.csv`. Returns what `run_federation` returns."""
    from flwr.simulation import run_simulation  # deferred: starts Ray's machinery, only a simulation needs it

    run_dir = Path(run_config["run-dir"])
    run_folder.refuse_finished_federation(run_dir, bool(run_config.get("overwrite")))
    run_folder.fl_dir(run_dir).mkdir(parents=True, exist_ok=True)
    cfg = settings.study_config(run_config)
    methods.check_network(cfg)  # ownerfedavg on a network without an output layer: refused before Ray starts
    names = sites.client_list(run_config)
    cases = cases if cases is not None else task.load_cases(cfg, {})
    refuse_other_cases(run_dir, Path(run_config["cases"]), cases, bool(run_config.get("overwrite")))
    cases.to_csv(run_config["cases"], index=False)
    summary_file = run_folder.fl_summary(run_dir)
    server, client = simulation_apps(dict(run_config))
    fl = FederatedSettings.of(cfg)
    print(f"Federation of {len(names)} sites: {client_devices(fl, torch.cuda.device_count())}", flush=True)
    run_simulation(server_app=server, client_app=client, num_supernodes=len(names),
                   backend_config={"client_resources": {"num_cpus": fl.client_cpus, "num_gpus": fl.client_gpus}})
    if not summary_file.exists():  # the ServerApp's errors are re-raised above; this catches any other way out
        raise RuntimeError(f"The federation ended without writing {summary_file}: see the log above.")
    summary = json.loads(summary_file.read_text())
    return {**summary, "rounds": pd.read_csv(summary["rounds_csv"]),
            "local_best": {name: str(task.local_best_path(run_dir, name)) for name in names}}
