"""`segviz`: SegViz (Kanhere et al. 2024): the `SharedTaskUNet`; each client trains the shared block and its own task
block, the server averages only the shared block (n_k / n) and keeps each task block as its owner sent it
(`aggregation.selective_average`); the global model is then the meta-model (shared block + every client's task
block). No layer is averaged over clients that do not own it, so there is no dilution to measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedseg.data.labels import owned_mask
from fedseg.federated.methods.base import LocalRound, Method
from fedseg.federated.sites import parse_client
from fedseg.federated.strategies import StudySegViz
from fedseg.train.models import shared_task_shape
from fedseg.train.training import LocalHooks


def evaluation_block(model: torch.nn.Module, client: str) -> str | None:
    """The SegViz task block that alone gives the meta-model's output on `client`'s owned channels, else None.

    The meta-model takes each owned channel from its owner's task block (`models.meta_logits`), so scoring a
    client's owned channels needs only that block: the same logits at a quarter of the decoding (4 tasks).
    None (decode the whole meta-model) for a non-SegViz network or when another block gives an owned channel.
    """
    sources = getattr(model, "channel_source", None)
    if sources is None:
        return None
    dataset = parse_client(client)[0]
    owned = owned_mask(dataset).nonzero()[0]
    return dataset if all(sources[c] == dataset for c in owned) else None


class SegViz(Method):
    name = "segviz"
    summary = "SegViz: a shared block averaged over all clients, each task block kept by its owner"
    strategy = StudySegViz

    def network(self, model: Mapping[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
        """A SharedTaskUNet with one task block per dataset, shaped like the profile's network
        (`models.shared_task_shape`: its channels and downsamplings; its blocks are MONAI's DynUNet blocks)."""
        return {"name": "SharedTaskUNet", "tasks": list(dict.fromkeys(datasets)), **shared_task_shape(dict(model))}

    def hooks(self, local: LocalRound) -> LocalHooks:
        return LocalHooks(block=parse_client(local.client)[0])  # the client's own task block

    def output_layer(self, model: torch.nn.Module,
                     patch_size: Sequence[int] | None = None) -> tuple[dict[str, int] | None, str | None]:
        return None, None  # each task block's head is kept as its owner sent it

    def evaluation_block(self, model: torch.nn.Module, client: str) -> str | None:
        return evaluation_block(model, client)
