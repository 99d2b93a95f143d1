"""GIN: Global Intensity Non-linear augmentation, for the FedGIN experiment (docs/study.md, Experiments, item 6).

What it does. Every sample is passed through a *freshly drawn, randomly initialised* shallow 3D
convolutional network (``layers`` conv layers, kernel size drawn per layer from ``kernel_size``,
``channels`` intermediate channels, LeakyReLU between layers, no activation after the last one; weights
and biases drawn from a normal distribution and never trained). Its output is a non-linear, locally
textured re-mapping of the intensities that keeps the anatomy (shapes, edges) in place. The output is
min-max rescaled to the input's intensity range and blended with the original,
``out = alpha * gin(x) + (1 - alpha) * x`` with ``alpha ~ U(alpha_range)`` redrawn every sample.

Why. A segmentation network trained on CT alone learns CT's intensity ordering (fat dark, liver bright,
...); MRI orders tissues differently. GIN shows the network many random intensity orderings and textures
of the same anatomy, so it has to rely on shape. FedGIN applies it in each client's local training so
that a federation of CT and MRI clients (here: the synthetic MRI-like clients, ``data.phantom.mri_like``)
learns one modality-robust model with plain FedAvg.

References.
- C. Ouyang, C. Chen, S. Li, Z. Li, C. Qin, W. Bai, D. Rueckert, "Causality-inspired single-source domain
  generalization for medical image segmentation", IEEE TMI 2022 (arXiv:2111.12525) — GIN itself
  (reference code: GINGroupConv, 4 layers, 2 intermediate channels, kernels from {1, 3}).
- S. Dudda Nagaraju, A. Moradi, B. S. Abrahamsen, M. Elschot, "FedGIN: Federated Learning with Dynamic Global
  Intensity Non-linear Augmentation for Organ Segmentation using Multi-modal Images", 2025 (arXiv:2508.05137;
  docs/references.md) — GIN in the local training of FedAvg clients with unpaired CT and MRI.

Differences from the reference code, and why. (1) The input is standardised (zero mean, unit std) before
the network and the weights are drawn with std ``1/sqrt(fan_in)``, so the random biases (std 1) place the
LeakyReLU kinks inside the data's range whatever the intensity scale (the reference draws std-1 weights
and biases and leaves the input as its data loader normalised it). (2) Borders are padded by
replication, not zeros, so a patch does not get a bright or dark frame the network could learn. (3) The
reference rescales the blend to the input's Frobenius norm; here the GIN output is min-max rescaled to the
input's range *before* blending, so the result stays in [0, 1] like every other image of the study (HU
window scaled to [0, 1]).

Where it plugs in. After the patch crop of the training augmentation (``fedseg.data.transforms.augment``),
on each patch, before or beside the intensity shift; it touches only the image key, never the label.
``augment`` adds ``RandGINd`` there (after the spatial augmentation, before the intensity shift) when a
profile sets ``preprocess.gin``; the federated method ``fedgin`` sets it (``fedseg.federated.methods``).

Cost (one CPU thread of a shared AMD EPYC, float32, default settings, median over 20 draws of
``RandGINd.__call__``): 32^3 about 4 ms, 64^3 about 18 ms, 96^3 about 62 ms (mean 72 ms; the same
networks through plain ``F.conv3d`` took 316 ms median at 96^3, hence ``_conv_slices``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = ["GINLayer", "draw_gin_network", "gin_forward", "rescale_to_range", "gin_augment", "RandGINd"]

#: One conv layer of a GIN network: (weight of shape (out, in, k, k, k), bias of shape (out,)).
GINLayer = tuple[torch.Tensor, torch.Tensor]

_EPS = 1e-8


def _kernel_pool(kernel_size: int | Sequence[int]) -> tuple[int, ...]:
    pool = (kernel_size,) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if not pool or any(k < 1 or k % 2 == 0 for k in pool):
        raise ValueError(f"kernel_size={kernel_size!r}: use odd sizes >= 1, e.g. 1, 3 or (1, 3).")
    return pool


def draw_gin_network(generator: torch.Generator, layers: int = 4, channels: int = 2,
                     kernel_size: int | Sequence[int] = (1, 3), in_channels: int = 1,
                     out_channels: int = 1, dtype: torch.dtype = torch.float32) -> list[GINLayer]:
    """Draws the weights of one random GIN network from ``generator`` (on CPU).

    Each layer's kernel size is drawn uniformly from ``kernel_size`` (an int fixes it); weights are
    N(0, 1/fan_in), biases N(0, 1). Channels: ``in_channels -> channels -> ... -> out_channels``.
    """
    if layers < 1 or channels < 1:
        raise ValueError(f"layers={layers}, channels={channels}: both must be >= 1.")
    pool = _kernel_pool(kernel_size)
    widths = [in_channels] + [channels] * (layers - 1) + [out_channels]
    network: list[GINLayer] = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        k = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        std = 1.0 / math.sqrt(c_in * k ** 3)
        weight = torch.randn((c_out, c_in, k, k, k), generator=generator, dtype=dtype) * std
        bias = torch.randn((c_out,), generator=generator, dtype=dtype)
        network.append((weight, bias))
    return network


def _conv_slices(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3D convolution with replicate padding on slice layout (N, X, C, Y, Z), as one 2D convolution.

    A k^3 kernel is k 2D kernels on the (Y, Z) slices, summed over X offsets; a 1^3 kernel is a few
    multiply-adds. PyTorch's CPU conv3d is several times slower for the 1-4 channels GIN has (one 96^3,
    2->2, 3^3 layer: about 290 ms with conv3d, 35-80 ms here).
    """
    n, x, c_in, y, z = h.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    if k == 1:  # channel mixing: a few in-place multiply-adds beat a 1x1 convolution here
        out = h.new_empty((n, x, c_out, y, z))
        for o in range(c_out):
            acc = torch.mul(h[:, :, 0], weight[o, 0].reshape(()), out=out[:, :, o])
            for c in range(1, c_in):
                acc.add_(h[:, :, c] * weight[o, c].reshape(()))
            acc.add_(bias[o])
        return out
    pad = k // 2
    if pad:
        h = torch.cat([h[:, :1].expand(n, pad, c_in, y, z), h, h[:, -1:].expand(n, pad, c_in, y, z)], dim=1)
    flat = h.reshape(n * (x + 2 * pad), c_in, y, z)
    if pad:
        flat = F.pad(flat, (pad,) * 4, mode="replicate")
    kernels = weight.permute(2, 0, 1, 3, 4).reshape(k * c_out, c_in, k, k)  # (X offset, out) stacked
    planes = F.conv2d(flat, kernels).view(n, x + 2 * pad, k, c_out, y, z)
    out = planes[:, 0:x, 0]
    for i in range(1, k):
        out = out + planes[:, i:i + x, i]
    return out + bias.view(1, 1, c_out, 1, 1)


def gin_forward(x: torch.Tensor, network: Sequence[GINLayer], negative_slope: float = 0.01) -> torch.Tensor:
    """The raw output of a GIN network on ``x`` of shape (N, C_in, X, Y, Z): standardised input, 3D conv
    layers with replicate padding, LeakyReLU between layers (not after the last). Same result as
    ``F.conv3d`` on a replicate-padded input, computed faster (see ``_conv_slices``)."""
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    std = x.std(dim=(1, 2, 3, 4), keepdim=True) if x[0].numel() > 1 else torch.ones_like(mean)
    h = ((x - mean) / (std + _EPS)).permute(0, 2, 1, 3, 4)  # slice layout (N, X, C, Y, Z)
    for index, (weight, bias) in enumerate(network):
        h = _conv_slices(h, weight.to(h), bias.to(h))
        if index < len(network) - 1:
            h = F.leaky_relu(h, negative_slope)
    return h.permute(0, 2, 1, 3, 4)


def rescale_to_range(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Min-max rescales each sample/channel of ``values`` (N, C, ...) to the range of ``reference``.

    A constant ``values`` maps to the reference's minimum; a constant reference gives that constant.
    """
    dims = tuple(range(2, values.ndim))
    v_min, v_max = values.amin(dim=dims, keepdim=True), values.amax(dim=dims, keepdim=True)
    r_min, r_max = reference.amin(dim=dims, keepdim=True), reference.amax(dim=dims, keepdim=True)
    unit = (values - v_min) / torch.clamp(v_max - v_min, min=_EPS)
    return torch.minimum(torch.maximum(r_min + unit * (r_max - r_min), r_min), r_max)


@torch.no_grad()
def gin_augment(image: torch.Tensor, alpha: float, generator: torch.Generator, layers: int = 4,
                channels: int = 2, kernel_size: int | Sequence[int] = (1, 3),
                negative_slope: float = 0.01) -> torch.Tensor:
    """GIN on one channel-first image (C, X, Y, Z), returned in the compute dtype (float32/float64).

    Every channel goes through the same random network (drawn from ``generator``), is rescaled to its own
    range and blended: ``alpha * gin(x) + (1 - alpha) * x``. The result lies in each channel's range.
    """
    if image.ndim != 4:
        raise ValueError(f"GIN expects a channel-first 3D image (C, X, Y, Z), got shape {tuple(image.shape)}.")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    x = image.to(dtype).unsqueeze(1)  # (C, 1, X, Y, Z): channels as a batch through one network
    network = draw_gin_network(generator, layers, channels, kernel_size, dtype=dtype)
    g = rescale_to_range(gin_forward(x, network, negative_slope), x)
    out = x if alpha == 0.0 else (g if alpha == 1.0 else alpha * g + (1.0 - alpha) * x)
    return out.squeeze(1)


class RandGINd(RandomizableTransform, MapTransform):
    """MONAI dictionary transform: with probability ``prob``, GIN on each of ``keys`` (the image only).

    The random draws (whether to apply, ``alpha ~ U(alpha_range)``, and the seed of the torch.Generator
    that draws the network) all come from ``self.R``, so ``set_random_state`` (or a seeded Compose)
    makes it reproducible and the global torch RNG is never used. All keys of one sample share one network
    and one alpha. Numpy arrays, tensors and MetaTensors keep their type, dtype, device and shape.
    """

    def __init__(self, keys: KeysCollection = "image", prob: float = 0.5, layers: int = 4, channels: int = 2,
                 kernel_size: int | Sequence[int] = (1, 3), alpha_range: tuple[float, float] = (0.0, 1.0),
                 negative_slope: float = 0.01, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = float(alpha_range[0]), float(alpha_range[1])
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"alpha_range={alpha_range!r}: need 0 <= low <= high <= 1.")
        _kernel_pool(kernel_size)
        self.layers, self.channels, self.kernel_size = layers, channels, kernel_size
        self.alpha_range, self.negative_slope = (low, high), negative_slope
        self._alpha, self._seed = 0.0, 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._alpha = float(self.R.uniform(*self.alpha_range))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            tensor = convert_to_tensor(image, track_meta=False)
            generator = torch.Generator().manual_seed(self._seed)  # same network for every key
            out = gin_augment(tensor, self._alpha, generator, self.layers, self.channels, self.kernel_size,
                              self.negative_slope)
            d[key] = convert_to_dst_type(out, dst=image, dtype=image.dtype)[0]
        return d
