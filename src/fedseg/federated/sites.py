"""Who the federation's clients are: one per dataset, or a dataset split into shards (virtual clients in
simulation), and which one a SuperNode is. The bottom of the Flower App: it imports only the label scheme.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fedseg.data.labels import TRAIN_DATASETS


def client_name(dataset: str, shard: int = 0, shards: int = 1) -> str:
    """A virtual client's name: its dataset, or `<dataset>-<k>of<n>` for shard k (1-based) of n."""
    return dataset if shards == 1 else f"{dataset}-{shard + 1}of{shards}"


def parse_client(name: str) -> tuple[str, int, int]:
    """(dataset, shard index from 0, number of shards) of a client name (see `client_name`)."""
    found = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)of(\d+))?", name)
    if not found or found.group(1) not in TRAIN_DATASETS:
        raise ValueError(f"client {name!r}: use a dataset ({', '.join(TRAIN_DATASETS)}) or '<dataset>-<k>of<n>'.")
    dataset, k, n = found.group(1), int(found.group(2) or 1), int(found.group(3) or 1)
    if not 1 <= k <= n:
        raise ValueError(f"client {name!r}: shard {k} of {n} does not exist.")
    return dataset, k - 1, n


def shard_counts(shards: Any, datasets: tuple[str, ...]) -> dict[str, int]:
    """Shards per dataset from run_config `shards`: an int for all ("4") or per dataset ("liver=5,spleen=2")."""
    text = str(shards if shards not in (None, "", 0) else 1).strip()
    if re.fullmatch(r"\d+", text):
        counts = dict.fromkeys(datasets, int(text))
    else:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if not all(len(p) == 2 and p[1].strip().isdigit() for p in pairs):
            raise ValueError(f"shards={shards!r}: use an integer or 'dataset=count,...' (e.g. 'liver=5,spleen=2').")
        given = {name.strip(): int(count) for name, count in pairs}
        unknown = set(given) - set(datasets)
        if unknown:
            raise ValueError(f"shards={shards!r}: {sorted(unknown)} are not among the clients {datasets}.")
        counts = {d: given.get(d, 1) for d in datasets}
    if min(counts.values()) < 1:
        raise ValueError(f"shards={shards!r}: every dataset needs at least one shard.")
    return counts


def client_list(run_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The client of each partition id: run_config `clients` ("liver,spleen", default all four datasets),
    each split into run_config `shards` virtual clients (default 1: one client per dataset)."""
    names = tuple(n.strip() for n in str(run_config.get("clients") or "").split(",") if n.strip())
    unknown = set(names) - set(TRAIN_DATASETS)
    if unknown:
        raise ValueError(f"clients={run_config['clients']!r}: {sorted(unknown)} not in {TRAIN_DATASETS}.")
    datasets = names or TRAIN_DATASETS
    counts = shard_counts(run_config.get("shards"), datasets)
    return tuple(client_name(d, k, counts[d]) for d in datasets for k in range(counts[d]))


def site_identity(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[str, int]:
    """(client name, partition id) of this site: node_config `dataset` (a real site holds its whole dataset),
    else `client_list(run_config)[partition-id]` (a dataset, or one shard of it, in simulation)."""
    if node_config.get("dataset"):
        dataset = str(node_config["dataset"])
        if dataset not in TRAIN_DATASETS:
            raise ValueError(f"node-config dataset={dataset!r}: use one of {', '.join(TRAIN_DATASETS)}.")
        return dataset, int(node_config.get("partition-id", TRAIN_DATASETS.index(dataset)))
    if "partition-id" not in node_config:
        raise ValueError("This SuperNode has no identity: start it with --node-config 'dataset=\"liver\"'.")
    clients, pid = client_list(run_config), int(node_config["partition-id"])
    if pid >= len(clients):
        raise ValueError(f"partition-id {pid} but only {len(clients)} clients {clients}: "
                         "set run_config clients / shards.")
    return clients[pid], pid
