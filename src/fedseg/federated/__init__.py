"""The study's Flower App: conventional FL (FedAvg weighted by n_k / n) of one 8-channel network.

- `task.py`: the study configuration a run gets (run_config / node_config), a client's data and local
  training (a thin wrapper around `fedseg.train.training.train_model`), checkpoints.
- `client_app.py`: the ClientApp (`@app.train()`, `@app.evaluate()`); one client per dataset.
- `server_app.py`: the ServerApp (`@app.main()`), FedAvg over all clients every round.
- `strategies.py`: `fedavg_weights` and `StudyFedAvg` (sorted, fail-loud aggregation, global best, rounds CSV).
- `simulation.py`: `run_federation(...)`, the same App run by Flower's simulation engine from a notebook.

Deployment uses the same App through `[tool.flwr.app]` in pyproject.toml (`flwr run`).
"""
