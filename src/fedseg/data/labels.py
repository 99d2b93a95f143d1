"""The unified 8-channel label scheme and each dataset's map into it (docs/study.md, "Unified label scheme").

This module is the one place that defines the scheme: channel names and order, which dataset annotates
which channel, how a dataset's integer label map becomes a multi-hot target, and the paper's colours.
"""

from __future__ import annotations

import numpy as np

from fedseg.data.catalogue import CATALOGUE

#: Output channels of every network in the study, in order (independent sigmoids, multi-label).
CHANNELS: tuple[str, ...] = (
    "background",
    "liver",
    "liver_tumor",
    "spleen",
    "pancreas",
    "pancreas_tumor",
    "kidney",
    "kidney_tumor",
)
NUM_CHANNELS = len(CHANNELS)
CHANNEL_INDEX = {name: i for i, name in enumerate(CHANNELS)}
#: Foreground channels (all but background): the ones losses and metrics are computed on.
FOREGROUND = CHANNELS[1:]

#: The four training datasets (one FL client each) and the external test set, as `catalogue` declares them.
TRAIN_DATASETS: tuple[str, ...] = tuple(d.name for d in CATALOGUE if d.role == "train")
TEST_DATASETS: tuple[str, ...] = tuple(d.name for d in CATALOGUE if d.role == "test")
DATASETS: tuple[str, ...] = TRAIN_DATASETS + TEST_DATASETS

#: Each dataset's label values and the channels each value switches on (`catalogue.Dataset.label_map`). An organ
#: channel covers the whole organ, tumour included; a tumour channel the tumour alone.
LABEL_MAPS: dict[str, dict[int, tuple[str, ...]]] = {d.name: d.label_map for d in CATALOGUE}

#: Shen et al. 2022, Fig. 1 colours (RGB 0..1): kidney pink, kidney tumor brown, liver red, liver tumor green,
#: pancreas yellow, pancreas tumor aquamarine, spleen blue.
COLOURS: dict[str, tuple[float, float, float]] = {
    "liver": (0.90, 0.10, 0.10),
    "liver_tumor": (0.10, 0.75, 0.10),
    "spleen": (0.15, 0.35, 0.95),
    "pancreas": (1.00, 0.90, 0.10),
    "pancreas_tumor": (0.50, 1.00, 0.83),
    "kidney": (1.00, 0.50, 0.75),
    "kidney_tumor": (0.55, 0.30, 0.10),
}


def _check_dataset(dataset: str) -> None:
    if dataset not in LABEL_MAPS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")


def owned_channels(dataset: str) -> tuple[str, ...]:
    """Names of the foreground channels `dataset` annotates, in channel order."""
    _check_dataset(dataset)
    names = {c for chans in LABEL_MAPS[dataset].values() for c in chans}
    return tuple(c for c in CHANNELS if c in names)


def owned_mask(dataset: str) -> np.ndarray:
    """Boolean (8,) mask of the channels `dataset` annotates; every other channel is unlabelled.

    Background is never owned: "not liver" in the liver dataset is not "background" (kidneys are there,
    unlabelled), so no dataset can supervise it.
    """
    owned = set(owned_channels(dataset))
    return np.array([c in owned for c in CHANNELS], dtype=bool)


def allowed_values(dataset: str) -> frozenset[int]:
    """Integer label values a label file of `dataset` may contain (0 is background)."""
    _check_dataset(dataset)
    return frozenset({0, *LABEL_MAPS[dataset]})


def to_multihot(label: np.ndarray, dataset: str) -> np.ndarray:
    """Map an integer label map (any shape) into the (8, *shape) uint8 multi-hot target.

    Channel 0 is set where the label is 0; channels the dataset does not own stay 0 and must be read
    together with `owned_mask` (0 there means "unlabelled", not "absent").
    """
    _check_dataset(dataset)
    label = np.asarray(label)
    unexpected = sorted(set(np.unique(label).astype(int).tolist()) - allowed_values(dataset))
    if unexpected:
        raise ValueError(
            f"Label values {unexpected} are outside the {dataset} label map "
            f"{sorted(allowed_values(dataset))}: check that the file belongs to {dataset}."
        )
    target = np.zeros((NUM_CHANNELS, *label.shape), dtype=np.uint8)
    target[0] = label == 0
    for value, channels in LABEL_MAPS[dataset].items():
        hit = label == value
        for name in channels:
            target[CHANNEL_INDEX[name]] |= hit
    return target


#: Bit c of a packed label voxel is channel c (`pack_channels`): the 8 channels fit one byte.
_BITS = np.left_shift(1, np.arange(NUM_CHANNELS)).astype(np.uint8)


def pack_channels(multihot: np.ndarray) -> np.ndarray:
    """A (8, X, Y, Z) multi-hot label as one (X, Y, Z) uint8 map, bit c = channel c: a byte per voxel where the
    multi-hot form takes eight (channels overlap: a tumour voxel is also its organ's, so one class map cannot
    hold them). `unpack_channels` gives the label back exactly."""
    multihot = np.asarray(multihot)
    if multihot.shape[0] != NUM_CHANNELS:
        raise ValueError(f"pack_channels takes ({NUM_CHANNELS}, X, Y, Z) multi-hot labels, not {multihot.shape}.")
    packed = np.zeros(multihot.shape[1:], dtype=np.uint8)
    for channel, bit in enumerate(_BITS):
        packed[multihot[channel] > 0] |= bit
    return packed


def unpack_channels(packed: np.ndarray) -> np.ndarray:
    """The (8, X, Y, Z) uint8 multi-hot label of a `pack_channels` map."""
    packed = np.asarray(packed, dtype=np.uint8)
    return ((packed[None] & _BITS.reshape(-1, *[1] * packed.ndim)) > 0).astype(np.uint8)
