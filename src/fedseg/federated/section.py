"""The federation's settings as the stages read them: `FederatedSettings`, a typed, read-only view of a resolved
profile's `federated:` section (`settings.federated_settings` resolves it; the dict stays the form written into
`fl/config.json` and every checkpoint). The ServerApp, a client's local round and the simulation take this object,
not the whole configuration, for the federation's knobs; a method's own knobs are under `knobs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class FederatedSettings:
    """The `federated:` section, typed (see `fedseg/profiles/base.yaml` for what each means)."""

    method: str
    rounds: int
    local_steps: int
    fraction_train: float
    min_clients: int
    val_every: int
    client_cpus: float
    client_gpus: float
    cpu_clients: bool
    keep_optimizer: bool
    client_workers: int
    round_timeout: float
    wait_timeout: float
    compare_loss: str | None
    #: each method's own knobs (mu, distill_weight, pseudo_after, ...), read-only
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> FederatedSettings:
        """The typed view of a resolved configuration's `federated` section (`settings.federated_settings`)."""
        fl = dict(cfg["federated"])
        names = {f.name for f in dataclasses.fields(cls)} - {"knobs"}
        missing = sorted(names - set(fl))
        if missing:
            raise ValueError(f"federated settings without {', '.join(missing)}: resolve the profile first "
                             "(fedseg.federated.settings.study_config or federated_settings).")
        return cls(method=str(fl["method"]), rounds=int(fl["rounds"]), local_steps=int(fl["local_steps"]),
                   fraction_train=float(fl["fraction_train"]), min_clients=int(fl["min_clients"]),
                   val_every=int(fl["val_every"]), client_cpus=float(fl["client_cpus"]),
                   client_gpus=float(fl["client_gpus"]), cpu_clients=bool(fl["cpu_clients"]),
                   keep_optimizer=bool(fl["keep_optimizer"]), client_workers=int(fl["client_workers"]),
                   round_timeout=float(fl["round_timeout"]), wait_timeout=float(fl["wait_timeout"]),
                   compare_loss=fl["compare_loss"] or None,
                   knobs=MappingProxyType({k: v for k, v in fl.items() if k not in names}))

    def validated(self, server_round: int) -> bool:
        """Whether round `server_round` validates the models: every `val_every`-th round and the last."""
        return server_round % self.val_every == 0 or server_round == self.rounds
