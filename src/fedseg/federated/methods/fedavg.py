"""`fedavg`: conventional FL (Shen et al. 2022, McMahan et al. 2017): every parameter averaged with n_k / n.
Every default of `base.Method` is FedAvg's, so it overrides nothing."""

from __future__ import annotations

from fedseg.federated.methods.base import Method


class FedAvg(Method):
    name = "fedavg"
    summary = "FedAvg: every parameter averaged with n_k / n"
