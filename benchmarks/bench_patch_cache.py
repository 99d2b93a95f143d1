"""The paper profile's training data path at 1 mm, volume cache vs patch cache, side by side in one run.

One real-size synthetic case (the phantom at its native voxel size, `--dataset`, default pancreas) is
preprocessed to 1 mm and cached both ways; each way then serves training batches of the paper profile
(8 patches of 96^3, `patch_sampling` random) in a fresh process, in-process loading as an FL client does
(`client_workers: 0` before; one worker's view). Reports cache bytes per case and per voxel, patches/s, and the
peak RSS of the process serving them. One GPU consumes about 20 patches/s (a batch of 8 every ~0.4 s).

    .venv/bin/python benchmarks/bench_patch_cache.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def make_case(root: Path, dataset: str) -> dict:
    from fedseg.data import phantom
    from fedseg.data.labels import owned_mask

    start = time.perf_counter()
    case = phantom.simulate_case(dataset, f"{dataset}_1", seed=0, inplane_zoom=1.0, slice_zoom=1.0)
    paths = {"image": root / "image.nii.gz", "label": root / "label.nii.gz"}
    nib.save(nib.Nifti1Image(case["image"], case["affine"]), str(paths["image"]))
    nib.save(nib.Nifti1Image(case["label"], case["affine"]), str(paths["label"]))
    zooms = [round(float(z), 2) for z in nib.affines.voxel_sizes(case["affine"])]
    print(f"phantom {dataset} case at its native grid {case['image'].shape}, {zooms} mm "
          f"({time.perf_counter() - start:.0f} s to generate)", flush=True)
    return {"image": str(paths["image"]), "label": str(paths["label"]), "dataset": dataset,
            "case_id": f"{dataset}_1", "split": "train", "owned": owned_mask(dataset).astype(np.uint8).tolist(),
            "files": ""}


def config(root: Path, mode: str) -> dict:
    from fedseg.config import load_profile

    cfg = load_profile("paper")
    cfg.update(data_root=str(root), seed=0)
    cfg["preprocess"] = {**cfg["preprocess"], "cache": mode, "num_workers": 0, "in_memory": False}
    return cfg


def serve(root: Path, mode: str, steps: int) -> dict:
    """In this (fresh) process: build the cache of the case if needed, then time `steps` training batches."""
    import torch

    from fedseg.data import transforms
    from fedseg.train.training import PatchBatches

    torch.set_num_threads(1)
    record = json.loads((root / "record.json").read_text())
    record["owned"] = np.asarray(record["owned"], dtype=np.uint8)
    cfg = config(root, mode)
    start = time.perf_counter()
    built = transforms.build_cache({**cfg, "preprocess": {**cfg["preprocess"], "cache_workers": 1}}, [record],
                                   progress=False)
    build_s = time.perf_counter() - start
    batches = PatchBatches(cfg, [record], seed=0, cases_per_step=cfg["train"]["cases_per_step"])
    batches[0]  # first touch (maps, page cache) not timed
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = batches[step]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before anything else is read
    patches = steps * batch["image"].shape[0]
    shape = batches.stored[0].shape if batches.stored else tuple(batches.volumes[0]["image"].shape[1:])
    return {"cache": mode, "preprocessed grid": "x".join(map(str, shape)), "build s": round(build_s, 1),
            "cache MB per case": built["cache_mb"], "bytes per voxel": round(built["cache_mb"] * 2**20
                                                                                / float(np.prod(shape)), 2),
            "patches/s": round(patches / seconds, 2), "peak RSS MB": round(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pancreas")
    parser.add_argument("--steps", type=int, default=6, help="training batches timed per cache")
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(Path(args.serve[0]), args.serve[1], args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "record.json").write_text(json.dumps(make_case(root, args.dataset)))
        env = {**os.environ, "FEDSEG_CACHE": str(root / "cache")}
        rows = []
        for mode in ("volumes", "patches"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--serve", str(root), mode],
                                 env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    import pandas as pd

    table = pd.DataFrame(rows).set_index("cache")
    print(f"\npaper profile, one {args.dataset} phantom case at 1 mm, batches of 8 patches of 96^3, one process, "
          "one torch thread")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
