"""What a federated method is to the study: one object (`Method`) that says everything the method changes, so the
ClientApp, the ServerApp, the simulation and the studies ask it instead of testing its name.

A method says
- its **knobs** (`knobs`: its `federated.*` settings and their defaults, `resolve_knobs` to type them);
- its **network** (`network`: the profile's, or another built from it, e.g. SegViz's SharedTaskUNet);
- its **local training** (`local_config`: the configuration a client trains under, e.g. FedGIN's augmentation;
  `hooks`: the `training.LocalHooks` of one local round: an extra loss, other volumes, the block trained);
- its **strategy** (`strategy`: the `strategies.StudyFedAvg` subclass the server aggregates with);
- whether **dilution** is measured (`output_layer`: the output layer averaged and measured, or None and why) and
  whether it can run on a network at all (`check_network`);
- how a client **scores** the global model (`evaluation_block`).

Every default below is FedAvg's; a method overrides what it changes and nothing else (`docs/methods.md`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedseg.federated.strategies import StudyFedAvg
from fedseg.train.models import NoOutputLayer, build_network, output_layer
from fedseg.train.training import LocalHooks


@dataclasses.dataclass(frozen=True)
class LocalRound:
    """What a method sees of one client's local round when it builds that round's `LocalHooks`."""
    cfg: Mapping[str, Any]  #: the study configuration the client trains under (`local_config` applied)
    client: str  #: the client's name (a dataset, or a shard of one: `sites.parse_client`)
    server_round: int
    model: torch.nn.Module  #: the received global weights, about to be trained locally
    global_model: Callable[[], torch.nn.Module]  #: a fresh copy of the received global model (e.g. a teacher)
    train_records: Sequence[dict[str, Any]]  #: the client's training cases


class Method:
    """A federated method: FedAvg unless a subclass overrides a part (see the module's docstring)."""
    #: The name a profile's `federated.method` gives.
    name: ClassVar[str] = ""
    #: One line for tables and `--help`.
    summary: ClassVar[str] = ""
    #: The strategy the ServerApp aggregates with.
    strategy: ClassVar[type[StudyFedAvg]] = StudyFedAvg
    #: The method's own `federated.*` knobs and their defaults (every method's are accepted in every profile).
    knobs: ClassVar[Mapping[str, Any]] = {}

    def resolve_knobs(self, fl: dict[str, Any]) -> None:
        """Type this method's knobs in the resolved `federated` settings `fl`, in place (defaults already in)."""

    def network(self, model: Mapping[str, Any], datasets: Sequence[str]) -> dict[str, Any]:
        """The `model` section this method trains, from the profile's and the federation's datasets."""
        return dict(model)

    def local_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The configuration a client trains under."""
        return cfg

    def hooks(self, local: LocalRound) -> LocalHooks:
        """What this method changes in one local round's training (`training.train_model`)."""
        return LocalHooks()

    def output_layer(self, model: torch.nn.Module,
                     patch_size: Sequence[int] | None = None) -> tuple[dict[str, int] | None, str | None]:
        """The output layer (`models.output_layer`) the federation measures dilution on (and `ownerfedavg`
        averages over owners), or (None, why not): a network without an output layer of its own
        (`models.NoOutputLayer`, e.g. UNet with residual units) measures none rather than measure weights that are
        not the logits' own."""
        try:
            return output_layer(model, patch_size), None
        except NoOutputLayer as error:
            return None, str(error)

    def check_network(self, cfg: Mapping[str, Any]) -> None:
        """Refuse, before anything trains, a profile whose network this method cannot run on."""

    def evaluation_block(self, model: torch.nn.Module, client: str) -> str | None:
        """The block of the global model that gives `client`'s owned channels when scored, None for all of it."""
        return None

    def build_network(self, cfg: Mapping[str, Any], datasets: Sequence[str]) -> torch.nn.Module:
        """This method's network for a profile (`network`), built."""
        return build_network(**self.network(cfg["model"], datasets))
