"""One round of a run's own federation, in this process, traced message by message (notebook 03's mechanism cell).

`one_round` runs the study's ServerApp (`server_app.main`) for one FedAvg round on a few of a run's sites, with the
run's own profile and data, on the in-process grid (`InProcessGrid`): each message goes to the study's ClientApp as a
SuperNode would hand it over (serialised and read back). It records what crossed the wire (`RoundTrace.traffic`: each
message's serialised size and what it carried), the weights the server sent, each site's reply (its weights and
`num-examples`) and the weights the strategy then sent out for evaluation (the new global model), so a reader can
redo Eq. 1 of Shen et al. 2022 on the real replies (`RoundTrace.fedavg_difference`).

The random generators (Python, NumPy, PyTorch) are restored afterwards: the ServerApp and ClientApp seed them, and the
run's own federation, started after this cell, must not see a different state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Message, RecordDict
from flwr.common.serde import message_to_proto

from fedseg import run_folder
from fedseg.experiments.playground.grid import InProcessGrid, serve
from fedseg.federated import client_app
from fedseg.federated.simulation import federation_run_config
from fedseg.federated.strategies import fedavg_weights


@dataclasses.dataclass
class RoundTrace:
    """What one traced round sent and received."""
    sites: tuple[str, ...]
    traffic: pd.DataFrame  #: one row per message: kind, site, direction, bytes (serialised), arrays, num_examples
    sent: dict[str, torch.Tensor]  #: the global weights the server sent to train
    replies: dict[str, tuple[int, dict[str, torch.Tensor]]]  #: site -> (num-examples, its trained weights)
    averaged: dict[str, torch.Tensor]  #: the global weights the server sent next (to evaluate): its average
    seconds: float

    def per_site(self) -> pd.DataFrame:
        """Per site: its training cases (num-examples), its weight n_k / n and the bytes of the round's train and
        evaluate messages each way."""
        train = self.traffic[self.traffic["kind"].isin(["train", "evaluate"])]
        table = train.pivot_table(index="site", columns=["kind", "direction"], values="bytes", aggfunc="sum")
        order = [(k, d) for k in ("train", "evaluate") for d in ("server -> site", "site -> server")]
        table = table[[c for c in order if c in table.columns]]
        table.columns = [f"{kind}: {direction} (bytes)" for kind, direction in table.columns]
        counts = {site: n for site, (n, _) in self.replies.items()}
        weights = dict(zip(counts, fedavg_weights(list(counts.values())), strict=True))
        table.insert(0, "n_k / n", pd.Series(weights))
        table.insert(0, "num-examples", pd.Series(counts))
        return table.loc[list(self.sites)]

    def fedavg_difference(self) -> float:
        """Largest |new global - sum_k n_k / n * w_k| over the floating-point weights: Eq. 1 redone on the replies
        (0 up to float32 rounding when the strategy is FedAvg)."""
        counts = [n for n, _ in self.replies.values()]
        weights = fedavg_weights(counts)
        largest = 0.0
        for name, value in self.averaged.items():
            if not value.is_floating_point():
                continue
            mine = sum(w * reply[name].double() for w, (_, reply) in zip(weights, self.replies.values(), strict=True))
            largest = max(largest, float((value.double() - mine).abs().max()))
        return largest

    def moved(self) -> pd.Series:
        """Per site, how far its local steps moved the weights (L2 norm of w_k - w_sent), and the global model's."""
        def distance(weights: dict[str, torch.Tensor]) -> float:
            return float(sum(((weights[k].double() - v.double()) ** 2).sum() for k, v in self.sent.items()
                             if v.is_floating_point()) ** 0.5)
        return pd.Series({**{s: distance(w) for s, (_, w) in self.replies.items()}, "global": distance(self.averaged)})


@contextlib.contextmanager
def preserved_random_state():
    """Python's, NumPy's and PyTorch's random generators as they were before the block."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def one_round(cfg: dict[str, Any], cases: pd.DataFrame, sites: Sequence[str], run_dir: str | Path,
              local_steps: int = 2, train_cases: int = 2) -> RoundTrace:
    """One FedAvg round of the run `cfg` configures (its profile, loss, seed and data) on `sites`, each with its
    first `train_cases` training cases and first validation case of `cases`, every client trained `local_steps`
    steps, through the study's ServerApp and ClientApp in this process; written into `run_dir` (a scratch folder:
    not the run's own). Returns the round's trace."""
    began = time.perf_counter()
    sites = tuple(sites)
    parts = []
    for site in sites:
        own = cases[cases["dataset"] == site].sort_values("case_id")
        train, val = own[own["split"] == "train"].head(train_cases), own[own["split"] == "val"].head(1)
        if train.empty or val.empty:
            raise ValueError(f"{site}: the cases table has {len(train)} training and {len(val)} validation cases; "
                             "one round needs one of each (run 01 with this dataset).")
        parts += [train, val]
    run_config = federation_run_config(cfg, run_dir, clients=sites, shards=1, progress=False, overwrite=True,
                                       method="fedavg", rounds=1, local_steps=int(local_steps), val_every=1)
    run_folder.fl_dir(run_dir).mkdir(parents=True, exist_ok=True)
    pd.concat(parts, ignore_index=True).to_csv(run_config["cases"], index=False)

    rows: list[dict[str, Any]] = []
    caught: dict[str, Any] = {"replies": {}}

    def name_of(node_id: int) -> str:
        return sites[int(grid.contexts[node_id].node_config["partition-id"])]

    def seen(kind: str, messages: list[Message], replies: list[Message]) -> None:
        for direction, group in (("server -> site", messages), ("site -> server", replies)):
            for message in group:
                node = message.metadata.dst_node_id if direction == "server -> site" else message.metadata.src_node_id
                content = message.content if message.has_content() else RecordDict()
                arrays = content.get("arrays")
                metrics = content.get("metrics")
                rows.append({"kind": kind, "site": name_of(node), "direction": direction,
                             "bytes": message_to_proto(message).ByteSize(),
                             "arrays": len(arrays) if arrays is not None else 0,
                             "num_examples": int(metrics["num-examples"]) if metrics and "num-examples" in metrics
                             else None})
        if kind == "train":
            caught.setdefault("sent", messages[0].content["arrays"].to_torch_state_dict())
            for reply in replies:
                if reply.has_content():
                    caught["replies"][name_of(reply.metadata.src_node_id)] = (
                        int(reply.content["metrics"]["num-examples"]), reply.content["arrays"].to_torch_state_dict())
        elif kind == "evaluate":
            caught.setdefault("averaged", messages[0].content["arrays"].to_torch_state_dict())

    grid = InProcessGrid(client_app.app, run_config, len(sites), on_sent=seen)
    with preserved_random_state():
        serve(grid)
    missing = [s for s in sites if s not in caught["replies"]]
    if missing or "averaged" not in caught:
        raise RuntimeError(f"the traced round did not complete (no reply from {missing or 'none'}; evaluate sent: "
                           f"{'averaged' in caught}): see {run_folder.fl_status(run_dir)}.")
    return RoundTrace(sites=sites, traffic=pd.DataFrame(rows), sent=caught["sent"],
                      replies={s: caught["replies"][s] for s in sites}, averaged=caught["averaged"],
                      seconds=time.perf_counter() - began)
