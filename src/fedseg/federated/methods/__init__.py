"""The federated methods, one module each, one `base.Method` object per method, registered by name.

| method | module | what it changes (besides FedAvg) |
|---|---|---|
| `fedavg` | `fedavg.py` | nothing: conventional FL (Shen et al. 2022), every parameter averaged with n_k / n |
| `ownerfedavg` | `ownerfedavg.py` | the strategy: each output channel averaged over its owners only (no dilution) |
| `fedprox` | `fedprox.py` | the local loss: FedProx's proximal term (`federated.mu`) |
| `segviz` | `segviz.py` | the network (SharedTaskUNet), the block a client trains and scores, the strategy |
| `fedgin` | `fedgin.py` | the local configuration: GIN augmentation (`preprocess.gin`) |
| `distill` | `distill.py` | the local loss: distillation from the global model (`federated.distill_weight`) |
| `pseudo` | `pseudo.py` | the local volumes: targets completed by the global model after `federated.pseudo_after` |

Adding a method is one module with a `Method` subclass and one line in `_BUILT_IN` below (or `register(...)` from
outside the package); `docs/methods.md` walks through one. The ClientApp, the ServerApp, the simulation and the
studies ask the method (`get(name)`), never test its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedseg.federated.methods import distill, fedavg, fedgin, fedprox, ownerfedavg, pseudo, segviz
from fedseg.federated.methods.base import LocalRound, Method

__all__ = ["LocalRound", "Method", "METHODS", "REGISTRY", "check_method", "check_network", "get", "knob_defaults",
           "register"]

_BUILT_IN: tuple[Method, ...] = (
    fedavg.FedAvg(), ownerfedavg.OwnerFedAvg(), fedprox.FedProx(), segviz.SegViz(), fedgin.FedGIN(),
    distill.Distill(), pseudo.Pseudo(),
)
#: Every method by its name, in the order tables list them.
REGISTRY: dict[str, Method] = {method.name: method for method in _BUILT_IN}
#: The built-in methods' names (a method registered later is in `REGISTRY`, not here).
METHODS: tuple[str, ...] = tuple(REGISTRY)


def register(method: Method) -> Method:
    """Add `method` under its name (refused when the name is taken or empty); returns it."""
    if not method.name or method.name in REGISTRY:
        raise ValueError(f"A method needs a name of its own: {method.name!r} is "
                         f"{'empty' if not method.name else 'taken'} (registered: {', '.join(REGISTRY)}).")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The method a profile's `federated.method` names; refused, naming the methods, when there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"federated.method={name!r}: use one of {', '.join(REGISTRY)}.") from None


def check_method(name: str) -> str:
    """`name` if it names a method, else ValueError naming them."""
    return get(name).name


def knob_defaults() -> dict[str, Any]:
    """Every method's own `federated.*` knobs and their defaults (every profile accepts all of them)."""
    return {key: value for method in REGISTRY.values() for key, value in method.knobs.items()}


def check_network(cfg: Mapping[str, Any]) -> None:
    """Refuse, before anything trains, a profile whose `federated.method` cannot run on its `model`
    (`Method.check_network`: `ownerfedavg` on a network with no output layer of its own)."""
    get(str((cfg.get("federated") or {}).get("method") or "fedavg")).check_network(cfg)
