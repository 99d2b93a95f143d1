"""`fedgin`: FedGIN (Nagaraju et al. 2025): FedAvg with GIN augmentation (`fedseg.data.gin.RandGINd`) in every
client's local training; `preprocess.gin` gives its settings (default `GIN_DEFAULT`). Pair it with MRI-like
clients (`data.phantom.mri_like`) for the cross-contrast experiment."""

from __future__ import annotations

from typing import Any

from fedseg.federated.methods.base import Method

#: GIN settings of `fedgin` when the profile's `preprocess.gin` gives none.
GIN_DEFAULT: dict[str, Any] = {"prob": 0.5}


class FedGIN(Method):
    name = "fedgin"
    summary = "FedGIN: FedAvg with GIN intensity augmentation in local training"

    def local_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """GIN augmentation switched on (the profile's `preprocess.gin`, else `GIN_DEFAULT`)."""
        return {**cfg, "preprocess": {**cfg["preprocess"], "gin": cfg["preprocess"].get("gin") or GIN_DEFAULT}}
