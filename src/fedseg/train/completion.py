"""Label completion for a client's unlabelled channels from the global model (docs/study.md, Experiments, item 7).

Every client annotates only some of the 8 channels (`fedseg.data.labels.owned_mask`); the partial-label losses
(`fedseg.train.losses`) leave the others unsupervised. Two ways to supervise them with the federated model:

- `distillation_loss`: conditional distillation as in ConDistFL (Wang et al., "ConDistFL: Conditional
  Distillation for Federated Learning from Partially Annotated Data", MICCAI DeCaF 2023; reference code
  NVIDIA NVFlare research/condist-fl). During local training the received global model (the teacher,
  frozen) predicts the same patch, and the local model's (student's) unowned foreground channels are
  pulled towards the teacher's probabilities; optionally only on voxels the client's own labels call
  background. ConDistFL works on softmax outputs, renormalised to "given not a local organ", with a soft
  Dice; here the channels are independent sigmoids, so no renormalisation is needed and the per-voxel
  binary KL divergence is used instead (written out at `distillation_loss`).
- `pseudo_label`: offline pseudo-labels as in Wang & Ma 2022 ("Semi-supervised Context-aware
  Multi-Organ Segmentation", FLARE 2022, §2.3): a trained model predicts the missing structures, the
  prediction is cleaned by connected-component analysis (largest component per channel), merged into the
  labels, and training continues on the completed targets.

How they are called; the federated methods `distill` and `pseudo` do this (`fedseg.federated.methods`:
`distillation_term` as `training.train_model`'s `extra_loss`, `pseudo_labelled_volumes` as its `volumes`)::

    # distillation, inside a client's local round; `global_model` is a frozen copy of the received weights
    with torch.no_grad():
        teacher = global_model(image)
    student = model(image)
    loss = supervised(student, target, owned) + weight * distillation_loss(
        student, teacher, owned, target=target, condition_on_background=True)
    # ConDistFL ramps `weight` linearly over rounds (weight_schedule_range in its configs).

    # pseudo-labels, once after (a chosen round of) FedAvg: the global model labels each training case,
    completed, completed_owned = pseudo_label(global_logits, case_target, case_owned, from_logits=True)
    # (`pseudo_label_volume` does the sliding-window inference), then training continues with the
    # completed targets and completed_owned in place of the dataset's target and owned mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt

from fedseg.data.labels import CHANNEL_INDEX, CHANNELS, FOREGROUND, NUM_CHANNELS
from fedseg.train.inference import predict_logits
from fedseg.train.losses import owned_pairs

_TUMOUR_SUFFIX = "_tumor"


def _organ_of(name: str) -> str:
    """The organ a channel belongs to: "liver" for liver and liver_tumor."""
    return name.removesuffix(_TUMOUR_SUFFIX)


def _is_tumour(name: str) -> bool:
    return name.endswith(_TUMOUR_SUFFIX)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      owned: torch.Tensor | np.ndarray, temperature: float = 1.0, *,
                      target: torch.Tensor | None = None, condition_on_background: bool = False) -> torch.Tensor:
    """ConDistFL-style distillation of the global model into the client's unowned foreground channels.

    With s = sigmoid(student / T), t = sigmoid(teacher / T) per voxel and channel, the loss is the binary
    KL divergence KL(t || s) = t log(t/s) + (1-t) log((1-t)/(1-s)) = BCE(s, t) - H(t), i.e. BCE with soft
    targets minus the teacher's entropy, so it is >= 0 and exactly 0 where student == teacher. It is
    computed from logits (two `binary_cross_entropy_with_logits`), not rescaled by T².

    It is averaged over the kept (sample, channel, voxel) elements: channels 1..7 the sample does not own
    (background and owned channels never count). With `condition_on_background`, voxels where the
    client's own labels (`target` on owned foreground channels) mark any foreground are dropped too: the
    client knows what they are (a voxel labelled liver is not spleen), as ConDistFL's mask excludes the
    local foreground. `owned` is (B, 8) or (8,); `target` multi-hot (B, 8, ...) like the logits.

    The teacher is detached; excluded elements get exactly zero gradient. Returns a zero scalar that
    still carries a graph when nothing is kept (e.g. the client owns every foreground channel).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    mask = owned_pairs(owned, student_logits).clone()
    mask[:, 0] = False  # background is never a "label" of the client's own
    unowned = ~mask
    unowned[:, 0] = False  # nor distilled
    spatial = (1,) * (student_logits.ndim - 2)
    keep = unowned.reshape(*unowned.shape, *spatial).expand(student_logits.shape)
    if condition_on_background:
        if target is None:
            raise ValueError("condition_on_background needs the client's multi-hot target: pass target=.")
        if target.shape != student_logits.shape:
            raise ValueError(f"target {tuple(target.shape)} must have the logits' shape "
                             f"{tuple(student_logits.shape)}.")
        own_labels = target.to(student_logits.device).bool() & mask.reshape(*mask.shape, *spatial)
        keep = keep & ~own_labels.any(dim=1, keepdim=True)
    teacher = teacher_logits.detach().to(student_logits.dtype) / temperature
    student = student_logits / temperature
    soft = torch.sigmoid(teacher)
    kl = (F.binary_cross_entropy_with_logits(student, soft, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher, soft, reduction="none"))
    kept = torch.where(keep, kl, torch.zeros_like(kl))
    return kept.sum() / keep.sum().clamp_min(1)


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _like(array: np.ndarray, reference: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """`array` with the type, dtype (and device) of `reference`."""
    if isinstance(reference, torch.Tensor):
        return torch.as_tensor(array).to(device=reference.device, dtype=reference.dtype)
    return array.astype(np.asarray(reference).dtype)


def _component_counts(largest_component: bool,
                      num_components: Mapping[str, int | None] | None) -> dict[str, int | None]:
    counts: dict[str, int | None] = {name: 1 if largest_component else None for name in FOREGROUND}
    for name, count in (num_components or {}).items():
        if name not in counts:
            raise ValueError(f"num_components names {name!r}: use foreground channels {', '.join(FOREGROUND)}.")
        counts[name] = count
    return counts


def pseudo_label(teacher: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                 owned: torch.Tensor | np.ndarray, threshold: float = 0.5, largest_component: bool = True, *,
                 from_logits: bool = False, channels: Sequence[str] | None = None,
                 num_components: Mapping[str, int | None] | None = None,
                 ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
    """Complete one case's target with the teacher's prediction on the channels the client does not own.

    `teacher` is (8, X, Y, Z) probabilities (logits with `from_logits`), `target` the (8, X, Y, Z)
    multi-hot target, `owned` its (8,) mask. Each unowned foreground channel (or only those named in
    `channels`) becomes, organs before tumours:

    1. `probability > threshold`;
    2. cleared where the client's own labels mark a different organ (an owned channel of another organ;
       a tumour channel may lie inside its own organ's label);
    3. for a tumour channel, kept only inside its organ (the owned label, or the organ's pseudo-label);
    4. reduced to its largest 26-connected component (MONAI `KeepLargestConnectedComponent`) when
       `largest_component`; `num_components` overrides the count per channel name as in
       `inference.postprocess` (e.g. {"kidney": 2} keeps both kidneys, None keeps all components).
       Note that one component per tumour channel keeps only the largest lesion.

    Owned channels are returned bit-for-bit; background is recomputed as "no foreground channel set".
    Returns (completed target, completed owned mask with the filled channels switched on), each of the
    type and dtype of the `target` and `owned` passed in.
    """
    probability = _numpy(teacher).astype(np.float32)
    if from_logits:
        probability = torch.sigmoid(torch.from_numpy(probability)).numpy()
    labels = _numpy(target).astype(bool)
    own = _numpy(owned).astype(bool).reshape(-1)
    if labels.ndim != 4 or labels.shape[0] != NUM_CHANNELS or probability.shape != labels.shape:
        raise ValueError(f"Expected teacher and target of the same shape ({NUM_CHANNELS}, X, Y, Z), got "
                         f"{probability.shape} and {labels.shape}.")
    if own.shape != (NUM_CHANNELS,):
        raise ValueError(f"owned must be the ({NUM_CHANNELS},) mask of fedseg.data.labels.owned_mask, got {own.shape}.")
    unknown = [name for name in channels or () if name not in FOREGROUND]
    if unknown:
        raise ValueError(f"channels {unknown} are not foreground channels: use {', '.join(FOREGROUND)}.")
    counts = _component_counts(largest_component, num_components)
    fill = [name for name in FOREGROUND
            if not own[CHANNEL_INDEX[name]] and (channels is None or name in channels)]
    fill.sort(key=_is_tumour)  # stable: organs first, so a tumour can be bounded by its organ's pseudo-label

    completed = labels.copy()
    known = own.copy()
    known[0] = False
    for name in fill:
        index = CHANNEL_INDEX[name]
        mask = probability[index] > threshold
        other_organs = [i for i, c in enumerate(CHANNELS) if own[i] and i != 0 and _organ_of(c) != _organ_of(name)]
        if other_organs:
            mask &= ~labels[other_organs].any(axis=0)
        if _is_tumour(name):
            organ = CHANNEL_INDEX[_organ_of(name)]
            if known[organ]:
                mask &= completed[organ]
        count = counts[name]
        if count is not None and mask.any():
            keep = mt.KeepLargestConnectedComponent(applied_labels=0, is_onehot=True, independent=True,
                                                    num_components=count)
            mask = np.asarray(keep(mask[None]), dtype=bool)[0]
        completed[index] = mask
        known[index] = True
    completed[0] = ~completed[1:].any(axis=0)
    completed_owned = own.copy()
    completed_owned[[CHANNEL_INDEX[name] for name in fill]] = True
    # Owned channels bit-for-bit: copy them from the caller's array rather than through the bool round trip.
    result = _like(completed, target)
    source = torch.as_tensor(target) if isinstance(result, torch.Tensor) else np.asarray(target)
    for i in np.flatnonzero(own[1:]) + 1:
        result[i] = source[i]
    return result, _like(completed_owned, owned)


def pseudo_label_volume(model: Any, image: torch.Tensor, target: torch.Tensor | np.ndarray,
                        owned: torch.Tensor | np.ndarray, cfg: dict[str, Any], device: torch.device,
                        **kwargs: Any) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
    """`pseudo_label` of one preprocessed (1, X, Y, Z) case from the sliding-window logits of `model`.

    `model` is the global model (on `device`) or a callable, as for `inference.predict_logits`; `target`
    is the case's (8, X, Y, Z) multi-hot target on the same grid. `kwargs` go to `pseudo_label`.
    """
    logits = predict_logits(model, image, cfg, device)
    return pseudo_label(logits, target, owned, from_logits=True, **kwargs)
