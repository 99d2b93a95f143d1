"""The arithmetic of aggregation beyond FedAvg's n_k / n mean, as plain functions on numpy states, tested on known
arrays; the strategies (`strategies.py`) call them.

- `selective_average`: SegViz's (Kanhere et al. 2024) shared block averaged over all clients, each task block kept as
  its owner sent it.
- `owner_output_average`: `ownerfedavg`'s output layer, each channel averaged over the clients that annotate it.
- `output_moves`: how far one round moved each channel's output weights in the global model against its owners'
  update (the dilution the study measures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedseg.data.labels import CHANNELS, owned_mask
from fedseg.federated.sites import parse_client
from fedseg.train.models import parameter_group


def selective_average(states: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                      datasets: Sequence[str],
                      previous: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """SegViz aggregation of SharedTaskUNet states, one per replying client (client k's dataset `datasets[k]`).

    `shared.*` entries: the n_k / n weighted mean over all clients. `task.<t>.*` entries: those of the
    client(s) whose dataset is t, byte for byte when there is one (the n_k-weighted mean of t's shards
    otherwise); a task block no replying client owns keeps `previous` (the last global model). Integer
    buffers are rounded back to their dtype.
    """
    if not (len(states) == len(num_examples) == len(datasets)) or not states:
        raise ValueError(f"selective_average needs one state, size and dataset per client: got {len(states)}, "
                         f"{len(num_examples)}, {len(datasets)}.")
    total = float(sum(num_examples))
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        group = parameter_group(key)
        if group == "shared":
            members = list(range(len(states)))
        else:
            members = [k for k, d in enumerate(datasets) if d == group.split(":", 1)[1]]
            if not members:
                if previous is None:
                    raise ValueError(f"No client owns {key!r} and there is no previous global model to keep it from.")
                out[key] = previous[key]
                continue
        if len(members) == 1 and group != "shared":
            out[key] = states[members[0]][key]  # the owner's block, untouched
            continue
        weight = total if group == "shared" else float(sum(num_examples[k] for k in members))
        mean = sum((num_examples[k] / weight) * states[k][key].astype(np.float64) for k in members)
        dtype = states[0][key].dtype
        out[key] = (np.rint(mean) if np.issubdtype(dtype, np.integer) else mean).astype(dtype)
    return out


def _channel(array: np.ndarray, axis: int, channel: int) -> np.ndarray:
    return np.take(array, channel, axis=axis).astype(np.float64).ravel()


def channel_owners(datasets: Sequence[str], channel: int) -> list[int]:
    """Indices of the clients whose dataset annotates `channel` (client names of shards map to their dataset)."""
    return [k for k, name in enumerate(datasets) if owned_mask(parse_client(name)[0])[channel]]


def owner_output_average(states: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                         datasets: Sequence[str], output_axes: Mapping[str, int],
                         previous: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`ownerfedavg`'s output layer: for each key of `output_axes` (`models.output_layer`) and each channel c
    along its axis, the n_k-weighted mean over the clients owning c (`channel_owners`, weights n_k / sum of
    the owners' n_k); a channel no replying client owns (background always) keeps `previous`."""
    if not (len(states) == len(num_examples) == len(datasets)) or not states:
        raise ValueError(f"owner_output_average needs one state, size and dataset per client: got {len(states)}, "
                         f"{len(num_examples)}, {len(datasets)}.")
    out = {}
    for key, axis in output_axes.items():
        reference = np.asarray(previous[key])
        result = reference.astype(np.float64, copy=True)
        for channel in range(reference.shape[axis]):
            owners = channel_owners(datasets, channel)
            if not owners:
                continue
            weight = float(sum(num_examples[k] for k in owners))
            index = [slice(None)] * reference.ndim
            index[axis] = channel
            result[tuple(index)] = sum((num_examples[k] / weight)
                                       * np.asarray(states[k][key], dtype=np.float64)[tuple(index)]
                                       for k in owners)
        out[key] = result.astype(reference.dtype)
    return out


def output_moves(previous: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]],
                 num_examples: Sequence[int], datasets: Sequence[str], averaged: Mapping[str, np.ndarray],
                 output_axes: Mapping[str, int]) -> list[dict[str, Any]]:
    """How far one round moved each foreground channel's output weights (weight row and bias together).

    Per channel c: `owner_move`, the L2 norm of the owners' n_k-weighted mean update (w_k - w_previous);
    `others_move`, the same over the clients that do not own c (0 with a masked loss: their gradient on c is
    exactly zero); `global_move`, the norm of the aggregated model's change; `ratio` = global / owner move,
    which FedAvg makes n_owner / n (`owner_share`) when the others do not move c; `cosine` between the global
    and the owners' update (negative: the others pull c the other way, as a literal loss teaching "absent" does).
    """
    def vector(arrays: Mapping[str, np.ndarray], channel: int) -> np.ndarray:
        """Channel `channel`'s output weights (its weight row and bias) as one float64 vector."""
        return np.concatenate([_channel(np.asarray(arrays[k]), axis, channel) for k, axis in output_axes.items()])

    total = float(sum(num_examples))
    rows = []
    for channel in range(1, len(CHANNELS)):
        start = vector(previous, channel)

        def update(members: list[int]) -> np.ndarray:
            weight = float(sum(num_examples[k] for k in members))
            if not members or weight <= 0:
                return np.zeros_like(start)
            return sum((num_examples[k] / weight) * (vector(states[k], channel) - start) for k in members)

        owners = channel_owners(datasets, channel)
        others = [k for k in range(len(states)) if k not in owners]
        owner, other = update(owners), update(others)
        moved = vector(averaged, channel) - start
        owner_norm, global_norm = float(np.linalg.norm(owner)), float(np.linalg.norm(moved))
        rows.append({"channel": CHANNELS[channel], "owners": ",".join(datasets[k] for k in owners),
                     "owner_share": sum(num_examples[k] for k in owners) / total, "owner_move": owner_norm,
                     "others_move": float(np.linalg.norm(other)), "global_move": global_norm,
                     "ratio": global_norm / owner_norm if owner_norm > 0 else float("nan"),
                     "cosine": float(owner @ moved / (owner_norm * global_norm)) if owner_norm > 0 and global_norm > 0
                     else float("nan")})
    return rows
