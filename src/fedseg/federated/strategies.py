"""FedAvg as the study runs it (Shen et al. 2022, Eq. 1): w = sum_k n_k / n * w_k, with n_k a client's training cases.

`StudyFedAvg` is Flower's FedAvg with what a reproducible study needs on top:
- replies are sorted by (dataset, partition id) before averaging, so a seed gives the same bytes
  (Flower sums in arrival order, which varies from run to run);
- a round with an error reply or a missing reply fails loudly, naming the client (Flower would average
  the survivors in silence);
- every round's per-client train and evaluate metrics go to `<run_dir>/metrics/fl_rounds.csv`,
  rewritten after each step so an interrupted run keeps what it did;
- the FL global best: after each federated evaluation the global model with the highest validation
  mean Dice is saved to `<run_dir>/checkpoints/fl-global/best.pt`. The metric is the mean over the seven
  foreground channels of each channel's mean Dice over the validation cases that have it, i.e. exactly
  the `val_mean_dice` that `training.train_model` computes for the central model on the pooled
  validation cases (each channel is owned by one client); it is not the mean of the client means;
- dilution: given the network's output layer (`models.output_layer`), every round writes to
  `<run_dir>/metrics/fl_dilution.csv` how far each channel's output weights moved in the global model
  against how far its owner(s) moved them (`aggregation.output_moves`). A network without an output layer of
  its own (UNet with residual units) measures none: `record_dilution` writes why instead
  (`run_folder.dilution_not_measured`).
"""

from __future__ import annotations

import datetime
import math
import os
import random
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedseg import run_folder
from fedseg.data.labels import FOREGROUND, TRAIN_DATASETS
from fedseg.federated.aggregation import (
    output_moves,
    owner_output_average,
    selective_average,
)
from fedseg.federated.sites import client_name, parse_client
from fedseg.federated.task import CASES_KEY, FEDERATION_KEY, validated_round
from fedseg.train.training import save_checkpoint

#: Metric keys that name a client rather than measure it: never averaged.
IDENTITY_KEYS = ("partition-id", "dataset-index", "shard", "shards", "local-best-updated")
ROUND_COLUMNS = ["round", "kind", "dataset", "partition_id", "num_examples", "loss", "mean_dice",
                 *[f"dice_{c}" for c in FOREGROUND], "local_best", "global_best", "seconds"]


#: How a failing client names itself in its error (client_app._named_failure).
CLIENT_FAILURE = re.compile(r"Client '(\w+)' failed in [^\n]*")


class FederationError(RuntimeError):
    """A federated round cannot be aggregated: a client failed or did not reply."""

def site_names(grid: Grid, node_ids: Iterable[int], timeout: float = 120.0) -> dict[int, str]:
    """Ask each node who it is (a `query` message, answered by `client_app.query` with the site's identity):
    {node id: client name}. A site whose identity fails (e.g. an unknown dataset) fails the run with its reason."""
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=int(n), message_type="query")
                for n in sorted(node_ids)]
    if not messages:
        return {}
    names, failures = {}, []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failures.append(f"- error code {reply.error.code}: {(reply.error.reason or '').strip()[-2000:]}")
        else:
            names[reply.metadata.src_node_id] = _dataset_name(_metrics(reply))
    if failures:
        raise FederationError("A site could not say which dataset it holds:\n" + "\n".join(failures))
    return names


def site_cases(grid: Grid, names: dict[int, str], timeout: float = 120.0) -> dict[str, dict[str, str]]:
    """Each connected site's training and validation case fingerprints (`task.site_cases`), by client name: what
    the server stamps its resumable state with, so a resume on other cases is refused."""
    messages = [Message(RecordDict({"config": ConfigRecord({CASES_KEY: True})}), dst_node_id=int(n),
                        message_type="query") for n in sorted(names)]
    found, failures = {}, []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failures.append(f"- error code {reply.error.code}: {(reply.error.reason or '').strip()[-2000:]}")
        else:
            found[names[reply.metadata.src_node_id]] = dict(reply.content[CASES_KEY])
    if failures:
        raise FederationError("A site could not say which cases it holds:\n" + "\n".join(failures))
    return dict(sorted(found.items()))


def wait_for_sites(grid: Grid, min_nodes: int, expected: Sequence[str] | None = None, timeout: float = 1800.0,
                   poll: float = 2.0, say: Any = print) -> dict[int, str]:
    """Wait until `min_nodes` sites are connected (and, when given, every client name in `expected`), saying which
    sites are there and which are missing whenever that changes; give up after `timeout` seconds with that
    message (run config `wait-timeout`). Returns {node id: client name} of the connected sites."""
    names: dict[int, str] = {}
    deadline, said = time.monotonic() + timeout, ""
    while True:
        connected = set(grid.get_node_ids())
        names = {n: name for n, name in names.items() if n in connected}
        names.update(site_names(grid, connected - set(names)))
        present = sorted(names.values())
        missing = sorted(set(expected or ()) - set(present))
        if len(connected) >= min_nodes and not missing:
            return names
        if expected:
            wanted = f"missing: {', '.join(missing)}" if missing else f"{min_nodes - len(connected)} more site(s)"
        else:
            absent = [d for d in TRAIN_DATASETS if d not in {n.split("-")[0] for n in present}]
            wanted = f"{min_nodes - len(connected)} more site(s), e.g. {', '.join(absent) or 'another shard'}"
        message = (f"{len(connected)} of {min_nodes} sites connected ({', '.join(present) or 'none'}); {wanted}")
        if time.monotonic() > deadline:
            raise FederationError(f"Gave up waiting for the sites after {timeout:.0f} s (run config wait-timeout): "
                                  f"{message}. Start the missing SuperNodes, or lower min-clients.")
        if message != said:
            say(f"Waiting: {message}", flush=True)
            said = message
        time.sleep(poll)


def fedavg_weights(num_examples: Sequence[int]) -> list[float]:
    """FedAvg's weight of each client, n_k / n (Eq. 1 of Shen et al. 2022), n_k its number of training cases."""
    if not num_examples or any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise ValueError(f"num_examples={list(num_examples)}: need non-negative counts with a positive sum.")
    total = sum(num_examples)
    return [n / total for n in num_examples]


def _metrics(message: Message) -> MetricRecord:
    return next(iter(message.content.metric_records.values()))


def reply_order(message: Message) -> tuple[int, int, int]:
    """Sort key of a reply: (dataset index, partition id, node id); error replies last."""
    if message.has_error():
        return (len(TRAIN_DATASETS), 2**31, message.metadata.src_node_id)
    metrics = _metrics(message)
    return (int(metrics.get("dataset-index", -1)), int(metrics.get("partition-id", -1)), message.metadata.src_node_id)


def aggregate_study_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of every metric over the clients that report it (NaN = this client has no value).

    Identity keys are left out; `clients` counts the replies. Per-channel Dice thus comes from the
    client(s) owning that channel instead of turning NaN.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighted_by_key]) for m in metrics]
    out = MetricRecord({"clients": len(records)})
    for key in metrics[0].keys():
        if key == weighted_by_key or key in IDENTITY_KEYS:
            continue
        pairs = [(float(m[key]), w) for m, w in zip(metrics, weights) if math.isfinite(float(m[key]))]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if pairs and total > 0 else math.nan
    return out


def new_federation_id() -> str:
    """A federation's identity: when it started (UTC) and a random suffix, unique to each fresh start."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def record_dilution(run_dir: str | Path, measured: bool, reason: str | None = None) -> None:
    """Before a federation's first round: when it measures no dilution, an earlier federation's
    `metrics/fl_dilution.csv` in the folder is removed (it would answer for this one) and `reason` (None for
    SegViz, which keeps each head as its owner sent it) is written to `run_folder.dilution_not_measured`; when it
    measures it, an earlier note saying it did not is removed."""
    note = run_folder.dilution_not_measured(run_dir)
    if measured:
        note.unlink(missing_ok=True)
        return
    run_folder.metrics_file(run_dir, "fl_dilution.csv").unlink(missing_ok=True)
    if reason:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(reason + "\n")
    else:
        note.unlink(missing_ok=True)


class StudyFedAvg(FedAvg):
    """FedAvg over `num_clients` sites with sorted, fail-loud aggregation and the FL global best."""
    def __init__(self, run_dir: str | Path, num_clients: int, fraction_train: float = 1.0, progress: bool = False,
                 output_axes: dict[str, int] | None = None, settings: dict[str, Any] | None = None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=1.0,
                         min_train_nodes=max(1, math.ceil(fraction_train * num_clients)),
                         min_evaluate_nodes=num_clients, min_available_nodes=num_clients,
                         train_metrics_aggr_fn=aggregate_study_metrics,
                         evaluate_metrics_aggr_fn=aggregate_study_metrics)
        self.run_dir, self.progress = Path(run_dir), progress
        self.rows: list[dict[str, Any]] = []
        self.best_metric, self.best_round, self.last_metric = -math.inf, 0, math.nan
        self.sent: dict[str, set[int]] = {}
        self.node_names: dict[int, str] = {}
        self.global_arrays: ArrayRecord | None = None
        self.previous_arrays: ArrayRecord | None = None
        self.output_axes = dict(output_axes or {})
        self.settings = settings  # what the global checkpoints carry (`task.federation_settings`)
        self.state_settings = settings  # what a resume must match (the server adds the sites)
        self.dilution: list[dict[str, Any]] = []
        self.round_offset = 0  # rounds finished before a resume: Flower counts this start's rounds from 1
        # this federation's identity, sent with every round: a client's local best from another federation in the
        # same folder never counts as this one's (`client_app`); kept across a resume (`save_state`, `restore`)
        self.federation_id = new_federation_id()
        self._started = time.perf_counter()

    @property
    def rounds_csv(self) -> Path:
        return run_folder.metrics_file(self.run_dir, "fl_rounds.csv")

    @property
    def dilution_csv(self) -> Path:
        return run_folder.metrics_file(self.run_dir, "fl_dilution.csv")

    @property
    def global_best_path(self) -> Path:
        return run_folder.checkpoint(self.run_dir, "fl-global")

    @property
    def state_path(self) -> Path:
        return run_folder.fl_state(self.run_dir)

    def save_state(self, server_round: int) -> None:
        """Everything the server needs to continue after round `server_round` (`restore`), written atomically
        at the end of each round: the global weights the round ended with, the best so far, the tables' rows,
        the state of the `random` that samples clients and the federation's settings."""
        state = {"round": server_round, "arrays": self.global_arrays.to_torch_state_dict(),
                 "best_metric": self.best_metric, "best_round": self.best_round, "last_metric": self.last_metric,
                 "rows": self.rows, "dilution": self.dilution, "random": random.getstate(),
                 "node_names": self.node_names, "settings": self.state_settings,
                 "federation_id": self.federation_id}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def restore(self, state: dict[str, Any]) -> ArrayRecord:
        """Continue from a saved state (`save_state`): the next round is `state["round"] + 1`; returns the
        global weights to start from. The tables are rewritten without the rows of the round that was cut."""
        self.round_offset = int(state["round"])
        self.best_metric, self.best_round = float(state["best_metric"]), int(state["best_round"])
        self.last_metric = float(state["last_metric"])
        self.rows, self.dilution = list(state["rows"]), list(state["dilution"])
        self.node_names.update(state.get("node_names") or {})
        self.federation_id = str(state.get("federation_id") or self.federation_id)
        random.setstate(state["random"])
        self._write_rows()
        if self.dilution:
            self._write_dilution()
        return ArrayRecord(state["arrays"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._started = time.perf_counter()
        self.previous_arrays = arrays  # the global model this round's clients start from
        config[FEDERATION_KEY] = self.federation_id
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent["train"] = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_arrays = arrays  # the global model these evaluations score
        if not self.validated(server_round):  # a round between validations: nothing sent, nothing scored
            self.sent["evaluate"] = set()
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent["evaluate"] = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = self._checked(server_round, "train", replies)
        arrays, metrics = self._average(server_round, replies)
        for m in replies:
            self.rows.append(self._row(server_round, "train", m, loss=float(_metrics(m)["train-loss"])))
        self._write_rows()
        if self.output_axes and arrays is not None:
            self._measure_dilution(server_round, replies, arrays)
        return arrays, metrics

    def _replies(self, replies: list[Message], keys: Iterable[str] | None = None
                 ) -> tuple[list[dict[str, np.ndarray]], list[int], list[str]]:
        """Each reply's arrays (numpy; only `keys` when given), number of training cases and client name, in
        reply order."""
        records = [m.content["arrays"] for m in replies]
        states = [{k: a.numpy() for k, a in r.items()} if keys is None else {k: r[k].numpy() for k in keys}
                  for r in records]
        return (states, [int(_metrics(m)["num-examples"]) for m in replies],
                [_dataset_name(_metrics(m)) for m in replies])

    def _measure_dilution(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> None:

        keys = self.output_axes
        states, sizes, names = self._replies(replies, keys)  # the output layer alone
        previous = {k: self.previous_arrays[k].numpy() for k in keys}
        averaged = {k: arrays[k].numpy() for k in keys}
        for row in output_moves(previous, states, sizes, names, averaged, keys):
            self.dilution.append({"round": server_round, **row})
        self._write_dilution()

    def _write_dilution(self) -> None:
        self.dilution_csv.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dilution_csv.with_suffix(".csv.tmp")
        pd.DataFrame(self.dilution).to_csv(tmp, index=False)
        os.replace(tmp, self.dilution_csv)

    def _average(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global weights and the train metrics of checked, sorted replies: FedAvg, each array kept
        in its own dtype."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        return _like_first_reply(arrays, replies), metrics

    def validated(self, server_round: int) -> bool:
        """Whether the global model is validated after `server_round` (`task.validated_round`'s rule, the one the
        clients follow for their local models); without the federation's settings, every round."""
        fl = (self.settings or {}).get("federated")
        return validated_round(fl, server_round) if fl else True

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        if not self.validated(server_round):
            return self._unvalidated(server_round)
        replies = self._checked(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        channels = [metrics[f"dice-{c}"] for c in FOREGROUND if math.isfinite(metrics[f"dice-{c}"])]
        metric = float(np.mean(channels)) if channels else math.nan
        metrics["global-mean-dice"] = self.last_metric = metric
        improved = metric > self.best_metric
        if improved:

            self.best_metric, self.best_round = metric, server_round
            save_checkpoint(self.global_arrays.to_torch_state_dict(), self.global_best_path, step=server_round,
                            val_mean_dice=metric, federation_id=self.federation_id,
                            **({"settings": self.settings} if self.settings else {}))
        self.rows.extend(self._row(server_round, "evaluate", m) for m in replies)
        self._end_round(server_round, sum(int(_metrics(m)["num-examples"]) for m in replies), metric,
                        {c: metrics[f"dice-{c}"] for c in FOREGROUND}, improved,
                        f"global val mean Dice {metric:.4f} (best {self.best_metric:.4f}, round {self.best_round})")
        return metrics

    def _end_round(self, server_round: int, scored: int, metric: float, dice: dict[str, float], improved: bool,
                   what: str) -> None:
        """The round's global row (the mean training loss of its clients, the global model's scores on `scored`
        validation cases), the tables and the server's state written, and a line when progress is on."""
        train_losses = [r["loss"] for r in self.rows if r["round"] == server_round and r["kind"] == "train"]
        self.rows.append({"round": server_round, "kind": "global", "dataset": "all", "partition_id": -1,
                          "num_examples": scored,
                          "loss": float(np.mean(train_losses)) if train_losses else math.nan, "mean_dice": metric,
                          **{f"dice_{c}": dice[c] for c in FOREGROUND}, "global_best": improved,
                          "seconds": round(time.perf_counter() - self._started, 2)})
        self._write_rows()
        self.save_state(server_round)
        if self.progress:
            print(f"round {server_round}: {what}, {time.perf_counter() - self._started:.1f} s", flush=True)

    def _checked(self, server_round: int, kind: str, replies: Iterable[Message]) -> list[Message]:
        """The replies sorted by client; raises FederationError on any error or missing reply."""
        replies = sorted(replies, key=reply_order)
        for m in replies:
            if not m.has_error():
                self.node_names[m.metadata.src_node_id] = _dataset_name(_metrics(m))
        failed = [m for m in replies if m.has_error()]
        if failed:
            sent = self.sent.get(kind, set())
            # Flower answers for a node it lost (error code 5, Node Unavailable) with an error reply of its
            # own, sent from the SuperLink's node id: such a reply names none of the nodes this round sent
            # work to, so the lost nodes are those that were sent work and did not reply themselves.
            answered = {m.metadata.src_node_id for m in replies}
            lost = sorted(sent - answered)
            stand_ins = [m for m in failed if m.metadata.src_node_id not in sent]
            details = "\n".join(self._failure(m, lost.pop(0) if lost and m in stand_ins else None)
                                for m in failed)
            raise FederationError(f"Round {server_round} ({kind}): {len(failed)} of {len(replies)} clients failed; "
                                  f"the round is not averaged over the rest.\n{details}")
        missing = self.sent.get(kind, set()) - {m.metadata.src_node_id for m in replies}
        if missing or len(replies) < len(self.sent.get(kind, ())):
            names = ", ".join(self._who(n) for n in sorted(missing))
            raise FederationError(f"Round {server_round} ({kind}): {len(replies)} of {len(self.sent[kind])} clients "
                                  f"replied; no reply from {names or 'some clients'} (timed out or disconnected).")
        return replies

    def _failure(self, message: Message, node_id: int | None = None) -> str:
        """One line per failed client: who (its dataset, from its identity reply, earlier replies or its own
        error text) and why. `node_id`: the node a reply made by Flower on a lost node's behalf stands for."""
        reason = (message.error.reason or "").strip()
        found = CLIENT_FAILURE.search(reason)
        node_id = message.metadata.src_node_id if node_id is None else node_id
        if found and node_id not in self.node_names:
            self.node_names[node_id] = found.group(1)
        lines = [line for line in reason.splitlines() if line.strip()] or ["no reason given"]
        detail = (found.group(0) if found else lines[-1])[:2000]
        return f"- {self._who(node_id)}, error code {message.error.code}: {detail}"

    def _who(self, node_id: int) -> str:
        return f"client {self.node_names[node_id]!r} (node {node_id})" if node_id in self.node_names \
            else f"node {node_id} (dataset unknown: it has not replied before)"

    def _unvalidated(self, server_round: int) -> None:
        """The end of a round that validates nothing (`validated`): its global row has no scores, and the
        server's state is saved as after any round."""
        every = self.settings["federated"]["val_every"]
        self._end_round(server_round, 0, math.nan, {c: math.nan for c in FOREGROUND}, False,
                        f"trained, not validated (validated every {every} rounds and the last)")

    def _row(self, server_round: int, kind: str, message: Message, loss: float = math.nan) -> dict[str, Any]:
        m = _metrics(message)
        return {"round": server_round, "kind": kind, "dataset": _dataset_name(m),
                "partition_id": int(m.get("partition-id", -1)), "num_examples": int(m["num-examples"]),
                "loss": loss, "mean_dice": float(m["mean-dice"]),
                **{f"dice_{c}": float(m[f"dice-{c}"]) for c in FOREGROUND},
                "local_best": bool(m.get("local-best-updated", 0)) if kind == "train" else None,
                "seconds": round(time.perf_counter() - self._started, 2)}

    def _write_rows(self) -> None:
        """Rewrite the rounds table atomically: an interrupted run keeps every finished step."""
        self.rounds_csv.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.rounds_csv.with_suffix(".csv.tmp")
        pd.DataFrame(self.rows, columns=ROUND_COLUMNS).to_csv(tmp, index=False)
        os.replace(tmp, self.rounds_csv)


def _dataset_name(metrics: MetricRecord) -> str:
    """The sending client's name (`sites.client_name`): its dataset, or the shard of it."""
    index = int(metrics.get("dataset-index", -1))
    if not 0 <= index < len(TRAIN_DATASETS):
        return f"unknown-{index}"

    return client_name(TRAIN_DATASETS[index], int(metrics.get("shard", 0)), int(metrics.get("shards", 1)))


def _like_first_reply(arrays: ArrayRecord | None, replies: list[Message]) -> ArrayRecord | None:
    """The average in each array's own dtype (Flower's float weights would turn int buffers to float64)."""
    if arrays is None:
        return None
    reference = next(iter(replies[0].content.array_records.values()))
    if all(array.dtype == reference[key].dtype for key, array in arrays.items()):
        return arrays
    averaged = {}
    for key, array in arrays.items():
        value, dtype = array.numpy(), reference[key].numpy().dtype
        if value.dtype != dtype:
            value = np.rint(value).astype(dtype) if np.issubdtype(dtype, np.integer) else value.astype(dtype)
        averaged[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(averaged)


class StudySegViz(StudyFedAvg):
    """SegViz's selective aggregation (Kanhere et al. 2024) on the study's fail-loud, sorted FedAvg: the shared block
    is averaged with n_k / n, each task block is kept as its owner sent it (`aggregation.selective_average`)."""
    def _average(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:

        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        states, sizes, names = self._replies(replies)
        datasets = [parse_client(name)[0] for name in names]
        previous = {k: a.numpy() for k, a in self.previous_arrays.items()}
        averaged = selective_average(states, sizes, datasets, previous)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in averaged.items()}), metrics


class StudyOwnerFedAvg(StudyFedAvg):
    """`ownerfedavg`: the study's FedAvg, then each output channel's weights and bias replaced by their mean
    over that channel's owners (`aggregation.owner_output_average`); needs the network's `output_axes`."""
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not self.output_axes:
            raise ValueError("ownerfedavg needs the network's output layer (models.output_layer) as output_axes.")

    def _average(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:

        arrays, metrics = super()._average(server_round, replies)
        states, sizes, names = self._replies(replies, self.output_axes)  # the output layer alone
        previous = {k: self.previous_arrays[k].numpy() for k in self.output_axes}
        owned = owner_output_average(states, sizes, names, self.output_axes, previous)
        merged = {k: Array(np.ascontiguousarray(owned[k])) if k in owned else a for k, a in arrays.items()}
        return ArrayRecord(merged), metrics
