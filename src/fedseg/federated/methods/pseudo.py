"""`pseudo`: FedAvg, then from round `federated.pseudo_after` + 1 (default: half the rounds) each client lets the
received global model label its training cases' unlabelled channels (sigmoid > 0.5, the largest connected component
kept per channel, both kidneys; never over the client's own labels; `completion.pseudo_label`) and trains on the
completed targets, every channel supervised (Wang & Ma 2022's pseudo-labelling, federated)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg import run_folder
from fedseg.data.labels import pack_channels, unpack_channels
from fedseg.data.transforms import FOREGROUND, IMAGE, LABEL, evaluation_dataset
from fedseg.federated.methods.base import LocalRound, Method
from fedseg.train.completion import pseudo_label_volume
from fedseg.train.training import LocalHooks, select_device

#: Components kept per channel when cleaning pseudo-labels: the largest, but both kidneys.
PSEUDO_COMPONENTS: dict[str, int | None] = {"kidney": 2}


def pseudo_labelled_volumes(cfg: dict[str, Any], teacher: torch.nn.Module, records: list[dict[str, Any]],
                            device: torch.device, folder: str | Path | None = None) -> Sequence[dict[str, Any]]:
    """The client's preprocessed training volumes with their unowned channels completed by `teacher`
    (`completion.pseudo_label_volume`), the owned mask switched on for those channels, and the sampler's
    foreground recomputed from the completed target.

    With `folder` (the client's `pseudo/` folder) each completed target is written there as one byte per voxel
    (`labels.pack_channels`) and a `CompletedVolumes` reads the cases back one at a time, so a client holds one
    volume in memory, not all of its training set; without it, a list in memory (small data, tests).
    """
    teacher = teacher.to(device).eval()
    cached = evaluation_dataset(cfg, records)
    volumes = []
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(len(cached)):
        case = dict(cached[index])
        target, owned = pseudo_label_volume(teacher, torch.as_tensor(case[IMAGE]), torch.as_tensor(case[LABEL]),
                                            np.asarray(case["owned"]), cfg, device,
                                            num_components=PSEUDO_COMPONENTS)
        owned = np.asarray(owned).astype(np.uint8)
        if folder is not None:
            path = folder / f"{index}.pt"
            torch.save({"label": torch.from_numpy(pack_channels(np.asarray(target))), "owned": owned,
                        "case_id": records[index]["case_id"]}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            continue
        volumes.append(_completed(case, torch.as_tensor(target).to(torch.uint8), owned))
    return CompletedVolumes(cached, folder) if folder is not None else volumes


def _completed(case: dict[str, Any], target: torch.Tensor, owned: np.ndarray) -> dict[str, Any]:
    """`case` with its completed (8, X, Y, Z) uint8 target, owned mask and the sampler's foreground from them."""
    return {**case, LABEL: target, "owned": owned, FOREGROUND: target[1:].amax(dim=0, keepdim=True)}


class CompletedVolumes(Sequence):
    """A client's cached training volumes with the completed targets `pseudo_labelled_volumes` wrote to `folder`,
    read one case at a time (what `training.PatchBatches` draws its patches from)."""

    def __init__(self, cached: Sequence[dict[str, Any]], folder: str | Path):
        self.cached, self.folder = cached, Path(folder)

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        saved = torch.load(self.folder / f"{index}.pt", weights_only=False)
        return _completed(dict(self.cached[index]), torch.from_numpy(unpack_channels(saved["label"].numpy())),
                          saved["owned"])


class Pseudo(Method):
    name = "pseudo"
    summary = "FedAvg, then training on targets completed by the global model's pseudo-labels"
    knobs = {"pseudo_after": None}

    def resolve_knobs(self, fl: dict[str, Any]) -> None:
        if fl["pseudo_after"] is None:
            fl["pseudo_after"] = fl["rounds"] // 2
        fl["pseudo_after"] = int(fl["pseudo_after"])

    def hooks(self, local: LocalRound) -> LocalHooks:
        if local.server_round <= local.cfg["federated"]["pseudo_after"]:
            return LocalHooks()
        # completed targets on disk (a byte per voxel), read back one case at a time while training
        return LocalHooks(volumes=pseudo_labelled_volumes(
            dict(local.cfg), local.global_model(), list(local.train_records), select_device(),
            folder=run_folder.pseudo_dir(local.cfg["run_dir"], local.client)))
