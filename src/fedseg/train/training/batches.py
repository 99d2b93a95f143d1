"""The training batches: item s of `PatchBatches` is step s's batch, drawn from (seed, s) alone, so a resumed run draws
the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedseg.data.patches import patch_starts
from fedseg.data.transforms import (
    IMAGE,
    LABEL,
    augment,
    evaluation_dataset,
    patch_augment,
    patch_cache,
    sampling_indices,
    stored_case,
)
from fedseg.train.training.settings import TrainingSettings


class PatchBatches(torch.utils.data.Dataset):
    """Item s is the training batch of step s: cases and patch positions drawn from (seed, s) alone.

    Reads whole preprocessed volumes from the cache and applies the random part of the pipeline
    (patches, intensity shift) with a generator seeded per step, so resuming at step s is exact.
    """
    def __init__(self, cfg: TrainingSettings | Mapping[str, Any], records: list[dict[str, Any]], seed: int,
                 cases_per_step: int, volumes: Sequence[dict[str, Any]] | None = None):
        if not records:
            raise ValueError("No training cases: check the manifest's train split for this client.")
        # `volumes`: preprocessed cases to draw from instead of the cache (e.g. with completed pseudo-labels)
        self.seed, self.cases_per_step = seed, cases_per_step
        # a training's settings (or a resolved configuration's); the data layer reads the data root and the
        # preprocess section in the configuration's form
        settings = TrainingSettings.of(cfg)
        pre, data = settings.preprocess, settings.data_config()
        # the patch cache (`preprocess.cache: patches`): patches sliced from memory-mapped cases, not cut from
        # whole volumes read every step
        self.stored = [stored_case(data, r) for r in records] if volumes is None and patch_cache(data) else None
        self.patch, self.count, self.sampling = pre.patch_size, pre.patches_per_volume, pre.patch_sampling
        self.owned = [np.asarray(r["owned"]) for r in records]
        self.tail = patch_augment(data)
        self.volumes = self.stored if self.stored is not None else (
            evaluation_dataset(data, records) if volumes is None else volumes)
        self.augment = augment(data)
        # `preprocess.in_memory`: each volume is read from the cache once and kept, with the positions of
        # its foreground and background voxels that the patch sampler would otherwise search every step
        self.in_memory = bool(pre.in_memory)
        self.indexer = sampling_indices(data)
        self.memory: dict[int, dict[str, Any]] = {}

    def volume(self, index: int) -> dict[str, Any]:
        if not self.in_memory:
            return self.volumes[index]
        if index not in self.memory:
            self.memory[index] = self.indexer(dict(self.volumes[index]))
        return self.memory[index]

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.volumes), size=self.cases_per_step, replace=len(self.volumes) < self.cases_per_step)
        patches = []
        for index in picks:
            seed = int(rng.integers(2**31 - 1))
            if self.stored is not None:
                patches.extend(self._stored_patches(int(index), seed))
                continue
            self.augment.set_random_state(seed=seed)
            patches.extend(self.augment(self.volume(int(index))))
        return {
            IMAGE: torch.stack([torch.as_tensor(p[IMAGE]) for p in patches]),
            LABEL: torch.stack([torch.as_tensor(p[LABEL]) for p in patches]),
            "owned": torch.stack([torch.as_tensor(np.asarray(p["owned"])) for p in patches]).bool(),
        }

    def _stored_patches(self, index: int, seed: int) -> list[dict[str, Any]]:
        """`patches_per_volume` patches of stored case `index`, read by slicing, then `patch_augment`."""
        case, rng = self.stored[index], np.random.default_rng(seed)
        self.tail.set_random_state(seed=seed)
        out = []
        for start in patch_starts(case, self.patch, self.count, self.sampling, rng):
            image, label = case.crop(start, self.patch)
            out.append(self.tail({IMAGE: torch.from_numpy(image), LABEL: torch.from_numpy(label),
                                  "owned": self.owned[index]}))
        return out
