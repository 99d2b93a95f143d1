"""`fedprox`: FedAvg with FedProx's proximal term (Li et al., MLSys 2020) in each client's local loss,
mu/2 * ||w - w_global||^2, pulling local training towards the received global weights; mu = `federated.mu`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedseg.federated.methods.base import LocalRound, Method
from fedseg.train.training import LocalHooks


def proximal_term(reference: Mapping[str, torch.Tensor], mu: float):
    """FedProx's term mu/2 * sum over trainable parameters of ||w - w_global||^2, as a training extra loss.

    `reference` is the received global state_dict; it is copied, detached, so only w gets a gradient
    (mu * (w - w_global)).
    """
    frozen = {key: value.detach().clone() for key, value in reference.items()}

    def term(model: torch.nn.Module, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        total = logits.new_zeros(())
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                total = total + (parameter - frozen[name].to(parameter.device)).pow(2).sum()
        return 0.5 * mu * total

    return term


class FedProx(Method):
    name = "fedprox"
    summary = "FedAvg with FedProx's proximal term mu/2 ||w - w_global||^2 in the local loss"
    knobs = {"mu": 0.01}

    def resolve_knobs(self, fl: dict[str, Any]) -> None:
        fl["mu"] = float(fl["mu"])

    def hooks(self, local: LocalRound) -> LocalHooks:
        return LocalHooks(extra_loss=proximal_term(local.model.state_dict(), local.cfg["federated"]["mu"]))
