"""The study's ServerApp: FedAvg (weights n_k / n) of one seeded network over all clients, every round.

Each round: every client trains `local_steps` from the global weights, the replies are averaged
(sorted, failing loudly on any client failure, see `strategies.StudyFedAvg`), then every client
scores the new global model on its validation cases and the FL global best is kept. Writes
`<run_dir>/fl/config.json` (the resolved configuration) at the start, and at the end
`<run_dir>/checkpoints/fl-global/final.pt` and `<run_dir>/fl/summary.json`. `<run_dir>/fl/status.json` says
all along whether the federation is running, finished or failed (with the reason).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedseg import run_folder
from fedseg.federated import methods, settings, sites, task
from fedseg.federated.section import FederatedSettings
from fedseg.federated.strategies import (
    record_dilution,
    site_cases,
    wait_for_sites,
)
from fedseg.train.models import build_network
from fedseg.train.training import check_resumable, save_checkpoint, seed_everything

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `rounds` rounds of FedAvg with federated evaluation; keep the global best and the final model.

    A finished federation in run-dir is refused unless the run config says `overwrite`; an unfinished one (a
    crash, a lost site) with the same settings and sites continues after its last finished round
    (`fl/state.pt`) and ends with the weights an uninterrupted run would have."""
    began = time.perf_counter()
    cfg = settings.study_config(context.run_config)
    fl, run_dir = FederatedSettings.of(cfg), Path(cfg["run_dir"])
    overwrite = settings.as_bool(context.run_config.get("overwrite", False), "overwrite")
    run_folder.refuse_finished_federation(run_dir, overwrite)
    state_path = run_folder.fl_state(run_dir)
    if overwrite:
        state_path.unlink(missing_ok=True)
    run_folder.fl_dir(run_dir).mkdir(parents=True, exist_ok=True)
    run_folder.fl_config(run_dir).write_text(json.dumps(cfg, indent=1, default=str))
    summary_file = run_folder.fl_summary(run_dir)
    summary_file.unlink(missing_ok=True)
    run_folder.write_federation_status(run_dir, "running")
    print(f"Federation ({fl.method}, {fl.rounds} rounds) writes into {run_dir}", flush=True)

    random.seed(cfg["seed"])  # Flower samples clients with the global `random`
    seed_everything(cfg["seed"])
    model = build_network(**cfg["model"])
    carried = task.federation_settings(cfg)  # what every checkpoint of this federation carries
    method = methods.get(fl.method)
    # the output layer ownerfedavg averages over owners and the dilution is measured on: none for SegViz (each task
    # block's head is kept as its owner sent it) nor for a network whose logits no one layer gives alone (UNet with
    # residual units: not measured, and why; ownerfedavg refused before any round, `Method.output_layer`)
    try:
        axes, unmeasured = method.output_layer(model, cfg["preprocess"].get("patch_size"))
    except ValueError as error:
        run_folder.write_federation_status(run_dir, "failed", f"{type(error).__name__}: {error}")
        raise
    record_dilution(run_dir, measured=axes is not None, reason=unmeasured)
    strategy = method.strategy(run_dir, num_clients=fl.min_clients, fraction_train=fl.fraction_train,
                              progress=bool(context.run_config.get("progress", False)), output_axes=axes,
                              settings=carried)
    try:
        expected = sites.client_list(context.run_config) if context.run_config.get("clients") else None
        connected = wait_for_sites(grid, fl.min_clients, expected, fl.wait_timeout)
        strategy.node_names.update(connected)
        # a resume must find the same sites on the same cases (each site's case fingerprints)
        strategy.state_settings = {**carried, "sites": sorted(connected.values()),
                                   "cases": site_cases(grid, connected)}
        arrays, done = ArrayRecord(task.state_dict_cpu(model)), 0
        if state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            check_resumable(state_path, state.get("settings"), strategy.state_settings)
            arrays, done = strategy.restore(state), int(state["round"])
            print(f"Resuming the federation in {run_dir} after round {done} of {fl.rounds} ({state_path})",
                  flush=True)
        if done < fl.rounds:
            arrays = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=fl.rounds - done,
                                    timeout=fl.round_timeout, evaluate_fn=None).arrays
    except BaseException as error:  # the folder keeps the finished rounds' rows and bests: say that it did not finish
        run_folder.write_federation_status(run_dir, "failed", f"{type(error).__name__}: {error}")
        raise

    final = save_checkpoint(arrays.to_torch_state_dict(), run_folder.checkpoint(run_dir, "fl-global", "final"),
                                 step=fl.rounds, val_mean_dice=strategy.last_metric, settings=carried,
                                 federation_id=strategy.federation_id)
    summary = {"federation_id": strategy.federation_id, "num_rounds": fl.rounds, "local_steps": fl.local_steps,
               "clients": fl.min_clients,
               "resumed_after_round": done if done else None,
               "best_round": strategy.best_round, "best_val_mean_dice": strategy.best_metric,
               "final_val_mean_dice": strategy.last_metric, "global_best": str(strategy.global_best_path),
               "global_final": str(final), "rounds_csv": str(strategy.rounds_csv),
               "seconds": round(time.perf_counter() - began, 2)}
    summary_file.write_text(json.dumps(summary, indent=1))
    run_folder.write_federation_status(run_dir, "finished")
