"""A preprocessed case a training step reads patches from, not whole volumes (`preprocess.cache: patches`).

The volume cache (`transforms.evaluation_dataset`, MONAI's PersistentDataset) stores each case as one pickled
dict of a float32 image, an 8-channel uint8 label and a foreground channel: 13 bytes per voxel, read whole by
every training step that cuts a patch from it. At 1 mm a real abdomen is 20-60 M voxels, so a step of 8 patches
reads several GB. Here a case is a folder of plain arrays that are memory-mapped:

- `image.npy`: the preprocessed image (1, X, Y, Z), float16 (the paper profile) or float32;
- `label.npy`: the multi-hot label packed to one byte per voxel (`labels.pack_channels`);
- `foreground.npy`: the flat indices of the voxels of any foreground channel (the foreground-biased sampler's
  centres), so no step searches the volume for them;
- `case.json`: shape and dtype, written last (a folder without it is incomplete and rebuilt).

A patch is a slice of the maps: only its bytes are read from disk, and a loading worker holds a patch, not a
volume. 2-3 bytes per voxel instead of 13. Written by hand: MONAI's caches (PersistentDataset, LMDBDataset,
CacheDataset) all store and return whole items, and its crops take an array in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedseg.data.labels import NUM_CHANNELS, pack_channels, unpack_channels

#: The image dtypes a store may hold; float16 keeps about 3 significant digits of the [0, 1] scaled intensities
#: (0.5 HU in a 1000 HU window), far below CT noise.
IMAGE_DTYPES = ("float16", "float32")
CASE_FILE = "case.json"
#: The bits of a packed label voxel (`labels.pack_channels`) that are foreground channels: all but background.
FOREGROUND_BITS = 0xFE


def write_case(folder: str | Path, image: np.ndarray, label: np.ndarray, dtype: str = "float32") -> int:
    """Store one preprocessed case ((1, X, Y, Z) image, (8, X, Y, Z) multi-hot label) in `folder`; returns its
    bytes on disk. Written into a temporary folder and renamed, so an interrupted write leaves nothing."""
    if dtype not in IMAGE_DTYPES:
        raise ValueError(f"preprocess.cache_dtype={dtype!r}: use one of {', '.join(IMAGE_DTYPES)}.")
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 4 or image.shape[0] != 1 or label.shape != (NUM_CHANNELS, *image.shape[1:]):
        raise ValueError(f"write_case takes a (1, X, Y, Z) image and a ({NUM_CHANNELS}, X, Y, Z) label, "
                         f"not {image.shape} and {label.shape}.")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    packed = pack_channels(label)
    np.save(tmp / "image.npy", image.astype(dtype))
    np.save(tmp / "label.npy", packed)
    np.save(tmp / "foreground.npy", np.flatnonzero(packed & FOREGROUND_BITS).astype(np.int64))
    (tmp / CASE_FILE).write_text(json.dumps({"shape": list(image.shape[1:]), "dtype": dtype}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process stored it first: same inputs, same bytes
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()
    return case_bytes(folder)


def is_stored(folder: str | Path) -> bool:
    return (Path(folder) / CASE_FILE).exists()


def case_bytes(folder: str | Path) -> int:
    """The bytes a stored case takes on disk."""
    return sum(path.stat().st_size for path in Path(folder).iterdir())


class StoredCase:
    """One stored case, its arrays memory-mapped on first use (each process maps its own)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not is_stored(self.folder):
            raise FileNotFoundError(f"{self.folder} holds no stored case ({CASE_FILE} missing): build the cache "
                                    "again (01_data_prep, or transforms.build_cache).")
        self.shape = tuple(json.loads((self.folder / CASE_FILE).read_text())["shape"])
        self._maps: dict[str, np.ndarray] = {}

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._maps[name]

    def __getstate__(self) -> dict[str, Any]:  # a loading worker maps the files itself
        return {"folder": self.folder, "shape": self.shape, "_maps": {}}

    @property
    def foreground(self) -> np.ndarray:
        return self._map("foreground")

    def crop(self, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The (1, *size) float32 image and (8, *size) uint8 label of the patch at `start`, zero beyond the
        volume (as MONAI's SpatialPad pads a volume smaller than the patch)."""
        window = tuple(slice(s, min(s + n, d)) for s, n, d in zip(start, size, self.shape))
        image = np.zeros((1, *size), dtype=np.float32)
        packed = np.zeros(tuple(size), dtype=np.uint8)
        inside = tuple(slice(0, w.stop - w.start) for w in window)
        image[(0, *inside)] = self._map("image")[(0, *window)]
        packed[inside] = self._map("label")[window]
        return image, unpack_channels(packed)

    def whole(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole (1, X, Y, Z) float32 image and (8, X, Y, Z) label (validation, testing)."""
        return np.asarray(self._map("image"), dtype=np.float32), unpack_channels(self._map("label"))


def patch_starts(case: StoredCase, size: Sequence[int], count: int, sampling: str,
                 rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The corners of `count` patches of `size` in `case`: `random`, uniform over the positions where the patch
    fits; `posneg`, centred on a foreground voxel or on a background one with equal odds (MONAI's
    RandCropByPosNegLabel with pos = neg = 1), the centre moved so the patch stays inside the volume."""
    limits = [max(d - n, 0) for d, n in zip(case.shape, size)]
    if sampling == "random":
        return [tuple(int(rng.integers(0, m + 1)) for m in limits) for _ in range(count)]
    if sampling != "posneg":
        raise ValueError(f"preprocess.patch_sampling={sampling!r} with preprocess.cache: patches: use 'random' or "
                         "'posneg' (or the volume cache for 'classes').")
    foreground, label = case.foreground, case._map("label")
    starts = []
    for _ in range(count):
        if len(foreground) and rng.random() < 0.5:
            centre = np.unravel_index(int(foreground[rng.integers(len(foreground))]), case.shape)
        else:  # background: a random voxel of no foreground channel (a few tries; almost every voxel is one)
            for _ in range(20):
                centre = tuple(int(rng.integers(0, d)) for d in case.shape)
                if not label[centre] & FOREGROUND_BITS:
                    break
        starts.append(tuple(int(min(max(c - n // 2, 0), m)) for c, n, m in zip(centre, size, limits)))
    return starts
