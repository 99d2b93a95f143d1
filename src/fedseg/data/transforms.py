"""MONAI preprocessing for training, validation and inference, and the preprocessed cache on disk.

The deterministic part (load, RAS orientation, resampling to the profile's spacing, intensities to [0, 1]:
the HU window for CT, the image's own percentiles for MRI(-like) cases, label map into the 8 channels with
the owned-channel mask) runs once per case and is cached by MONAI's
PersistentDataset; the random part (patches, intensity shift) runs on every sample. So training never
decodes and resamples a NIfTI twice.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from monai.data import Dataset, PersistentDataset
from tqdm.auto import tqdm

from fedseg.config import repo_root
from fedseg.data import patches
from fedseg.data.gin import RandGINd
from fedseg.data.labels import TRAIN_DATASETS, owned_mask, to_multihot
from fedseg.data.layouts import case_files

IMAGE, LABEL, FOREGROUND = "image", "label", "foreground"
FG_POSTFIX, BG_POSTFIX = "_fg", "_bg"
FG_INDICES, BG_INDICES = FOREGROUND + FG_POSTFIX, FOREGROUND + BG_POSTFIX  # voxel positions, when precomputed
#: Bump when the deterministic pipeline changes, so old caches are not reused.
PIPELINE_VERSION = 2  # 2: MRI(-like) cases scaled by their own percentiles, not the HU window
CT, MRI = "CT", "MRI"
#: Percentiles of an MRI(-like) image mapped to 0 and 1 when the profile's `preprocess.mri_percentiles` is unset.
MRI_PERCENTILES = (0.5, 99.5)


def mri_percentiles(pre: Mapping[str, Any]) -> tuple[float, float]:
    """The profile's `preprocess.mri_percentiles`, else `MRI_PERCENTILES`."""
    return tuple(pre.get("mri_percentiles") or MRI_PERCENTILES)


def mri_datasets(data_root: str | Path) -> frozenset[str]:
    """The datasets a synthetic data root holds in the MRI-like contrast (its `phantom.json`, FedGIN's
    experiment); none for a real data root, since the study's datasets are all CT."""
    record = Path(data_root) / "phantom.json"
    if not record.exists():
        return frozenset()
    return frozenset(json.loads(record.read_text())["parameters"].get("mri_like") or ())


class ScaleIntensityByModalityd(mt.MapTransform):
    """Intensities to [0, 1] by the record's `modality`: CT through the HU window (MONAI's
    ScaleIntensityRange), MRI through the image's own percentiles (ScaleIntensityRangePercentiles), since
    MRI values have no absolute scale. MONAI has both scalings but no per-record switch: this only picks one.
    """
    def __init__(self, keys: str, hu_window: tuple[float, float],
                 mri_percentiles: tuple[float, float] = MRI_PERCENTILES, modality_key: str = "modality"):
        super().__init__(keys)
        low, high = hu_window
        self.scalers = {CT: mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
                        MRI: mt.ScaleIntensityRangePercentiles(lower=mri_percentiles[0], upper=mri_percentiles[1],
                                                               b_min=0.0, b_max=1.0, clip=True)}
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get(self.modality_key, CT)
        if modality not in self.scalers:
            raise ValueError(f"modality {modality!r} of case {d.get('case_id')!r}: use {CT!r} or {MRI!r}.")
        for key in self.key_iterator(d):
            d[key] = self.scalers[modality](d[key])
        return d


class MultiHotd(mt.MapTransform):
    """Maps a dataset's integer label map into the 8-channel multi-hot target (`fedseg.data.labels`).

    Written here because the scheme is the study's own; it also adds a one-channel union of the
    dataset's foreground, which the foreground-biased patch sampler draws its centres from.
    """
    def __init__(self, keys: str = LABEL, dataset_key: str = "dataset"):
        super().__init__(keys)
        self.dataset_key = dataset_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            array = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            target = to_multihot(np.rint(array[0]).astype(np.int16), d[self.dataset_key])
            d[key] = torch.from_numpy(target)
            d[FOREGROUND] = torch.from_numpy(target[1:].any(axis=0, keepdims=True).astype(np.uint8))
        return d


def case_records(data_root: str | Path, manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """One MONAI data dict per manifest row: file paths, dataset, case id, split, modality, owned-channel mask."""
    records = []
    mri = mri_datasets(data_root)
    for _, row in manifest.iterrows():
        image, label = case_files(data_root, row)
        records.append({IMAGE: str(image), LABEL: str(label), "dataset": row["dataset"],
                        "case_id": row["case_id"], "split": row["split"],
                        "modality": MRI if row["dataset"] in mri else CT,
                        "owned": owned_mask(row["dataset"]).astype(np.uint8), "files": file_stamp(image, label)})
    return records


def file_stamp(*paths: str | Path) -> str:
    """Size and modification time of each file ("" for a missing one). A record carries its files' stamp, and
    the cache's key is the whole record (PersistentDataset's hash), so a file replaced under the same name
    (regenerated or re-downloaded data) is preprocessed again, never answered from the old file's cache."""
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append("")
            continue
        stamps.append(f"{info.st_size}:{info.st_mtime_ns}")
    return "|".join(stamps)


def preprocess(cfg: dict[str, Any]) -> mt.Compose:
    """The deterministic part: everything done once per case and cached."""
    pre = cfg["preprocess"]
    return mt.Compose([
        mt.LoadImaged(keys=[IMAGE, LABEL], ensure_channel_first=True, image_only=True),
        mt.Orientationd(keys=[IMAGE, LABEL], axcodes="RAS", labels=None),
        mt.Spacingd(keys=[IMAGE, LABEL], pixdim=pre["spacing"], mode=("bilinear", "nearest")),
        ScaleIntensityByModalityd(keys=IMAGE, hu_window=pre["hu_window"], mri_percentiles=mri_percentiles(pre)),
        MultiHotd(keys=LABEL),
        mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32, track_meta=False),
        mt.EnsureTyped(keys=[LABEL, FOREGROUND], dtype=torch.uint8, track_meta=False),
    ])


def augment(cfg: dict[str, Any]) -> mt.Compose:
    """The random part of training: patches (random or foreground-biased), GIN if `preprocess.gin` is set
    (e.g. `{prob: 0.5}`; `fedseg.data.gin.RandGINd`'s arguments), then the intensity shift."""
    pre = cfg["preprocess"]
    patch, count = pre["patch_size"], pre["patches_per_volume"]
    keys = [IMAGE, LABEL]
    if pre["patch_sampling"] == "random":
        crop = mt.RandSpatialCropSamplesd(keys=keys, roi_size=patch, num_samples=count, random_size=False)
    elif pre["patch_sampling"] == "posneg":
        crop = mt.RandCropByPosNegLabeld(keys=keys, label_key=FOREGROUND, spatial_size=patch, pos=1, neg=1,
                                         num_samples=count, fg_indices_key=FG_INDICES, bg_indices_key=BG_INDICES)
    elif pre["patch_sampling"] == "classes":
        # class-balanced centres: background and each channel the case contains equally often, so a
        # tumour of a few hundred voxels is the centre of as many patches as its organ (nnU-Net-style
        # foreground oversampling); the multi-hot label is MONAI's one-hot layout, absent channels skipped
        crop = mt.RandCropByLabelClassesd(keys=keys, label_key=LABEL, spatial_size=patch, num_classes=None,
                                          num_samples=count, warn=False)
    else:
        raise ValueError(f"preprocess.patch_sampling={pre['patch_sampling']!r}: use 'random', 'posneg' or 'classes'.")
    return mt.Compose([
        mt.SpatialPadd(keys=[*keys, FOREGROUND], spatial_size=patch),
        crop,
        mt.DeleteItemsd(keys=FOREGROUND),
        *_patch_transforms(pre),
    ])


def patch_augment(cfg: dict[str, Any]) -> mt.Compose:
    """`augment` after the crop: what a patch read from the patch cache (`preprocess.cache: patches`) gets."""
    return mt.Compose(_patch_transforms(cfg["preprocess"]))


def _patch_transforms(pre: Mapping[str, Any]) -> list[mt.MapTransform]:
    shift = pre["intensity_shift"]
    # FedGIN (Nagaraju et al. 2025): random shallow-network intensity remapping of each patch, when the profile asks
    gin = [RandGINd(keys=IMAGE, **pre["gin"])] if pre.get("gin") else []
    return [*spatial_augmentation(pre.get("spatial_aug")), *gin, *domain_augmentation(pre.get("domain_augment")),
            mt.RandShiftIntensityd(keys=IMAGE, offsets=shift["offset"], prob=shift["prob"])]


def domain_augmentation(settings: Mapping[str, Any] | None) -> list[mt.MapTransform]:
    """Domain randomisation of each training patch with MONAI's intensity transforms, each applied with
    probability `prob`: a bias field, a blur (another resolution), a gamma, a random monotonic remapping of
    the histogram, noise. `preprocess.domain_augment: {prob: 0.3}` turns it on; null (the default) off. The
    phantom's `data.phantom.domain: randomised` randomises the images themselves (per tissue)."""
    if not settings:
        return []
    prob = float(settings.get("prob", 0.3))
    return [mt.RandBiasFieldd(keys=IMAGE, coeff_range=(0.0, 0.3), prob=prob),
            mt.RandGaussianSmoothd(keys=IMAGE, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0),
                                   prob=prob),
            mt.RandAdjustContrastd(keys=IMAGE, gamma=(0.6, 1.6), prob=prob),
            mt.RandHistogramShiftd(keys=IMAGE, num_control_points=(5, 10), prob=prob),
            mt.RandGaussianNoised(keys=IMAGE, std=0.05, prob=prob)]


def sampling_indices(cfg: dict[str, Any]) -> mt.Compose:
    """What a volume kept in memory for training gets once: the positions of its foreground and
    background voxels (MONAI's FgBgToIndicesd), which the `posneg` patch sampler then reads instead of
    searching the whole volume for every patch. Nothing for the other samplers. Positions are taken on
    the volume as `augment` pads it, so a patch drawn from them is the one the search would draw."""
    if cfg["preprocess"]["patch_sampling"] != "posneg":
        return mt.Compose([])
    return mt.Compose([mt.SpatialPadd(keys=[IMAGE, LABEL, FOREGROUND], spatial_size=cfg["preprocess"]["patch_size"]),
                       mt.FgBgToIndicesd(keys=FOREGROUND, fg_postfix=FG_POSTFIX, bg_postfix=BG_POSTFIX)])


def spatial_augmentation(settings: Mapping[str, Any] | None) -> list[mt.MapTransform]:
    """Random rotation and scaling of each patch (MONAI's RandAffined; image bilinear, labels nearest),
    when the profile's `preprocess.spatial_aug` asks: `{prob, rotate (radians, about each axis), scale
    (fraction)}`. No flips: left and right differ in the abdomen. With a few training cases per task a
    network otherwise memorises each case's organ shapes and tumour positions instead of learning them."""
    if not settings:
        return []
    rotate, scale = float(settings.get("rotate", 0.0)), float(settings.get("scale", 0.0))
    return [mt.RandAffined(keys=[IMAGE, LABEL], prob=float(settings.get("prob", 0.5)), rotate_range=[rotate] * 3,
                           scale_range=[scale] * 3, mode=("bilinear", "nearest"), padding_mode="border"),
            mt.EnsureTyped(keys=[LABEL], dtype=torch.uint8, track_meta=False),
            mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32, track_meta=False)]


#: File in each cache folder naming the settings its volumes were preprocessed with.
CACHE_SETTINGS = "settings.json"


def cache_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a cached volume depends on besides its files: the data root and the deterministic preprocessing."""
    pre = cfg["preprocess"]
    return {"data_root": str(cfg["data_root"]), "spacing": pre["spacing"], "hu_window": pre["hu_window"],
            "mri_percentiles": mri_percentiles(pre), "version": PIPELINE_VERSION}


def cache_dir(cfg: dict[str, Any]) -> Path:
    """The on-disk cache of one data root under one preprocessing: a new setting never reuses it. The folder's
    name ends in a hash of `cache_settings`, and `settings.json` in it says them in full; a folder whose
    settings.json says otherwise is refused (`StaleCacheError`) rather than read."""
    settings = cache_settings(cfg)
    key = json.dumps(settings, sort_keys=True)
    base = Path(os.environ.get("FEDSEG_CACHE") or Path(os.environ.get("FEDSEG_DATA", repo_root() / "data")) / "cache")
    folder = base / f"{Path(cfg['data_root']).name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    record = folder / CACHE_SETTINGS
    if record.exists():
        found = json.loads(record.read_text())
        if found != json.loads(key):
            differing = sorted(k for k in set(found) | set(settings) if found.get(k) != json.loads(key).get(k))
            raise StaleCacheError(f"The cache {folder} was made with other settings ({', '.join(differing)} "
                                  f"differ: {record}); delete that folder and it is rebuilt.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return folder


class StaleCacheError(RuntimeError):
    """A cache folder holds volumes preprocessed under other settings than the ones asked for."""

def training_dataset(cfg: dict[str, Any], records: list[dict[str, Any]]) -> Dataset:
    """Random training patches: whole volumes read from the preprocessed cache, then `augment`.

    The cache holds exactly `preprocess`; the random part is applied on top of it (a combined pipeline
    would make PersistentDataset cache a different prefix under the same file names).
    """
    return Dataset(evaluation_dataset(cfg, records), augment(cfg))


def evaluation_dataset(cfg: dict[str, Any], records: list[dict[str, Any]]) -> PersistentDataset | StoredVolumes:
    """Whole preprocessed volumes (validation, and testing at the profile's spacing), from the cache: MONAI's
    PersistentDataset, or with `preprocess.cache: patches` the patch cache's cases read whole."""
    if patch_cache(cfg):
        return StoredVolumes(cfg, records)
    return PersistentDataset(records, preprocess(cfg), cache_dir=cache_dir(cfg))


def patch_cache(cfg: dict[str, Any]) -> bool:
    """Whether the profile caches cases as memory-mapped arrays training reads patches from (`fedseg.data.patches`;
    `preprocess.cache: patches`, image dtype `preprocess.cache_dtype`) instead of whole pickled volumes."""
    mode = cfg["preprocess"]["cache"]
    if mode not in ("volumes", "patches"):
        raise ValueError(f"preprocess.cache={mode!r}: use 'volumes' (whole volumes, MONAI's PersistentDataset) "
                         "or 'patches' (memory-mapped arrays training slices patches from).")
    return mode == "patches"


def cache_dtype(cfg: dict[str, Any]) -> str:
    """The image dtype of the patch cache: the profile's `preprocess.cache_dtype`, float32 by default."""
    return cfg["preprocess"]["cache_dtype"]


def store_root(cfg: dict[str, Any]) -> Path:
    """The patch cache of one preprocessing (`cache_dir`) and image dtype: a folder per case under it."""
    return cache_dir(cfg) / f"patches-{cache_dtype(cfg)}"


def store_folder(cfg: dict[str, Any], record: Mapping[str, Any]) -> Path:
    """Where the patch cache keeps `record`'s case (`store_root`), named by the case and a hash of its files and
    their stamps (a replaced file is stored anew)."""
    key = json.dumps({k: record.get(k) for k in (IMAGE, LABEL, "files", "dataset")}, sort_keys=True)
    return store_root(cfg) / f"{record['dataset']}-{record['case_id']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def stored_case(cfg: dict[str, Any], record: Mapping[str, Any]) -> patches.StoredCase:
    """`record`'s case in the patch cache, preprocessed (`preprocess`) and stored first if it is not there."""
    folder = store_folder(cfg, record)
    if not patches.is_stored(folder):
        out = preprocess(cfg)(dict(record))
        patches.write_case(folder, np.asarray(out[IMAGE]), np.asarray(out[LABEL]), cache_dtype(cfg))
    return patches.StoredCase(folder)


class StoredVolumes(torch.utils.data.Dataset):
    """Whole volumes from the patch cache, items as PersistentDataset's: the record with its image, multi-hot
    label and foreground channel."""

    def __init__(self, cfg: dict[str, Any], records: list[dict[str, Any]]):
        self.records = records
        self.cases = [stored_case(cfg, record) for record in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.cases[index].whole()
        return {**self.records[index], IMAGE: torch.from_numpy(image), LABEL: torch.from_numpy(label),
                FOREGROUND: torch.from_numpy(label[1:].any(axis=0, keepdims=True).astype(np.uint8))}


def _store(job: tuple[dict[str, Any], dict[str, Any]]) -> int:
    cfg, record = job
    torch.set_num_threads(1)
    return patches.case_bytes(stored_case(cfg, record).folder)


def build_cache(cfg: dict[str, Any], records: list[dict[str, Any]], progress: bool = True) -> dict[str, Any]:
    """Preprocess every case of a training dataset once into the cache; returns what was done (cases given,
    cases cached, seconds, size). BTCV is left out: 04 segments it from its files, on its own grid. The patch
    cache is built by `preprocess.cache_workers` processes (default: one per core)."""
    given, records = len(records), [r for r in records if r["dataset"] in TRAIN_DATASETS]
    start = time.perf_counter()
    if patch_cache(cfg):
        workers = int(cfg["preprocess"].get("cache_workers") or os.cpu_count() or 1)
        jobs = [(cfg, record) for record in records]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            sizes = list(tqdm(pool.map(_store, jobs), total=len(jobs), desc=f"preprocess → patch cache ({workers} "
                              "processes)", disable=not progress))
        folder, size = store_root(cfg), sum(sizes)
    else:
        dataset = evaluation_dataset(cfg, records)
        for index in tqdm(range(len(dataset)), desc="preprocess → cache", disable=not progress):
            dataset[index]
        folder, size = cache_dir(cfg), sum(f.stat().st_size for f in cache_dir(cfg).glob("*.pt"))
    return {"cases": given, "cached_cases": len(records), "seconds": round(time.perf_counter() - start, 2),
            "cache_dir": str(folder), "cache_mb": round(size / 2**20, 1)}

