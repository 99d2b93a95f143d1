"""`distill`: FedAvg where each client's unlabelled channels are supervised by the received global model's predictions
on the same patch (ConDistFL-style conditional distillation, `fedseg.train.completion`), weighted by
`federated.distill_weight`, on the voxels the client's own labels call background."""

from __future__ import annotations

from typing import Any

import torch

from fedseg.data.transforms import IMAGE, LABEL
from fedseg.federated.methods.base import LocalRound, Method
from fedseg.train.completion import distillation_loss
from fedseg.train.training import LocalHooks


def distillation_term(teacher: torch.nn.Module, weight: float):
    """ConDistFL-style distillation as a training extra loss: `weight` x `completion.distillation_loss` of
    the student's logits against the frozen `teacher`'s (the received global model) on the same patch, over
    the channels the sample's dataset does not own, on voxels its own labels call background."""
    teacher = teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def term(model: torch.nn.Module, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        image = batch[IMAGE]
        teacher.to(image.device)
        with torch.no_grad():
            reference = teacher(image).float()
        target = batch[LABEL].to(image.device)
        return weight * distillation_loss(logits, reference, batch["owned"].to(image.device), target=target,
                                          condition_on_background=True)

    return term


class Distill(Method):
    name = "distill"
    summary = "FedAvg with the global model distilled into each client's unlabelled channels"
    knobs = {"distill_weight": 1.0}

    def resolve_knobs(self, fl: dict[str, Any]) -> None:
        fl["distill_weight"] = float(fl["distill_weight"])

    def hooks(self, local: LocalRound) -> LocalHooks:
        return LocalHooks(extra_loss=distillation_term(local.global_model(), local.cfg["federated"]["distill_weight"]))
