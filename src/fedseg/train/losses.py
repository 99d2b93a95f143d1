"""Partial-label losses: what a client's loss does with the channels its dataset does not annotate.

Every loss takes `pred` logits (B, 8, *spatial), `target` multi-hot (B, 8, *spatial) from
`fedseg.data.labels.to_multihot`, and `owned` (B, 8) or (8,), the channels each sample's dataset annotates
(`labels.owned_mask`), and returns a scalar. The soft Dice is MONAI's `DiceLoss` on sigmoids, per sample
and channel; which (sample, channel) pairs count is decided here.

- `literal_dice_loss`: Shen et al. 2022's Eq. 2 read literally; unlabelled channels are taught "empty".
- `masked_dice_loss`: marginal loss; unlabelled channels get no loss and exactly zero gradient.
- `dice_ce_loss`: Wang & Ma 2022's Dice + cross-entropy, both on owned channels only; unlabelled channels as above.
- `literal_dice_ce_loss`: Dice + cross-entropy on all foreground channels, unlabelled ones as negatives.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

#: MONAI's default smoothing: an empty label and an empty prediction give Dice loss 0, never 0/0.
SMOOTH_NR = 1e-5
SMOOTH_DR = 1e-5

PartialLabelLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dice_per_channel(pred: torch.Tensor, target: torch.Tensor, smooth_nr: float = SMOOTH_NR,
                     smooth_dr: float = SMOOTH_DR) -> torch.Tensor:
    """MONAI soft Dice loss of sigmoid(pred) per sample and channel, shape (B, C); channels independent."""
    dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    return dice(pred, target.to(pred.dtype)).reshape(pred.shape[:2])


def batch_dice_per_channel(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                           smooth_nr: float = SMOOTH_NR, smooth_dr: float = SMOOTH_DR) -> torch.Tensor:
    """MONAI soft Dice loss per channel pooled over the samples that own it ("batch Dice"), shape (C,).

    A patch without the organ then still teaches through the pooled sums instead of giving a flat
    loss of ~1 (per-sample Dice of an empty target has almost no gradient). Unowned pairs are replaced
    by zeros with `torch.where`, so they add nothing and get exactly zero gradient.
    """
    keep = mask.reshape(*mask.shape, *([1] * (pred.ndim - 2)))
    probability = torch.where(keep, torch.sigmoid(pred), torch.zeros_like(pred))
    truth = torch.where(keep, target.to(pred.dtype), torch.zeros_like(pred))
    dice = DiceLoss(sigmoid=False, batch=True, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    return dice(probability, truth).reshape(-1)


def owned_pairs(owned: torch.Tensor | np.ndarray, pred: torch.Tensor) -> torch.Tensor:
    """`owned` as a (B, C) bool tensor on pred's device; a single (C,) mask applies to every sample."""
    mask = torch.as_tensor(owned, device=pred.device).bool()
    if mask.shape[-1] != pred.shape[1]:
        raise ValueError(f"owned has {mask.shape[-1]} channels but pred has {pred.shape[1]}: pass the "
                         "(B, 8) mask of fedseg.data.labels.owned_mask for each sample.")
    return mask.expand(pred.shape[0], -1) if mask.ndim == 1 else mask


def masked_mean(per_pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, C) values over the owned (sample, channel) pairs; 0 if none is owned.

    `torch.where` rather than a product, so an unowned pair passes back exactly zero gradient.
    """
    kept = torch.where(mask, per_pair, torch.zeros_like(per_pair))
    return kept.sum() / mask.sum().clamp_min(1)


def literal_dice_loss(pred: torch.Tensor, target: torch.Tensor, owned: torch.Tensor | None = None,
                      smooth_nr: float = SMOOTH_NR, smooth_dr: float = SMOOTH_DR, batch: bool = False) -> torch.Tensor:
    """Eq. 2 of Shen et al. 2022: mean soft Dice loss over channels 1..7 and samples; `owned` is ignored.

    Unlabelled channels: their target is 0, so they are taught "organ absent" (the paper's conflict).
    Eq. 2 writes 1/C (C=8) before a sum over 7 channels; its text says "average Dice of all output
    channels except the background", which is the mean taken here (the two differ by a factor 8/7).
    With `batch`, each channel's Dice pools the whole batch (see `batch_dice_per_channel`).
    """
    if batch:
        everything = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        return batch_dice_per_channel(pred, target, everything, smooth_nr, smooth_dr)[1:].mean()
    return dice_per_channel(pred, target, smooth_nr, smooth_dr)[:, 1:].mean()


def masked_dice_loss(pred: torch.Tensor, target: torch.Tensor, owned: torch.Tensor | np.ndarray,
                     smooth_nr: float = SMOOTH_NR, smooth_dr: float = SMOOTH_DR, batch: bool = False) -> torch.Tensor:
    """Marginal soft Dice loss: mean over the owned (sample, channel) pairs only.

    Unlabelled channels: no loss and exactly zero gradient (background is never owned, so never trained).
    With `batch`, each owned channel's Dice pools the samples that own it.
    """
    mask = owned_pairs(owned, pred)
    if batch:
        return _owned_channel_mean(batch_dice_per_channel(pred, target, mask, smooth_nr, smooth_dr), mask)
    return masked_mean(dice_per_channel(pred, target, smooth_nr, smooth_dr), mask)


def _owned_channel_mean(per_channel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (C,) values over the channels some sample owns; 0 if none is."""
    return masked_mean(per_channel[None], mask.any(dim=0)[None])


def dice_ce_loss(pred: torch.Tensor, target: torch.Tensor, owned: torch.Tensor | np.ndarray,
                 dice_weight: float = 1.0, ce_weight: float = 1.0, smooth_nr: float = SMOOTH_NR,
                 smooth_dr: float = SMOOTH_DR, batch: bool = False) -> torch.Tensor:
    """Wang & Ma 2022's compound loss: dice_weight * masked Dice + ce_weight * binary cross-entropy.

    Unlabelled channels: excluded from both terms (zero gradient); the BCE is the voxel mean per owned pair.
    """
    mask = owned_pairs(owned, pred)
    bce = F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none")
    bce = bce.reshape(*pred.shape[:2], -1).mean(dim=2)
    dice = masked_dice_loss(pred, target, mask, smooth_nr, smooth_dr, batch)
    return dice_weight * dice + ce_weight * masked_mean(bce, mask)


def literal_dice_ce_loss(pred: torch.Tensor, target: torch.Tensor, owned: torch.Tensor | None = None,
                         dice_weight: float = 1.0, ce_weight: float = 1.0, smooth_nr: float = SMOOTH_NR,
                         smooth_dr: float = SMOOTH_DR, batch: bool = False) -> torch.Tensor:
    """Dice + binary cross-entropy over all foreground channels, unlabelled ones taken as empty.

    The literal reading (Eq. 2's "unlabelled = negative") with Wang & Ma 2022's compound loss: unlike soft Dice,
    whose gradient on an empty target is almost zero, the cross-entropy really teaches "absent" there.
    """
    bce = F.binary_cross_entropy_with_logits(pred[:, 1:], target[:, 1:].to(pred.dtype))
    return dice_weight * literal_dice_loss(pred, target, None, smooth_nr, smooth_dr, batch) + ce_weight * bce


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "literal_dice": literal_dice_loss,
    "literal_dice_ce": literal_dice_ce_loss,
    "masked_dice": masked_dice_loss,
    "dice_ce": dice_ce_loss,
}


def check_loss(name: str) -> str:
    """`name`, or ValueError naming the losses."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}: use one of {', '.join(LOSSES)}.")
    return name


def build_loss(name: str, **kwargs: Any) -> PartialLabelLoss:
    """The loss `name` as a `(pred, target, owned) -> scalar` callable, its keyword settings fixed."""
    loss = LOSSES[check_loss(name)]
    settings = [p for p in inspect.signature(loss).parameters if p not in ("pred", "target", "owned")]
    unknown = sorted(set(kwargs) - set(settings))
    if unknown:
        raise ValueError(f"Loss {name} takes no setting {', '.join(unknown)}: it accepts {', '.join(settings)}.")
    return partial(loss, **kwargs)
