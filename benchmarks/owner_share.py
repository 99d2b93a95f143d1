"""The owners' share of the head's update, measured on the real output path (the logits), for ownerfedavg and FedAvg
on the plain UNet (`num_res_units: 0`) and the residual UNet (`num_res_units: 1`, the smoke profile's until issue 27).

Two clients take one gradient step on the network's top up-layer (`model.2.*`, the head: the plain UNet's
transposed convolution; the residual UNet's transposed convolution, norm, PReLU and last ResidualUnit) from the same
weights, on the same random patches and random targets: the liver client on its own channels, the spleen client on
its own (`masked`: a masked loss) or on its own and "no liver" (`literal`: the paper's loss). One aggregation
(liver 1 case, spleen 3 by default), then, over the patches, with Δ the mean |change of the liver logit|:

- owners' share of Δlogit: Δ with only the owner's update / (that + Δ with only the non-owner's update): 1 when
  no non-owner's update of the head reaches the liver logit;
- owner's update kept: Δ with only the owner's update / Δ of the owner's own model: 1 without dilution, the owner's
  share of cases under FedAvg.

ownerfedavg "before" averages over owners the layer the old `models.output_layer` took (the last convolution with 8
outputs: the ResidualUnit's 8->8 convolution on the residual UNet); "now" the layer `models.output_layer` finds on
the output path, and refuses a network without one.

    .venv/bin/python benchmarks/owner_share.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedseg.data.labels import CHANNELS, NUM_CHANNELS, owned_mask
from fedseg.federated.methods import owner_output_average
from fedseg.train.models import NoOutputLayer, build_network, load_weights, output_layer, unique_state_dict

State = dict[str, torch.Tensor]


def old_output_layer(model: nn.Module) -> dict[str, int]:
    """The layer `models.output_layer` took before issue 27: the last convolution with NUM_CHANNELS outputs."""
    layer = [m for m in model.modules()
             if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == NUM_CHANNELS][-1]
    tensors = {id(layer.weight): 1 if layer.transposed else 0,
               **({id(layer.bias): 0} if layer.bias is not None else {})}
    return {k: tensors[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in tensors}


def head_step(model: nn.Module, start: State, x: torch.Tensor, target: torch.Tensor, channels: np.ndarray,
              lr: float) -> State:
    """`start` after one SGD step of BCE on `channels` (the others masked out), on the top up-layer only."""
    load_weights(model, start).train()
    model.zero_grad()
    logits = model(x)[:, channels]
    nn.functional.binary_cross_entropy_with_logits(logits, target[:, channels]).backward()
    named = dict(model.named_parameters())
    return {k: (v - lr * named[k].grad).detach() if k.startswith("model.2.") else v.clone() for k, v in start.items()}


def fedavg(states: list[State], sizes: list[int]) -> State:
    total = float(sum(sizes))
    return {k: sum((n / total) * s[k].double() for s, n in zip(states, sizes)).to(states[0][k].dtype)
            for k in states[0]}


def ownerfedavg(axes: Mapping[str, int]) -> Callable[[list[State], list[int], State], State]:
    def aggregate(states: list[State], sizes: list[int], previous: State) -> State:
        averaged = fedavg(states, sizes)
        owned = owner_output_average([{k: s[k].numpy() for k in axes} for s in states], sizes, ["liver", "spleen"],
                                     axes, {k: previous[k].numpy() for k in axes})
        return {**averaged, **{k: torch.from_numpy(v) for k, v in owned.items()}}
    return aggregate


def measure(num_res_units: int, loss: str, sizes: list[int], lr: float, batch: int, side: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_network("UNet", channels=[8, 16, 32], strides=[2, 2], num_res_units=num_res_units)  # smoke's
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, side, side, side, generator=generator)
    target = (torch.rand(batch, NUM_CHANNELS, side, side, side, generator=generator) < 0.3).float()
    liver = CHANNELS.index("liver")
    start = {k: v.clone() for k, v in unique_state_dict(model).items()}
    owner = head_step(model, start, x, target, owned_mask("liver").nonzero()[0], lr)
    spleen = owned_mask("spleen").nonzero()[0]
    other_channels = spleen if loss == "masked" else np.array([*spleen, liver])
    other_target = target.clone()
    other_target[:, liver] = 0  # the literal loss: "no liver" on the spleen client's scans
    other = head_step(model, start, x, other_target, other_channels, lr)

    def logit(state: State) -> torch.Tensor:
        load_weights(model, state).eval()
        with torch.no_grad():
            return model(x)[:, liver]

    base = logit(start)
    own_model = (logit(owner) - base).abs().mean().item()
    methods: dict[str, Callable | str] = {
        "fedavg": lambda s, n, p: fedavg(s, n),
        "ownerfedavg, before (old output_layer)": ownerfedavg(old_output_layer(model)),
    }
    try:
        methods["ownerfedavg, now (output_layer)"] = ownerfedavg(output_layer(model))
    except NoOutputLayer as error:
        methods["ownerfedavg, now (output_layer)"] = f"refused: {str(error).split(':')[0]}"
    rows = []
    for name, aggregate in methods.items():
        row = {"network": f"UNet num_res_units={num_res_units}", "loss": loss, "method": name}
        if isinstance(aggregate, str):
            rows.append({**row, "owners' share of Δlogit": aggregate, "owner's update kept": aggregate})
            continue
        from_owner = (logit(aggregate([owner, start], sizes, start)) - base).abs().mean().item()
        from_other = (logit(aggregate([start, other], sizes, start)) - base).abs().mean().item()
        rows.append({**row, "owners' share of Δlogit": round(from_owner / (from_owner + from_other), 3),
                     "owner's update kept": round(from_owner / own_model, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner-cases", type=int, default=1, help="the liver client's n_k")
    parser.add_argument("--other-cases", type=int, default=3, help="the spleen client's n_k")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=4, help="random patches the logits are measured on")
    parser.add_argument("--side", type=int, default=32, help="patch side (the smoke profile's)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = [args.owner_cases, args.other_cases]
    rows = [row for units in (1, 0) for loss in ("masked", "literal")
            for row in measure(units, loss, sizes, args.lr, args.batch, args.side)]
    print(f"liver logit, one aggregation; owner's share of cases {sizes[0] / sum(sizes):.3f}")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
