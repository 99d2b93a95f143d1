"""Partial-label losses on small tensors: what each does with channels a dataset does not annotate."""

import numpy as np
import pytest
import torch

from fedseg.data.labels import CHANNEL_INDEX, NUM_CHANNELS, owned_mask
from fedseg.train.losses import LOSSES, build_loss

SHAPE = (6, 6, 6)
LIVER, TUMOR, SPLEEN, KIDNEY = (CHANNEL_INDEX[c] for c in ("liver", "liver_tumor", "spleen", "kidney"))


def liver_target(batch=1):
    """A liver case: a liver block with a tumour inside; every other foreground channel empty."""
    target = torch.zeros(batch, NUM_CHANNELS, *SHAPE)
    target[:, LIVER, 1:5, 1:5, 1:5] = 1
    target[:, TUMOR, 2:4, 2:4, 2:4] = 1
    target[:, 0] = 1 - target[:, LIVER]
    return target


def owned(*datasets):
    return torch.as_tensor(np.stack([owned_mask(d) for d in datasets]))


def logits(batch=1, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, NUM_CHANNELS, *SHAPE, requires_grad=True)


def grad_of(name, pred, target, mask):
    build_loss(name)(pred, target, mask).backward()
    return pred.grad


@pytest.mark.parametrize("name", ["masked_dice", "dice_ce"])
def test_unlabelled_channels_get_exactly_zero_gradient_under_masked_losses(name):
    pred, mask = logits(), owned("liver")
    grad = grad_of(name, pred, liver_target(), mask)
    assert torch.all(grad[:, ~mask[0]] == 0)
    assert grad[:, LIVER].abs().sum() > 0 and grad[:, TUMOR].abs().sum() > 0


def test_literal_loss_pushes_unlabelled_channels_towards_empty():
    pred = logits()
    grad = grad_of("literal_dice", pred, liver_target(), owned("liver"))
    for channel in (SPLEEN, KIDNEY):
        assert grad[:, channel].abs().sum() > 0
        assert grad[:, channel].sum() > 0  # descending lowers those logits: "organ absent"
    assert torch.all(grad[:, 0] == 0)  # Eq. 2 leaves background out


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_and_gradients_are_finite_on_completely_empty_labels(name):
    pred = logits(batch=2)
    target = torch.zeros(2, NUM_CHANNELS, *SHAPE, dtype=torch.uint8)
    loss = build_loss(name)(pred, target, owned("liver", "spleen"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_finite_when_no_channel_is_owned(name):
    pred = logits()
    loss = build_loss(name)(pred, liver_target(), torch.zeros(1, NUM_CHANNELS, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_perfect_prediction_gives_near_zero_masked_dice():
    target = liver_target()
    pred = (target * 2 - 1) * 30.0  # sigmoid ~ 1 inside, ~ 0 outside
    assert build_loss("masked_dice")(pred, target, owned("liver")).item() < 1e-4
    assert build_loss("masked_dice")(-pred, target, owned("liver")).item() > 0.99


def test_masked_loss_ignores_the_logits_of_unowned_channels():
    target, mask = liver_target(), owned("liver")
    pred = logits().detach()
    changed = pred.clone()
    changed[:, SPLEEN] = -30.0  # spleen predicted empty, as the literal loss wants
    changed[:, KIDNEY] = -changed[:, KIDNEY]
    for name in ("masked_dice", "dice_ce"):
        assert build_loss(name)(pred, target, mask) == build_loss(name)(changed, target, mask)
    # the literal loss counts the empty spleen channel: an empty prediction there lowers it by ~1/7
    drop = build_loss("literal_dice")(pred, target, mask) - build_loss("literal_dice")(changed, target, mask)
    assert drop.item() == pytest.approx(1 / 7, abs=0.01)


def test_per_sample_ownership_in_a_batch_mixing_two_datasets():
    target = liver_target(batch=2)
    target[1] = 0
    target[1, SPLEEN, 0:3, 0:3, 0:3] = 1  # sample 1 is a spleen case
    target[1, 0] = 1 - target[1, SPLEEN]
    pred = logits(batch=2)
    grad = grad_of("masked_dice", pred, target, owned("liver", "spleen"))
    assert grad[0, LIVER].abs().sum() > 0 and torch.all(grad[0, SPLEEN] == 0)
    assert grad[1, SPLEEN].abs().sum() > 0 and torch.all(grad[1, LIVER] == 0)
    # the batch loss is the mean over the 3 owned pairs: (liver, tumour) of sample 0, spleen of sample 1
    alone = [build_loss("masked_dice")(pred[i : i + 1], target[i : i + 1], owned(d)) for i, d in
             enumerate(("liver", "spleen"))]
    batch = build_loss("masked_dice")(pred, target, owned("liver", "spleen"))
    assert torch.isclose(batch, (2 * alone[0] + alone[1]) / 3)


def test_one_mask_applies_to_every_sample_and_numpy_masks_work():
    pred, target = logits(batch=2).detach(), liver_target(batch=2)
    per_sample = build_loss("dice_ce")(pred, target, owned("liver", "liver"))
    shared = build_loss("dice_ce")(pred, target, owned_mask("liver"))
    assert torch.isclose(per_sample, shared)


def test_dice_ce_weights_combine_the_two_terms():
    pred, target, mask = logits().detach(), liver_target(), owned("liver")
    dice = build_loss("dice_ce", ce_weight=0.0)(pred, target, mask)
    ce = build_loss("dice_ce", dice_weight=0.0)(pred, target, mask)
    assert torch.isclose(dice, build_loss("masked_dice")(pred, target, mask))
    assert torch.isclose(build_loss("dice_ce", dice_weight=2.0, ce_weight=0.5)(pred, target, mask),
                         2 * dice + 0.5 * ce)


def test_unknown_loss_or_setting_names_the_choices():
    with pytest.raises(ValueError, match="literal_dice, literal_dice_ce, masked_dice, dice_ce"):
        build_loss("focal")
    with pytest.raises(ValueError, match="ce_weight"):
        build_loss("masked_dice", ce_weight=1.0)


def test_literal_dice_ce_really_teaches_absent_on_unlabelled_channels():
    """Unlike soft Dice, the cross-entropy of the literal compound loss pushes an unlabelled channel down."""
    from fedseg.train.losses import build_loss

    torch.manual_seed(0)
    pred = torch.zeros(2, 8, 8, 8, 8, requires_grad=True)
    target = torch.zeros(2, 8, 8, 8, 8, dtype=torch.uint8)
    target[:, 1, 2:6, 2:6, 2:6] = 1  # liver labelled; spleen (3) unlabelled
    owned = torch.tensor([[False, True, True, False, False, False, False, False]] * 2)
    for name, expect_grad in (("literal_dice_ce", True), ("dice_ce", False)):
        pred.grad = None
        build_loss(name)(pred, target, owned).backward()
        spleen = pred.grad[:, 3]
        assert (spleen.abs().min() > 1e-6) if expect_grad else torch.all(spleen == 0), name
        if expect_grad:
            assert torch.all(spleen > 0)  # gradient descent lowers the spleen logits: "absent"
