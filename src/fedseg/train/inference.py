"""Inference on whole CT volumes for the external evaluation (docs/study.md, item 8; Shen et al. 2022 §3.4).

The pieces compose; a BTCV case with the four FL local models (client name -> model) reads::

    image = inference_transform(cfg)({"image": path})["image"]          # preprocessed, meta tracked
    logits = ensemble_logits(predict_logits(local_models, image, cfg, device))
    mask = to_original_grid(logits, image, cfg, logits=True)             # (8, *original shape) bool
    label_map = fuse(postprocess(mask))                                  # Shen et al. 2022's post-processing
    scores_input = organ_masks(label_map), btcv_truth(nib.load(label_path).get_fdata())
    write_prediction(label_map, path, out_path)

The global model is `predict_logits({"global": model}, ...)["global"]`, no ensemble. `coarse_to_fine_logits`
(Wang & Ma 2022) replaces `predict_logits` where the fine pass should only run around the organs.

Everything is on channel-first tensors without a batch dimension: images (1, X, Y, Z), logits and masks
(8, X, Y, Z) in the order of `fedseg.data.labels.CHANNELS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import TraceKeys

from fedseg.data.labels import (
    CHANNEL_INDEX,
    FOREGROUND,
    NUM_CHANNELS,
    TRAIN_DATASETS,
    owned_mask,
    to_multihot,
)
from fedseg.data.transforms import IMAGE
from fedseg.train.models import ABSENT_LOGIT, meta_channel_sources, meta_logits
from fedseg.train.training import TrainSettings, autocast

Predictor = Union[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]
Models = Union[Predictor, Mapping[str, Predictor]]

#: Shen et al. 2022's fusion order: a later channel overrides an earlier one where masks overlap.
FUSION_ORDER: tuple[str, ...] = ("liver", "liver_tumor", "spleen", "pancreas", "pancreas_tumor", "kidney",
                                 "kidney_tumor")
#: The four organs BTCV is scored on (Shen et al. 2022, Table 3 order) and the channels each is the union of.
BTCV_ORGANS: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "liver_tumor"),
    "pancreas": ("pancreas", "pancreas_tumor"),
    "kidney": ("kidney", "kidney_tumor"),
    "spleen": ("spleen",),
}
#: `postprocess`'s default: connected components kept per foreground channel where not 1. The kidney channel
#: keeps its 2 largest (two kidneys); Shen et al. 2022's Table 3 shows its post-processing did not lower kidney Dice
#: (80.5 -> 80.2), so it cannot have dropped a kidney.
POSTPROCESS_COMPONENTS: dict[str, int | None] = {"kidney": 2}
#: What `inference_transform` records in a MetaTensor's applied_operations, in order (MONAI 1.6: Orientationd
#: records its inner `Orientation`, Spacingd its inner `SpatialResample`, not `Spacing`).
_TRACED = ("Orientation", "SpatialResample")


def inference_transform(cfg: dict[str, Any]) -> mt.Compose:
    """The image-only deterministic preprocessing of `transforms.preprocess`, with meta tracking kept on.

    Call it on `{"image": path}`; `["image"]` is a (1, X, Y, Z) float32 MetaTensor whose applied operations
    let `to_original_grid` return predictions to the file's grid. Same grid and values as training sees.
    """
    pre = cfg["preprocess"]
    low, high = pre["hu_window"]
    return mt.Compose([
        mt.LoadImaged(keys=IMAGE, image_only=True),
        mt.EnsureChannelFirstd(keys=IMAGE),
        mt.Orientationd(keys=IMAGE, axcodes="RAS", labels=None),
        mt.Spacingd(keys=IMAGE, pixdim=pre["spacing"], mode="bilinear"),
        mt.ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        mt.EnsureTyped(keys=IMAGE, dtype=torch.float32, track_meta=True),
    ])


def _plain(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A plain tensor (a MetaTensor would carry its meta through sliding windows and stacking)."""
    if isinstance(image, MetaTensor):
        return image.as_tensor()
    return torch.as_tensor(image)


def _as_mapping(models: Models) -> tuple[dict[str, Predictor], bool]:
    if isinstance(models, Mapping):
        if not models:
            raise ValueError("No models given: pass one model or a mapping name -> model.")
        return dict(models), True
    return {"model": models}, False


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"Expected a channel-first (1, X, Y, Z) image, got shape {tuple(image.shape)}: "
                         "use inference_transform(cfg)({'image': path})['image'].")


def _sliding_window(model: Predictor, image: torch.Tensor, cfg: dict[str, Any], device: torch.device) -> torch.Tensor:
    """(C, X, Y, Z) float32 logits on the CPU of one model on one (1, X, Y, Z) image, as `training.validate`."""
    train = TrainSettings.recorded(cfg["train"])  # a run's record (predict) may predate newer settings
    if isinstance(model, torch.nn.Module):
        model.eval()
    batch = _plain(image)[None].to(device=device, dtype=torch.float32)
    with torch.no_grad(), autocast(device, train):
        logits = sliding_window_inference(batch, cfg["preprocess"]["patch_size"], train.sw_batch_size, model,
                                          overlap=train.sw_overlap)
    return logits[0].float().cpu()


def predict_logits(models: Models, image: torch.Tensor, cfg: dict[str, Any],
                   device: torch.device) -> dict[str, torch.Tensor] | torch.Tensor:
    """Sliding-window logits (8, X, Y, Z), on the CPU, of each model on a preprocessed (1, X, Y, Z) image.

    A mapping name -> model gives a dict name -> logits, one model its logits. Models must already be on
    `device` (as `evaluation.load_best` leaves them); modules are put in eval mode, callables (e.g.
    `training.predictor(model, task)` for one SegViz task block) are called as they are.
    """
    named, is_mapping = _as_mapping(models)
    _check_image(image)
    logits = {name: _sliding_window(model, image, cfg, device) for name, model in named.items()}
    return logits if is_mapping else logits["model"]


def ensemble_logits(logits_by_client: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Shen et al. 2022's ensemble of local models: each channel from the model of the client that owns it.

    Keys are client dataset names (liver, pancreas, kits19, spleen). The composition is the SegViz
    meta-model's (`models.meta_logits`) with whole models in place of task blocks: a channel no given
    client owns is `models.ABSENT_LOGIT`, background is -max(foreground logits).
    """
    _check_clients(list(logits_by_client))
    shapes = {tuple(t.shape) for t in logits_by_client.values()}
    if len(shapes) != 1 or next(iter(shapes))[0] != NUM_CHANNELS:
        raise ValueError(f"Ensemble logits must all have shape ({NUM_CHANNELS}, X, Y, Z); got {sorted(shapes)}.")
    sources = meta_channel_sources(list(logits_by_client))
    return meta_logits({name: t[None] for name, t in logits_by_client.items()}, sources)[0]


def _check_clients(names: Sequence[str]) -> None:
    """An ensemble's keys must be client dataset names: each says which channels its model gives."""
    unknown = [name for name in names if name not in TRAIN_DATASETS]
    if not names or unknown:
        raise ValueError(f"Ensemble keys {list(names)} must be client dataset names from "
                         f"{', '.join(TRAIN_DATASETS)}: each says which channels its model gives.")


def predict_ensemble(models: Mapping[str, Predictor], image: torch.Tensor, cfg: dict[str, Any],
                     device: torch.device) -> torch.Tensor:
    """`ensemble_logits(predict_logits(models, ...))`, the same tensor, holding one model's logits at a time.

    Each model's sliding-window logits are computed in turn and only the channels it gives in the ensemble are
    kept, so a case costs two (8, X, Y, Z) float32 tensors of host memory instead of one per model (at 1 mm an
    abdomen of 300^3 voxels is 0.86 GB per model).
    """
    _check_clients(list(models))
    sources = meta_channel_sources(list(models))
    combined = None
    for name, model in models.items():
        logits = _sliding_window(model, image, cfg, device)
        if combined is None:
            combined = torch.full_like(logits, ABSENT_LOGIT)
        for channel, source in enumerate(sources):
            if source == name:
                combined[channel] = logits[channel]
        del logits
    combined[0] = -combined[1:].amax(dim=0)
    return combined


def to_original_grid(prediction: torch.Tensor, image: MetaTensor, cfg: dict[str, Any], *, logits: bool = False,
                     threshold: float | None = 0.5) -> MetaTensor:
    """A prediction on the preprocessed grid of `image`, back on the grid of the file `image` was read from.

    `prediction` is (C, X, Y, Z) probabilities (or logits with `logits=True`, then sigmoid first). MONAI's
    `Invertd` undoes `inference_transform`: Spacing resampled back with bilinear interpolation (the mode the
    image was resampled with) to the original shape, then the original orientation. Returns the mask
    `probability > threshold` (bool), or the probabilities with `threshold=None`, as a MetaTensor whose
    `.affine` is the original image's.
    """
    if not isinstance(image, MetaTensor) or not image.applied_operations:
        raise ValueError("to_original_grid needs the preprocessed image as a MetaTensor with its applied "
                         "operations, from inference_transform(cfg) (the training cache drops them).")
    names = tuple(op[TraceKeys.CLASS_NAME] for op in image.applied_operations)
    if names != _TRACED:
        raise ValueError(f"The image's applied operations {names} are not those of inference_transform "
                         f"{_TRACED}: invert with the pipeline that made it.")
    if tuple(prediction.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"Prediction spatial shape {tuple(prediction.shape[1:])} differs from the preprocessed "
                         f"image's {tuple(image.shape[1:])}.")
    # Written by hand: MONAI checks that each recorded operation was made by the very transform object that
    # inverts it (by id()), so a pipeline rebuilt from cfg refuses to invert. TraceKeys.NONE is MONAI's way to
    # skip that check; the class names were compared above instead.
    reference = MetaTensor(_plain(image)[:, :1, :1, :1], meta=dict(image.meta),
                           applied_operations=[{**op, TraceKeys.ID: TraceKeys.NONE} for op in image.applied_operations])
    values = _plain(prediction).float()
    # A plain tensor would be skipped by Invertd with only a warning: it must be a MetaTensor.
    probabilities = MetaTensor(torch.sigmoid(values) if logits else values)
    invert = mt.Invertd(keys="prediction", transform=inference_transform(cfg), orig_keys=IMAGE, nearest_interp=False)
    restored = invert({"prediction": probabilities, IMAGE: reference})["prediction"]
    return restored if threshold is None else restored > threshold


def _bool_array(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return array.astype(bool)  # a copy: callers' arrays are never modified


def _check_multihot(mask: np.ndarray) -> None:
    if mask.ndim != 4 or mask.shape[0] != NUM_CHANNELS:
        raise ValueError(f"Expected an ({NUM_CHANNELS}, X, Y, Z) mask, got shape {mask.shape}.")


def postprocess(mask: torch.Tensor | np.ndarray, num_components: Mapping[str, int | None] | None = None) -> np.ndarray:
    """Shen et al. 2022's post-processing: the largest connected component of each foreground channel, independently,
    with both kidneys kept.

    By default (`POSTPROCESS_COMPONENTS`) the kidney channel keeps its 2 largest components and every other
    foreground channel its largest one. The kidney channel holds two organs, and Shen et al. 2022's Table 3 shows that
    its processing did not lower kidney Dice (ensemble 80.5, processed 80.2), so its post-processing cannot
    have dropped a kidney; one component would cap kidney Dice near 0.67. `num_components` overrides the
    count per channel name on top of that default (e.g. {"kidney": 1} keeps only the larger kidney, the old
    behaviour; None leaves a channel as it is). Uses MONAI's KeepLargestConnectedComponent (full
    26-connectivity). Background is recomputed as "no foreground channel". Returns an (8, X, Y, Z) bool array.
    """
    array = _bool_array(mask)
    _check_multihot(array)
    counts: dict[str, int | None] = {name: 1 for name in FOREGROUND} | POSTPROCESS_COMPONENTS
    for name, count in (num_components or {}).items():
        if name not in counts:
            raise ValueError(f"num_components names {name!r}: use foreground channels {', '.join(FOREGROUND)}.")
        counts[name] = count
    for name, count in counts.items():
        if count is not None:
            keep = mt.KeepLargestConnectedComponent(applied_labels=CHANNEL_INDEX[name], is_onehot=True,
                                                    independent=True, num_components=count)
            array = np.asarray(keep(array), dtype=bool)
    array[0] = ~array[1:].any(axis=0)
    return array


def fuse(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """One uint8 label map from an (8, X, Y, Z) mask: channel index 1..7 painted in `FUSION_ORDER`.

    A later channel overrides an earlier one (Shen et al. 2022): liver and spleen at once is spleen, a liver
    tumour voxel is liver_tumor. 0 where no foreground channel is on.
    """
    array = _bool_array(mask)
    _check_multihot(array)
    label = np.zeros(array.shape[1:], dtype=np.uint8)
    for name in FUSION_ORDER:
        label[array[CHANNEL_INDEX[name]]] = CHANNEL_INDEX[name]
    return label


def organ_masks(prediction: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The four BTCV organs (bool arrays) from a fused label map (X, Y, Z) or an (8, X, Y, Z) mask.

    Each organ includes its tumour (liver = liver ∪ liver_tumor, ...), since BTCV labels whole organs.
    """
    array = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
    if array.ndim == 3:
        return {organ: np.isin(array, [CHANNEL_INDEX[c] for c in channels]) for organ, channels in BTCV_ORGANS.items()}
    array = array.astype(bool)
    _check_multihot(array)
    return {organ: array[[CHANNEL_INDEX[c] for c in channels]].any(axis=0) for organ, channels in BTCV_ORGANS.items()}


def btcv_truth(label: np.ndarray) -> dict[str, np.ndarray]:
    """The four organs (bool arrays) of a BTCV label map: 1 spleen, 2 ∪ 3 kidney, 6 liver, 11 pancreas.

    The other BTCV structures map to no channel and are ignored (`labels.LABEL_MAPS["btcv"]`).
    """
    return organ_masks(to_multihot(np.rint(np.asarray(label)).astype(np.int16), "btcv"))


def write_prediction(label_map: torch.Tensor | np.ndarray, reference_nifti_path: str | Path,
                     out_path: str | Path) -> Path:
    """Write a label map (on the reference's grid) as a uint8 NIfTI with the reference CT's affine and header.

    The CT's intensity scaling is not carried over and the display range is the labels', so the file opens
    beside the CT in any viewer with the values as given. Written to a temporary file, then renamed.
    """
    reference = nib.load(str(reference_nifti_path))
    array = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if array.shape != reference.shape:
        raise ValueError(f"Label map shape {array.shape} differs from {reference_nifti_path}'s {reference.shape}: "
                         "bring it to the original grid with to_original_grid first.")
    if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.rint(array))):
        raise ValueError("Label map values must be integers in 0..255 to be written as uint8.")
    data = array.astype(np.uint8)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)  # a new image drops the CT's scl_slope/scl_inter (nibabel resets them)
    header["cal_min"], header["cal_max"] = 0, int(data.max()) if data.size else 0
    image = type(reference)(data, reference.affine, header)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{os.getpid()}-{out_path.name}")  # keeps the .nii(.gz) nibabel needs
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


class CoarseToFine(NamedTuple):
    """What `coarse_to_fine_logits` returns."""

    #: Logits of the full preprocessed grid: dict name -> (8, X, Y, Z), or one tensor for one model.
    logits: dict[str, torch.Tensor] | torch.Tensor
    #: (start, stop) per spatial axis on the preprocessed grid, stop exclusive: where the fine pass ran for the
    #: organs the coarse pass found (the whole grid when it found none).
    box: tuple[tuple[int, int], ...]
    #: Fraction of the preprocessed grid's voxels inside `box` (1.0 when the coarse pass found nothing). An organ
    #: in `fallback` was segmented over the whole grid besides: read `covered` together with it.
    covered: float
    #: Whether the coarse pass found any foreground (False: it fell back to the full pass for every organ).
    found: bool
    #: Per organ of `ORGANS` that a fine model gives: whether the coarse pass found it (False: the fine pass
    #: segmented it over the full window, not the box).
    organs: dict[str, bool]

    @property
    def fallback(self) -> tuple[str, ...]:
        """The organs the coarse pass did not find, which the fine pass segmented over the full window."""
        return tuple(organ for organ, found in self.organs.items() if not found)

    def window(self, organ: str) -> str:
        """Where the fine pass segmented `organ`: "box", or "full" (the whole grid) after a miss."""
        return "box" if self.organs[organ] else "full"


#: The organs coarse-to-fine looks for, each the union of its channels (an organ's tumour lies in it): a
#: coarse pass that finds none of an organ's channels makes the fine pass segment that organ over the full window.
ORGANS: dict[str, tuple[str, ...]] = BTCV_ORGANS


def _given_channels(name: str) -> list[int]:
    """The foreground channels a model gives: a client's model its own channels only, since the others were never
    (or only negatively) supervised; any other model (a localiser, a global model) all of them."""
    if name in TRAIN_DATASETS:
        return [int(c) for c in owned_mask(name).nonzero()[0]]
    return list(range(1, NUM_CHANNELS))


def _foreground(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Voxels where a model predicts foreground (sigmoid > 0.5) in a channel it gives (`_given_channels`)."""
    return (logits[torch.as_tensor(_given_channels(name))] > 0).any(dim=0)


def _organs_found(coarse: Mapping[str, torch.Tensor], fine_names: Sequence[str]) -> dict[str, bool]:
    """Per organ of `ORGANS` that some fine model gives: whether any coarse model predicts foreground in one of
    the organ's channels that it gives."""
    given = {name: set(_given_channels(name)) for name in [*fine_names, *coarse]}
    found = {}
    for organ, names in ORGANS.items():
        channels = {CHANNEL_INDEX[c] for c in names}
        if any(channels & given[name] for name in fine_names):
            found[organ] = any(bool((logits[sorted(channels & given[name])] > 0).any())
                               for name, logits in coarse.items() if channels & given[name])
    return found


def _widen(lo: int, hi: int, size: int, n: int) -> tuple[int, int]:
    """[lo, hi) widened (about its centre, within [0, n)) to at least `size` voxels where the image allows,
    so the fine sliding window sees real image rather than padding."""
    width = max(hi - lo, min(size, n))
    lo = min(max(0, lo - (width - (hi - lo)) // 2), n - width)
    return lo, lo + width


def coarse_to_fine_logits(models: Models, image: torch.Tensor, cfg: dict[str, Any], device: torch.device,
                          coarse_factor: float = 2.0, margin_mm: float = 20.0, *,
                          coarse_models: Models | None = None) -> CoarseToFine:
    """Wang & Ma 2022's two stages: a coarse pass localises the organs, the fine pass runs only around them.

    The preprocessed image is downsampled by `coarse_factor` (MONAI Resize, area averaging) and segmented
    with `coarse_models` (default: the fine models themselves, used one scale coarser than they were trained
    at); the bounding box of its foreground, mapped to the full grid and grown by `margin_mm` on each side
    (the margin in voxels per axis from the profile's spacing, and to at least one patch), is where the fine
    sliding-window pass runs. Outside the box the logits say background: `models.ABSENT_LOGIT` in foreground
    channels and its negative in channel 0. Logits have the full pass's shape and structure (as `predict_logits`).

    An organ of `ORGANS` the coarse pass did not find (CT unlike the training data: a spleen far from the box
    around liver and kidneys) is not left to the box: the fine models that give its channels also run over the
    full window, and its channels are theirs everywhere (channel 0 outside the box then says background where
    none of those channels is on). `organs` records, per organ, whether the coarse pass found it; with no coarse
    foreground at all the full pass is run. When every organ is found the result is the box pass alone.
    """
    named, is_mapping = _as_mapping(models)
    _check_image(image)
    if coarse_factor < 1:
        raise ValueError(f"coarse_factor={coarse_factor}: it must be at least 1 (a downsampling).")
    full = _plain(image).float()
    shape = tuple(full.shape[1:])
    coarse_shape = tuple(max(1, round(n / coarse_factor)) for n in shape)
    coarse_image = _plain(mt.Resize(spatial_size=coarse_shape, mode="area")(full))
    coarse_named = named if coarse_models is None else _as_mapping(coarse_models)[0]
    coarse = predict_logits(coarse_named, coarse_image, cfg, device)
    foreground = torch.stack([_foreground(name, logits) for name, logits in coarse.items()]).any(dim=0)
    organs = _organs_found(coarse, list(named))
    if not foreground.any():
        logits = predict_logits(named, full, cfg, device)
        box = tuple((0, n) for n in shape)
        return CoarseToFine(logits if is_mapping else logits["model"], box, 1.0, False, organs)
    start, end = generate_spatial_bounding_box(foreground[None])  # coarse voxels, end exclusive
    spacing, patch = cfg["preprocess"]["spacing"], cfg["preprocess"]["patch_size"]
    box = []
    for axis, n in enumerate(shape):
        scale = n / coarse_shape[axis]  # coarse voxel i covers full voxels [i * scale, (i + 1) * scale)
        margin = math.ceil(margin_mm / spacing[axis])
        lo = max(0, math.floor(start[axis] * scale) - margin)
        hi = min(n, math.ceil(end[axis] * scale) + margin)
        box.append(_widen(lo, hi, patch[axis], n))
    region = tuple(slice(lo, hi) for lo, hi in box)
    fine = predict_logits(named, full[(slice(None), *region)], cfg, device)
    logits = {}
    for name, values in fine.items():
        canvas = torch.full((values.shape[0], *shape), ABSENT_LOGIT, dtype=values.dtype)
        canvas[0] = -ABSENT_LOGIT
        canvas[(slice(None), *region)] = values
        logits[name] = canvas
    missed = {CHANNEL_INDEX[c] for organ, found in organs.items() if not found for c in ORGANS[organ]}
    if missed:
        outside = torch.ones(shape, dtype=torch.bool)
        outside[region] = False
        for name, model in named.items():
            channels = sorted(missed & set(_given_channels(name)))
            if not channels:
                continue
            whole = _sliding_window(model, full, cfg, device)
            canvas = logits[name]
            canvas[channels] = whole[channels]
            background = torch.minimum(canvas[0], -whole[channels].amax(dim=0))
            canvas[0] = torch.where(outside, background, canvas[0])
            del whole
    covered = math.prod(hi - lo for lo, hi in box) / math.prod(shape)
    return CoarseToFine(logits if is_mapping else logits["model"], tuple(box), covered, True, organs)
