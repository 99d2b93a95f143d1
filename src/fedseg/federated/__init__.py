"""The study's Flower App: conventional FL (FedAvg weighted by n_k / n) of one 8-channel network, and the methods
compared with it. Modules from the bottom up (each imports only those above it in this list):

- `sites.py`: who the clients are (a dataset, or a shard of one) and which one a SuperNode is.
- `aggregation.py`: the arithmetic of aggregation beyond the n_k / n mean (SegViz's selective average, the owners'
  average of the output layer, how far a round moved each channel's output weights).
- `task.py`: a client's data and local training (a thin wrapper around `fedseg.train.training.train_model`),
  what a federation's checkpoints carry, the run's status.
- `strategies.py`: `fedavg_weights` and `StudyFedAvg` (sorted, fail-loud aggregation, global best, rounds CSV) and
  the strategies of the methods that aggregate otherwise.
- `methods/`: one module per FL method, each a `Method` object that says its knobs, network, local training hooks,
  strategy and whether dilution is measured (`methods.get(name)`; docs/methods.md).
- `settings.py`: the study configuration a run gets (`study_config`: run_config merged with the profile, the one
  place that happens).
- `client_app.py`: the ClientApp (`@app.train()`, `@app.evaluate()`); one client per dataset.
- `server_app.py`: the ServerApp (`@app.main()`), FedAvg over all clients every round.
- `simulation.py`: `run_federation(...)`, the same App run by Flower's simulation engine from a notebook, with
  the run_config keys `flwr run --run-config` takes.

Deployment uses the same App through `[tool.flwr.app]` in pyproject.toml (`flwr run`).
"""
