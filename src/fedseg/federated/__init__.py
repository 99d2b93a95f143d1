"""The study's Flower App: conventional FL (FedAvg weighted by n_k / n) of one 8-channel network, and the methods
compared with it. Modules from the bottom up (each imports only those above it in this list):

- `sites.py`: who the clients are (a dataset, or a shard of one) and which one a SuperNode is.
- `methods.py`: each FL method's mechanics (FedProx's proximal term, SegViz's selective average, the owners'
  average, distillation, pseudo-labels).
- `task.py`: the study configuration a run gets (`study_config`: run_config merged with the profile, the one
  place that happens), a client's data and local training (a thin wrapper around
  `fedseg.train.training.train_model`), the run's status.
- `strategies.py`: `fedavg_weights` and `StudyFedAvg` (sorted, fail-loud aggregation, global best, rounds CSV).
- `client_app.py`: the ClientApp (`@app.train()`, `@app.evaluate()`); one client per dataset.
- `server_app.py`: the ServerApp (`@app.main()`), FedAvg over all clients every round.
- `simulation.py`: `run_federation(...)`, the same App run by Flower's simulation engine from a notebook, with
  the run_config keys `flwr run --run-config` takes.

Deployment uses the same App through `[tool.flwr.app]` in pyproject.toml (`flwr run`).
"""
