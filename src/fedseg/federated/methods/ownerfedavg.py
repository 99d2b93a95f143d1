"""`ownerfedavg`: FedAvg, except the output layer: each channel's weights and bias are the n_k-weighted mean over the
clients whose dataset annotates that channel (its owners) only; a channel nobody owns keeps its previous value.

With a masked loss a non-owner sends that channel's output weights back unchanged, so FedAvg moves them by only
n_owner / n of their owner's update (dilution); this removes the dilution and nothing else. It needs a network whose
logits are one convolution's output (`models.output_layer`): UNet with `num_res_units: 0`, DynUNet and the other
MONAI networks; it is refused on UNet with residual units, whose last ResidualUnit writes every logit with weights
all clients train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedseg.federated.methods.base import Method
from fedseg.federated.strategies import StudyOwnerFedAvg


class OwnerFedAvg(Method):
    name = "ownerfedavg"
    summary = "FedAvg with each output channel averaged over its owners only (no dilution)"
    strategy = StudyOwnerFedAvg

    def output_layer(self, model: torch.nn.Module,
                     patch_size: Sequence[int] | None = None) -> tuple[dict[str, int] | None, str | None]:
        axes, reason = super().output_layer(model, patch_size)
        if axes is None:
            raise ValueError(f"federated.method=ownerfedavg is refused on this network: {reason}")
        return axes, None

    def check_network(self, cfg: Mapping[str, Any]) -> None:
        self.output_layer(self.build_network(cfg, []), (cfg.get("preprocess") or {}).get("patch_size"))
