"""Networks by name, and the SegViz network with one shared block and one task block per client.

Every network maps a (B, 1, *patch) CT patch to (B, 8, *patch) raw logits, one per channel of
`fedseg.data.labels.CHANNELS`; sigmoids are applied by the losses and metrics (independent, multi-label).

The paper's network (Shen et al. 2022) is C2FNAS (Yu et al., CVPR 2020), which MONAI does not ship. Its stand-in
is MONAI's `DynUNet`, the default of the `paper` profile: C2FNAS is a searched U-shaped 3D encoder-decoder
with skip connections whose cells are 2D/3D/pseudo-3D convolutions, and DynUNet is the nnU-Net-style 3D
U-Net of the same shape (instance-norm convolution blocks, strided downsampling, transposed-convolution
upsampling, 4-5 resolution levels on 96^3 patches) with no search to reproduce; for the paper profile,
`{"name": "DynUNet", "filters": [32, 64, 128, 256, 320], "strides": [1, 2, 2, 2, 2]}` (16.7 M parameters).
The light default for the CPU profiles is MONAI's `UNet` with channels 16-128 and one residual unit per
level (0.6 M parameters); the smoke and laptop profiles set `num_res_units: 0`, which `ownerfedavg` and the dilution
measurement need (`output_layer`: with residual units no layer gives the logits alone).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks import nets
from monai.networks.blocks.dynunet_block import (
    UnetBasicBlock,
    UnetOutBlock,
    UnetResBlock,
    UnetUpBlock,
)
from torch import nn

from fedseg.data.labels import LABEL_MAPS, NUM_CHANNELS, TRAIN_DATASETS, owned_mask

#: Logit given in the meta-model output to a foreground channel no task block owns: sigmoid ~ 2e-9, absent.
ABSENT_LOGIT = -20.0


class SharedTaskUNet(nn.Module):
    """SegViz's 3D U-Net (Kanhere et al. 2024): a shared representation block and one task block per task.

    The shared block (`shared.`) is the encoder and bottleneck; each task block (`task.<name>.`) is a
    decoder with skip connections from the shared encoder and a 1x1x1 head giving 8 logits. Selective
    aggregation averages only the `shared` group (see `parameter_group`, `split_state_dict`).
    """

    def __init__(
        self,
        tasks: Sequence[str] = TRAIN_DATASETS,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = NUM_CHANNELS,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int | Sequence[int]] = (2, 2, 2),
        kernel_size: int = 3,
        res_block: bool = True,
        norm_name: str | tuple = ("INSTANCE", {"affine": True}),
        dropout: float | None = None,
    ):
        super().__init__()
        _check_shared_task_args(tasks, out_channels, channels, strides)
        self.tasks = tuple(tasks)
        block = UnetResBlock if res_block else UnetBasicBlock
        levels = [
            block(spatial_dims, c_in, c_out, kernel_size, stride, norm_name=norm_name, dropout=dropout)
            for c_in, c_out, stride in zip([in_channels, *channels[:-1]], channels, [1, *strides])
        ]
        self.shared = nn.ModuleDict({"encoder": nn.ModuleList(levels[:-1]), "bottleneck": levels[-1]})
        self.task = nn.ModuleDict({
            name: _task_block(spatial_dims, out_channels, channels, strides, kernel_size, norm_name, dropout)
            for name in self.tasks
        })
        self.channel_source = meta_channel_sources(self.tasks)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared block: skip features of each encoder level, then the bottleneck's output."""
        features = []
        for level in self.shared["encoder"]:
            x = level(x)
            features.append(x)
        return [*features, self.shared["bottleneck"](x)]

    def decode(self, features: list[torch.Tensor], task: str) -> torch.Tensor:
        """One task block on the shared features: the 8-channel logits of that task."""
        if task not in self.task:
            raise ValueError(f"Unknown task {task!r}: this network's task blocks are {', '.join(self.tasks)}.")
        *skips, x = features
        for up, skip in zip(self.task[task]["decoder"], reversed(skips)):
            x = up(x, skip)
        return self.task[task]["head"](x)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Logits of `task`'s block, or with task=None the meta-model's (see `meta_logits`)."""
        features = self.encode(x)
        if task is not None:
            return self.decode(features, task)
        sources = [t for t in self.tasks if t in self.channel_source]
        return meta_logits({t: self.decode(features, t) for t in sources}, self.channel_source)


def _check_shared_task_args(tasks: Sequence[str], out_channels: int, channels: Sequence[int],
                            strides: Sequence[Any]) -> None:
    """Clear errors for SharedTaskUNet arguments that would otherwise fail deep inside torch."""
    unknown = [t for t in tasks if t not in LABEL_MAPS]
    if not tasks or unknown:
        raise ValueError(f"SharedTaskUNet tasks {list(tasks)} must be non-empty dataset names from "
                         f"{', '.join(LABEL_MAPS)} (fedseg.data.labels), which say which channels each task owns.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"SharedTaskUNet tasks {list(tasks)} repeat a name: give each task once.")
    if out_channels != NUM_CHANNELS:
        raise ValueError(f"SharedTaskUNet out_channels={out_channels}: the meta-model needs the "
                         f"{NUM_CHANNELS} channels of fedseg.data.labels.CHANNELS.")
    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(f"SharedTaskUNet channels {list(channels)} and strides {list(strides)}: give at "
                         "least two channel counts and one stride per downsampling (len(channels) - 1).")


def _task_block(spatial_dims: int, out_channels: int, channels: Sequence[int],
                strides: Sequence[Any], kernel_size: int, norm_name: str | tuple,
                dropout: float | None) -> nn.ModuleDict:
    """A decoder (one up block per downsampling, deepest first) and a 1x1x1 head."""
    ups = [
        UnetUpBlock(spatial_dims, channels[i], channels[i - 1], kernel_size, 1, strides[i - 1],
                    norm_name=norm_name, dropout=dropout)
        for i in range(len(channels) - 1, 0, -1)
    ]
    return nn.ModuleDict({"decoder": nn.ModuleList(ups), "head": UnetOutBlock(spatial_dims, channels[0], out_channels)})


def meta_channel_sources(tasks: Sequence[str]) -> list[str | None]:
    """For each channel, the task whose block gives it in the meta-model (the first listed owner), else None.

    Background is never owned (`labels.owned_mask`), so it is None, as is a foreground channel no task owns.
    """
    sources: list[str | None] = [None] * NUM_CHANNELS
    for task in tasks:
        for c in owned_mask(task).nonzero()[0]:
            sources[c] = sources[c] or task
    return sources


def meta_logits(task_logits: Mapping[str, torch.Tensor], channel_source: Sequence[str | None]) -> torch.Tensor:
    """SegViz meta-model output: each foreground channel from the task block that owns it.

    A foreground channel no task owns is `ABSENT_LOGIT` (no client taught anyone that organ). Background,
    which no dataset annotates, is 1 - max foreground probability, i.e. the logit -max(foreground logits).
    """
    reference = next(iter(task_logits.values()))
    foreground = torch.stack([
        task_logits[source][:, c] if source else torch.full_like(reference[:, c], ABSENT_LOGIT)
        for c, source in enumerate(channel_source) if c > 0
    ], dim=1)
    background = -foreground.amax(dim=1, keepdim=True)
    return torch.cat([background, foreground], dim=1)


def parameter_group(name: str) -> str:
    """The aggregation group of a SharedTaskUNet parameter or buffer name: "shared" or "task:<name>"."""
    parts = name.split(".")
    if parts[0] == "shared" and len(parts) > 1:
        return "shared"
    if parts[0] == "task" and len(parts) > 2:
        return f"task:{parts[1]}"
    raise ValueError(f"Parameter {name!r} is in neither the shared block ('shared.') nor a task block "
                     "('task.<name>.'): pass a SharedTaskUNet state_dict, unwrapped (no 'module.' prefix).")


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A SharedTaskUNet state_dict split by `parameter_group`, keys kept whole so parts load back as they are."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        groups.setdefault(parameter_group(key), {})[key] = value
    return groups


#: Cube sides `output_layer` tries for its forward pass, smallest first (the transformers need 64 or 96).
PROBE_SIDES = (16, 32, 64, 96)


class NoOutputLayer(ValueError):
    """The network has no convolution whose output is its logits, so no weights belong to one channel alone."""


def output_layer(model: nn.Module, patch_size: Sequence[int] | None = None) -> dict[str, int]:
    """The state_dict keys of the layer that gives the logits, each with the axis that indexes the output channel.

    The output layer is the convolution whose output *is* the network's output, found by one forward pass (eval
    mode, no gradient, a seeded random patch: a cube of `PROBE_SIDES`, else `patch_size`) with a hook on every
    convolution: the one called once whose output equals the logits exactly. Its weight row (Conv: axis 0;
    ConvTranspose: axis 1, its weight is (in, out, ...)) and bias entry c are then the only weights that write
    channel c's logit alone (all else feeds every channel), under the names `unique_state_dict` gives them (the
    form the federation's messages carry). Dilution is measured on these (`aggregation.output_moves`) and
    `ownerfedavg` averages them over each channel's owners only.

    Raises `NoOutputLayer`, naming the network, when no convolution gives the logits: MONAI's UNet with
    `num_res_units` >= 1 ends in a ResidualUnit that adds every channel of the layer before to the logits, and
    SharedTaskUNet's meta-model takes each channel from another task block.
    """
    found = _logit_convolution(model, patch_size)
    if found is None:
        raise NoOutputLayer(_no_output_layer_reason(model))
    weight_axis = 1 if found.transposed else 0
    tensors = {id(found.weight): weight_axis, **({id(found.bias): 0} if found.bias is not None else {})}
    return {key: tensors[id(value)] for key, value in _first_names(model).items() if id(value) in tensors}


def _logit_convolution(model: nn.Module, patch_size: Sequence[int] | None) -> nn.modules.conv._ConvNd | None:
    """The convolution, called once, whose output equals `model`'s output on a probe patch, else None."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convolutions:
        return None
    parameter = next(model.parameters())
    dims = convolutions[0].weight.ndim - 2
    in_channels = convolutions[0].in_channels
    shapes = [(side,) * dims for side in PROBE_SIDES] + ([tuple(patch_size)] if patch_size is not None else [])
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [c.register_forward_hook(lambda module, args, out, k=k: outputs.setdefault(k, []).append(out.clone()))
             for k, c in enumerate(convolutions)]
    training, failure = model.training, None
    generator = torch.Generator().manual_seed(0)  # the global RNG is left as the caller seeded it
    try:
        model.eval()
        for shape in shapes:
            outputs.clear()
            patch = torch.randn(1, in_channels, *shape, generator=generator).to(parameter)
            try:
                with torch.no_grad():
                    logits = model(patch)
            except (RuntimeError, ValueError, AssertionError) as error:  # too small a patch: a bigger one
                failure = error
                continue
            for k, calls in outputs.items():
                if len(calls) == 1 and calls[0].shape == logits.shape and torch.equal(calls[0], logits):
                    return convolutions[k]
            return None
        raise ValueError(f"{type(model).__name__} ran on no probe patch of side {', '.join(map(str, PROBE_SIDES))}"
                         f"{f' or {list(patch_size)}' if patch_size is not None else ''}: pass the profile's "
                         f"patch size to output_layer ({type(failure).__name__}: {failure}).") from failure
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)


def _no_output_layer_reason(model: nn.Module) -> str:
    """Why `model` has no output layer of its own, naming the network and what to use instead."""
    need = ("ownerfedavg (each channel's output weights averaged over its owners) and the dilution measurement "
            "(metrics/fl_dilution.csv) need a layer whose weight row c and bias c alone write channel c's logit")
    name = type(model).__name__
    if isinstance(model, nets.UNet) and getattr(model, "num_res_units", 0) >= 1:
        return (f"UNet with num_res_units={model.num_res_units} has no output layer of its own: its last "
                "ResidualUnit adds every channel of the transposed convolution before it to the logits (the "
                "identity residual) and mixes them all in its convolution, so weights that FedAvg averages over "
                f"every client write each channel's logit. {need}: set model.num_res_units: 0 (the laptop "
                "profile's UNet, whose last transposed convolution gives the logits) or use DynUNet.")
    if isinstance(model, SharedTaskUNet):
        return (f"SharedTaskUNet's logits (the meta-model) take each channel from its owner's task block, not from "
                f"one convolution. {need}; SegViz (federated.method: segviz) keeps each task block as its owner "
                "sent it instead.")
    return (f"{name} has no convolution whose output is its logits (checked by a forward pass). {need}: use "
            "UNet with num_res_units: 0 or DynUNet.")


def _first_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter and buffer of `model` once, under the first name its state_dict gives it (not detached)."""
    first: dict[int, str] = {}
    return {key: value for key, value in model.state_dict(keep_vars=True).items()
            if first.setdefault(id(value), key) == key}


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each tensor once, under the first name it has (detached).

    A module registered twice has its tensors twice in a state_dict: MONAI's DynUNet keeps its blocks both in
    their own attributes and in `skip_layers`, so the paper profile's state_dict lists 148 entries of 127 MiB
    for 75 tensors of 64 MiB. The federation's messages and the checkpoints hold this form, so each weight
    travels and is stored once; `load_weights` restores the aliases.
    """
    return {key: value.detach() for key, value in _first_names(model).items()}


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state_dict written by `unique_state_dict` (or a full one) into `model`, aliases restored.

    A key `model` has under a second name is filled from its first name; the load stays strict, so a key
    missing under every name, or one `model` does not have, still fails as `load_state_dict` says.
    """
    first: dict[int, str] = {}
    restored = dict(state)
    for key, value in model.state_dict(keep_vars=True).items():
        original = first.setdefault(id(value), key)
        if key not in restored and original in state:
            restored[key] = state[original]
    model.load_state_dict(restored)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of `model`: the size a client sends per round."""
    return sum(p.numel() for p in model.parameters())


#: Each network's constructor and its light defaults (CPU profiles); a profile's kwargs override them.
NETWORKS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "UNet": (nets.UNet, {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}),
    "BasicUNet": (nets.BasicUNet, {"features": (16, 16, 32, 64, 128, 16)}),
    "DynUNet": (nets.DynUNet, {"filters": (16, 32, 64, 128), "strides": (1, 2, 2, 2), "res_block": True}),
    "SegResNet": (nets.SegResNet, {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}),
    "AttentionUnet": (nets.AttentionUnet, {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}),
    # The transformers need MONAI's optional `einops`. UNETR's img_size must equal the profile's patch
    # size; SwinUNETR needs patches divisible by 32 and at least 64 (a 1-voxel bottleneck cannot be normed).
    "UNETR": (nets.UNETR, {"img_size": (96, 96, 96), "feature_size": 16, "hidden_size": 192,
                           "mlp_dim": 768, "num_heads": 4}),
    "SwinUNETR": (nets.SwinUNETR, {"feature_size": 12}),
    "SharedTaskUNet": (SharedTaskUNet, {"tasks": TRAIN_DATASETS, "channels": (16, 32, 64, 128),
                                        "strides": (2, 2, 2)}),
}


def shared_task_shape(model: Mapping[str, Any]) -> dict[str, Any]:
    """SharedTaskUNet's `channels` and `strides` for the shape of a profile's `model` section, so that SegViz
    trains a network of the size every other method trains.

    UNet, AttentionUnet and SharedTaskUNet list one stride per downsampling, as SharedTaskUNet does. DynUNet
    names its channels `filters` and lists a stride for its input level too, which must be 1: SharedTaskUNet's
    first level keeps the input's resolution (the paper profile's `[1, 2, 2, 2, 2]` gives `[2, 2, 2, 2]`).
    Other networks have no such shape to copy, and SegViz refuses them rather than build another size.
    """
    name = model.get("name")
    if name not in NETWORKS:
        raise ValueError(f"Unknown network {name!r}: use one of {', '.join(NETWORKS)}.")
    resolved = network_kwargs(name, **{k: v for k, v in model.items() if k != "name"})
    if name in ("UNet", "AttentionUnet", "SharedTaskUNet"):
        return {"channels": list(resolved["channels"]), "strides": list(resolved["strides"])}
    if name == "DynUNet":
        first, *strides = resolved["strides"]
        if set(np.atleast_1d(first).tolist()) != {1}:
            raise ValueError(f"DynUNet strides {list(resolved['strides'])} downsample the input level; SegViz's "
                             "SharedTaskUNet keeps it at full resolution: give the model strides starting with 1.")
        return {"channels": list(resolved["filters"]), "strides": strides}
    raise ValueError(f"SegViz builds a SharedTaskUNet shaped like the profile's network, and {name} has no "
                     "channels and strides to copy: set model.name to UNet or DynUNet for a SegViz run.")


def network_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `build_network` passes to network `name`: its defaults, then `kwargs`."""
    if name not in NETWORKS:
        raise ValueError(f"Unknown network {name!r}: use one of {', '.join(NETWORKS)}.")
    constructor, defaults = NETWORKS[name]
    resolved = {**defaults, **kwargs}
    if name == "DynUNet":
        resolved = _dynunet_kernels(resolved)
    accepted = inspect.signature(constructor).parameters
    unknown = sorted(set(resolved) - set(accepted))
    if unknown:
        raise ValueError(f"Network {name} takes no argument {', '.join(unknown)}: check the profile's "
                         f"network settings; it accepts {', '.join(p for p in accepted if p != 'self')}.")
    return resolved


def _dynunet_kernels(kwargs: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's rule for DynUNet: 3^3 kernels at every level, upsampling kernels equal to the strides."""
    strides = list(kwargs["strides"])
    kwargs.setdefault("kernel_size", [3] * len(strides))
    kwargs.setdefault("upsample_kernel_size", strides[1:])
    return kwargs


def build_network(name: str, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = NUM_CHANNELS,
                  **kwargs: Any) -> nn.Module:
    """A MONAI 3D segmentation network (or SharedTaskUNet) by name, giving raw logits of `out_channels`.

    kwargs (e.g. a profile's `{"channels": [16, 32, 64, 128], "num_res_units": 2}`) override `NETWORKS`'
    light defaults; `network_kwargs` shows the result.
    """
    resolved = network_kwargs(name, **kwargs)
    constructor = NETWORKS[name][0]
    return constructor(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **resolved)

