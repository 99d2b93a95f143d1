"""Label completion on small tensors: ConDistFL-style distillation and connected-component pseudo-labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.config import merge_profile
from fedseg.data.labels import CHANNEL_INDEX, NUM_CHANNELS, owned_mask
from fedseg.train.completion import distillation_loss, pseudo_label, pseudo_label_volume

SHAPE = (6, 6, 6)
LIVER, LIVER_TUMOR, SPLEEN, KIDNEY = (CHANNEL_INDEX[c] for c in ("liver", "liver_tumor", "spleen", "kidney"))


def logits(seed: int, batch: int = 1, requires_grad: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NUM_CHANNELS, *SHAPE, generator=generator).requires_grad_(requires_grad)


def liver_target(batch: int = 1) -> torch.Tensor:
    target = torch.zeros(batch, NUM_CHANNELS, *SHAPE)
    target[:, LIVER, :3] = 1
    target[:, 0] = 1 - target[:, LIVER]
    return target


LIVER_OWNED = torch.as_tensor(owned_mask("liver"))


# --- distillation_loss -------------------------------------------------------------------------------

def test_distillation_is_zero_where_student_equals_teacher_and_positive_otherwise():
    student = logits(0)
    assert abs(float(distillation_loss(student, student.clone(), LIVER_OWNED))) < 1e-6
    assert float(distillation_loss(student, logits(1), LIVER_OWNED)) > 1e-3


def test_distillation_is_the_binary_kl_divergence_averaged_over_unowned_foreground():
    student, teacher = logits(0), logits(1)
    s, t = torch.sigmoid(student), torch.sigmoid(teacher)
    kl = t * torch.log(t / s) + (1 - t) * torch.log((1 - t) / (1 - s))
    unowned = [c for c in range(1, NUM_CHANNELS) if not LIVER_OWNED[c]]
    expected = kl[:, unowned].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, LIVER_OWNED), expected, rtol=1e-4, atol=1e-6)
    # temperature softens both sides: a different, still non-negative value
    softened = distillation_loss(student, teacher, LIVER_OWNED, temperature=2.0)
    assert 0 < float(softened) < float(expected)


def test_owned_channels_and_background_never_contribute():
    student, teacher = logits(0), logits(1)
    base = distillation_loss(student, teacher, LIVER_OWNED)
    changed = student.clone()
    changed[:, [0, LIVER, LIVER_TUMOR]] += 5.0
    assert torch.equal(distillation_loss(changed, teacher, LIVER_OWNED), base)
    changed[:, SPLEEN] += 5.0  # an unowned channel does count
    assert not torch.equal(distillation_loss(changed, teacher, LIVER_OWNED), base)


def test_gradient_reaches_the_student_only_on_unowned_foreground_and_never_the_teacher():
    student, teacher = logits(0, requires_grad=True), logits(1, requires_grad=True)
    distillation_loss(student, teacher, LIVER_OWNED).backward()
    assert teacher.grad is None
    assert torch.all(student.grad[:, [0, LIVER, LIVER_TUMOR]] == 0)
    assert torch.all(student.grad[:, SPLEEN] != 0)


def test_per_sample_owned_masks():
    student, teacher = logits(0, batch=2, requires_grad=True), logits(1, batch=2)
    owned = torch.as_tensor(np.stack([owned_mask("liver"), owned_mask("spleen")]))
    distillation_loss(student, teacher, owned).backward()
    assert torch.all(student.grad[0, LIVER] == 0) and torch.all(student.grad[1, LIVER] != 0)
    assert torch.all(student.grad[1, SPLEEN] == 0) and torch.all(student.grad[0, SPLEEN] != 0)


def test_all_owned_gives_a_zero_loss_with_a_graph():
    student = logits(0, requires_grad=True)
    owned = torch.ones(NUM_CHANNELS, dtype=torch.bool)
    owned[0] = False
    loss = distillation_loss(student, logits(1), owned)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(student.grad == 0)


def test_conditioning_on_background_ignores_voxels_of_the_clients_own_foreground():
    student, teacher, target = logits(0, requires_grad=True), logits(1), liver_target()
    conditioned = distillation_loss(student, teacher, LIVER_OWNED, target=target, condition_on_background=True)
    plain = distillation_loss(student, teacher, LIVER_OWNED)
    assert not torch.equal(conditioned, plain)
    # changing either model inside the labelled liver changes nothing once conditioned
    changed = student.detach().clone()
    changed[:, SPLEEN, :3] += 5.0
    assert torch.equal(distillation_loss(changed, teacher, LIVER_OWNED, target=target, condition_on_background=True),
                       conditioned)
    assert not torch.equal(distillation_loss(changed, teacher, LIVER_OWNED), plain)
    conditioned.backward()
    assert torch.all(student.grad[:, SPLEEN, :3] == 0) and torch.all(student.grad[:, SPLEEN, 3:] != 0)
    # the mean is over the kept voxels only: equal to the plain loss on the background half
    half = distillation_loss(student[..., 3:, :, :], teacher[..., 3:, :, :], LIVER_OWNED)
    torch.testing.assert_close(conditioned, half)
    with pytest.raises(ValueError, match="target"):
        distillation_loss(student, teacher, LIVER_OWNED, condition_on_background=True)


# --- pseudo_label --------------------------------------------------------------------------------------

def spleen_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A spleen client's case (12³) and a teacher that sees liver (one big block and a small blob), a
    liver tumour inside the liver and one outside it, a kidney block, and a spleen shape unlike the label."""
    shape = (12, 12, 12)
    target = np.zeros((NUM_CHANNELS, *shape), dtype=np.uint8)
    target[SPLEEN, 8:12, 8:12, 8:12] = 1
    target[0] = 1 - target[SPLEEN]
    teacher = np.full((NUM_CHANNELS, *shape), 0.1, dtype=np.float32)
    teacher[LIVER, 0:5, 0:5, 0:5] = 0.9          # the liver
    teacher[LIVER, 10:12, 0:2, 0:2] = 0.9        # a small false positive, not touching it
    teacher[LIVER, 8:12, 8:12, 10:12] = 0.9      # liver predicted on the client's own spleen
    teacher[LIVER_TUMOR, 1:3, 1:3, 1:3] = 0.9    # inside the liver
    teacher[LIVER_TUMOR, 0:2, 8:10, 0:2] = 0.9   # outside any liver
    teacher[KIDNEY, 0:3, 8:12, 8:12] = 0.9
    teacher[SPLEEN] = 0.9                         # never used: spleen is owned
    return teacher, target, owned_mask("spleen")


def test_pseudo_label_fills_unowned_channels_and_keeps_owned_ones_bit_for_bit():
    teacher, target, owned = spleen_case()
    completed, completed_owned = pseudo_label(teacher, target, owned)
    assert isinstance(completed, np.ndarray) and completed.dtype == target.dtype
    assert np.array_equal(completed[SPLEEN], target[SPLEEN])
    assert completed[KIDNEY, 0:3, 8:12, 8:12].all() and completed[KIDNEY].sum() == 3 * 4 * 4
    assert completed[CHANNEL_INDEX["pancreas"]].sum() == 0  # the teacher sees no pancreas
    assert np.array_equal(completed[0], 1 - completed[1:].max(axis=0))
    expected_owned = np.ones(NUM_CHANNELS, dtype=bool)
    expected_owned[0] = False
    assert completed_owned.dtype == owned.dtype and np.array_equal(completed_owned, expected_owned)
    assert not owned[LIVER]  # inputs untouched


def test_pseudo_label_keeps_the_largest_component_and_drops_a_smaller_one():
    teacher, target, owned = spleen_case()
    completed, _ = pseudo_label(teacher, target, owned)
    assert completed[LIVER, 0:5, 0:5, 0:5].all()
    assert completed[LIVER, 10:12, 0:2, 0:2].sum() == 0
    kept_all, _ = pseudo_label(teacher, target, owned, largest_component=False)
    assert kept_all[LIVER, 10:12, 0:2, 0:2].all()


def test_num_components_keeps_two_kidneys():
    teacher, target, owned = spleen_case()
    teacher[KIDNEY, 9:12, 0:3, 4:7] = 0.9  # a second, smaller kidney
    one, _ = pseudo_label(teacher, target, owned)
    two, _ = pseudo_label(teacher, target, owned, num_components={"kidney": 2})
    assert one[KIDNEY, 9:12, 0:3, 4:7].sum() == 0 and two[KIDNEY, 9:12, 0:3, 4:7].all()


def test_pseudo_labels_are_cleared_under_the_clients_own_foreground():
    teacher, target, owned = spleen_case()
    completed, _ = pseudo_label(teacher, target, owned, largest_component=False)
    assert completed[LIVER, 8:12, 8:12, 10:12].sum() == 0
    assert completed[LIVER][target[SPLEEN].astype(bool)].sum() == 0


def test_tumour_pseudo_label_stays_inside_its_organ_including_an_owned_organ_label():
    teacher, target, owned = spleen_case()
    completed, _ = pseudo_label(teacher, target, owned, largest_component=False)
    assert completed[LIVER_TUMOR, 1:3, 1:3, 1:3].all()
    assert completed[LIVER_TUMOR, 0:2, 8:10, 0:2].sum() == 0
    # a client owning the liver but not its tumour: the tumour may lie inside the labelled liver
    liver_only = np.zeros(NUM_CHANNELS, dtype=bool)
    liver_only[LIVER] = True
    target = np.zeros_like(target)
    target[LIVER, 0:5, 0:5, 0:5] = 1
    completed, completed_owned = pseudo_label(teacher, target, liver_only)
    assert completed[LIVER_TUMOR, 1:3, 1:3, 1:3].all() and completed[LIVER_TUMOR].sum() == 8
    assert np.array_equal(completed[LIVER], target[LIVER]) and completed_owned[LIVER_TUMOR]


def test_pseudo_label_from_torch_logits_and_selected_channels():
    teacher, target, owned = spleen_case()
    logit = torch.logit(torch.from_numpy(teacher))
    completed, completed_owned = pseudo_label(logit, torch.from_numpy(target), torch.from_numpy(owned),
                                              from_logits=True, channels=["kidney"])
    assert isinstance(completed, torch.Tensor) and completed.dtype == torch.uint8
    assert completed[KIDNEY].sum() == 3 * 4 * 4 and completed[LIVER].sum() == 0
    assert completed_owned.tolist() == [c in (SPLEEN, KIDNEY) for c in range(NUM_CHANNELS)]
    with pytest.raises(ValueError, match="foreground"):
        pseudo_label(teacher, target, owned, channels=["background"])


def test_pseudo_label_volume_runs_sliding_window_inference():
    teacher, target, owned = spleen_case()
    logit = torch.logit(torch.from_numpy(teacher))
    image = torch.zeros(1, *teacher.shape[1:])

    def model(patch: torch.Tensor) -> torch.Tensor:  # the fixed teacher, whatever the patch
        assert patch.shape[-3:] == (12, 12, 12)
        return logit[None].expand(patch.shape[0], -1, -1, -1, -1)

    cfg = merge_profile({"train": {"sw_batch_size": 1, "sw_overlap": 0.25}, "preprocess": {"patch_size": [12, 12, 12]}})
    completed, _ = pseudo_label_volume(model, image, target, owned, cfg, torch.device("cpu"))
    expected, _ = pseudo_label(teacher, target, owned)
    assert np.array_equal(completed, expected)
