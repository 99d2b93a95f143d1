"""Flower's overhead: wall time and peak memory of N FL rounds through Flower's simulation engine against
the same rounds of the same clients as a plain in-process loop (same local training, same FedAvg weights,
same federated evaluation), in one run.

    .venv/bin/python benchmarks/bench_flower_overhead.py --profile laptop --rounds 3
    .venv/bin/python benchmarks/bench_flower_overhead.py --profile laptop --rounds 2 \
        --shards liver=4,pancreas=5,kits19=4,spleen=3      # 16 virtual clients (shards of the datasets)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from fedseg.config import resolve
from fedseg.data import datasets
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.data.transforms import build_cache, case_records, evaluation_dataset
from fedseg.federated import settings, sites, task
from fedseg.federated.simulation import run_federation
from fedseg.federated.strategies import fedavg_weights
from fedseg.run import PeakMemory
from fedseg.train.models import build_network
from fedseg.train.training import seed_everything, select_device, validate


def plain_rounds(cfg: dict, cases: pd.DataFrame, clients: tuple[str, ...]) -> None:
    """FedAvg without Flower: each round every client trains from the global weights, the server averages
    by n_k / n, then the global model is validated on every client's validation split."""
    seed_everything(cfg["seed"])
    global_model = build_network(**cfg["model"])
    device = select_device()
    sites = {name: task.client_records(cfg, cases, name) for name in clients}
    for server_round in range(1, cfg["federated"]["rounds"] + 1):
        states, sizes = [], []
        for name in clients:
            model = build_network(**cfg["model"])
            model.load_state_dict(global_model.state_dict())
            train, val = sites[name]
            task.train_locally(cfg, model, name, server_round, train, val)
            states.append(task.state_dict_cpu(model))
            sizes.append(len(train))
        weights = fedavg_weights(sizes)
        averaged = {k: sum(w * s[k].float() for w, s in zip(weights, states)).to(states[0][k].dtype) for k in states[0]}
        global_model.load_state_dict(averaged)
        for name in clients:
            val = sites[name][1]
            validate(global_model.to(device), evaluation_dataset(cfg, val), val, cfg, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default="1", help='virtual clients per dataset: "4" or "liver=4,spleen=3"')
    args = parser.parse_args()
    clients = sites.client_list({"shards": args.shards})
    cfg = resolve(args.profile)
    cfg["federated"]["rounds"] = args.rounds
    data_root = datasets.obtain_data(cfg, progress=False)
    cases = datasets.manifest_for(data_root)
    cases = cases[cases.dataset.isin(TRAIN_DATASETS)]
    build_cache(cfg, case_records(data_root, cases[cases.split != "test"]), progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as flower_dir:
        cfg_plain = {**cfg, "run_dir": plain_dir, "federated": settings.federated_settings(cfg)}
        with PeakMemory() as memory:
            start = time.perf_counter()
            plain_rounds(cfg_plain, cases, clients)
            rows.append({"path": "plain in-process loop", "wall_s": time.perf_counter() - start,
                         "peak_rss_mb": memory.peak / 2**20})
        with PeakMemory() as memory:
            start = time.perf_counter()
            run_federation(cfg, Path(flower_dir), cases, clients=TRAIN_DATASETS, progress=False, shards=args.shards)
            rows.append({"path": "Flower simulation (run_simulation, Ray)", "wall_s": time.perf_counter() - start,
                         "peak_rss_mb": memory.peak / 2**20})
    table = pd.DataFrame(rows).set_index("path")
    table["ratio"] = table["wall_s"] / table["wall_s"].iloc[0]
    fl = cfg["federated"]
    print(f"profile {args.profile}: {len(clients)} virtual clients ({', '.join(clients)}), {args.rounds} rounds x "
          f"{fl['local_steps']} local steps, client resources {fl['client_cpus']} CPU / {fl['client_gpus']} GPU, "
          f"torch threads {torch.get_num_threads()}; peak memory = resident memory of the process tree "
          "(Ray workers included)")
    print(table.to_markdown(floatfmt=".1f"))


if __name__ == "__main__":
    main()
