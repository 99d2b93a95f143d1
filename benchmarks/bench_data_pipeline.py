"""Samples/s of the training data pipeline: from the preprocessed cache vs. decoding and resampling NIfTI on
every sample (the MONAI tutorial way), in one run, on one profile's data (default laptop).

    .venv/bin/python benchmarks/bench_data_pipeline.py --profile laptop
"""

from __future__ import annotations

import argparse
import shutil
import time

import pandas as pd
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from monai.utils import set_determinism

from fedseg.config import resolve
from fedseg.data import datasets, transforms


def patches_per_second(dataset, epochs: int, workers: int) -> tuple[float, int]:
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers)
    patches, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            patches += batch[transforms.IMAGE].shape[0]
    return patches / (time.perf_counter() - start), patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training cases per pipeline")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    set_determinism(0)
    cfg = resolve(args.profile)
    data_root = datasets.obtain_data(cfg)
    manifest = datasets.manifest_for(data_root)
    records = transforms.case_records(data_root, manifest[manifest.split == "train"])
    cache = transforms.cache_dir(cfg)
    shutil.rmtree(cache, ignore_errors=True)
    built = transforms.build_cache(cfg, records, progress=False)
    rows = []
    uncached = Dataset(records, Compose([transforms.preprocess(cfg), transforms.augment(cfg)]))
    rate, n = patches_per_second(uncached, args.epochs, args.workers)
    rows.append({"pipeline": "NIfTI decoded + resampled every sample", "patches": n, "patches/s": rate})
    rate, n = patches_per_second(transforms.training_dataset(cfg, records), args.epochs, args.workers)
    rows.append({"pipeline": "preprocessed cache (PersistentDataset)", "patches": n, "patches/s": rate})
    table = pd.DataFrame(rows).set_index("pipeline")
    table["speed-up"] = table["patches/s"] / table["patches/s"].iloc[0]
    print(f"profile {args.profile}: {len(records)} training cases, patch {cfg['preprocess']['patch_size']}, "
          f"{cfg['preprocess']['patches_per_volume']} patches per case, workers={args.workers}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"building the cache once: {built['seconds']} s for {built['cases']} cases ({built['cache_mb']} MB)")
    print(table.to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
