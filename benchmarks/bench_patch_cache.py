"""The paper profile's training data path at 1 mm, volume cache vs patch cache, side by side in one run.

One real-size synthetic case (the phantom at its native voxel size, `--dataset`, default pancreas) is
preprocessed to 1 mm and cached both ways; each way then serves training batches of the paper profile
(8 patches of 96^3, `patch_sampling` random) in a fresh process, in-process loading as an FL client does
(`client_workers: 0` before; one worker's view). Reports cache bytes per case and per voxel, patches/s, and the
peak RSS of the process serving them. One GPU consumes about 20 patches/s (a batch of 8 every ~0.4 s).

    .venv/bin/python benchmarks/bench_patch_cache.py --steps 6

It also measures 04's logits memory (all models' at once vs one group at a time) and a `pseudo` client's
(completed volumes in memory vs on disk) on the same case.
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


def logits_memory(root: Path, mode: str) -> dict:
    """In this (fresh) process: 04's logits of one case at 1 mm for the ten models of a run (4 SL, central, FL
    global, 4 FL local), all held at once as 04 did ("all") or one group at a time with the client ensembles
    streamed ("streamed"). Tiny networks stand in for the trained ones: a logit tensor's size does not depend on
    the network, and the paper's DynUNet would take minutes per model on a CPU."""
    import torch

    from fedseg.data import transforms
    from fedseg.data.labels import TRAIN_DATASETS
    from fedseg.train import inference
    from fedseg.train.models import build_network

    torch.set_num_threads(1)
    record = json.loads((root / "record.json").read_text())
    record["owned"] = np.asarray(record["owned"], dtype=np.uint8)
    cfg = config(root, "patches")
    image = torch.from_numpy(transforms.stored_case(cfg, record).whole()[0])
    del record
    cfg["train"]["sw_batch_size"], cfg["train"]["sw_overlap"] = 1, 0.0
    groups = {"sl": {d: build_network("UNet", channels=(4, 8), strides=(2,)) for d in TRAIN_DATASETS},
              "central": {"model": build_network("UNet", channels=(4, 8), strides=(2,))},
              "fl-global": {"model": build_network("UNet", channels=(4, 8), strides=(2,))},
              "fl-local": {d: build_network("UNet", channels=(4, 8), strides=(2,)) for d in TRAIN_DATASETS}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, device = time.perf_counter(), torch.device("cpu")
    if mode == "all":
        held = {group: inference.predict_logits(models, image, cfg, device) for group, models in groups.items()}
        for group in groups:  # each method's combination made as it is scored, the models' logits all kept
            combined = inference.ensemble_logits(held[group]) if group in ("sl", "fl-local") else held[group]["model"]
            del combined
    else:
        for group, models in groups.items():
            combined = (inference.predict_ensemble(models, image, cfg, device) if group in ("sl", "fl-local")
                        else inference.predict_logits(models["model"], image, cfg, device))
            del combined
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"04 logits": mode, "grid": "x".join(map(str, image.shape[1:])),
            "one model's logits MB": round(8 * 4 * image[0].numel() / 2**20),
            "peak RSS MB": round(peak), "above the image and models MB": round(peak - base),
            "seconds": round(time.perf_counter() - start, 1)}


def pseudo_memory(root: Path, mode: str, cases: int = 4) -> dict:
    """In this (fresh) process: a `pseudo` client completing the targets of `cases` copies of the case (the
    volume cache, a tiny teacher network) and reading every completed case once, as its training draws them:
    completed volumes kept in memory ("memory", before) or written at a byte per voxel and read back one at a
    time ("disk", now)."""
    import torch

    from fedseg.federated import methods
    from fedseg.train.models import build_network

    torch.set_num_threads(1)
    record = json.loads((root / "record.json").read_text())
    record["owned"] = np.asarray(record["owned"], dtype=np.uint8)
    records = [{**record, "case_id": f"{record['case_id']}-{i}"} for i in range(cases)]
    cfg = config(root, "volumes")
    cfg["train"]["sw_batch_size"], cfg["train"]["sw_overlap"] = 1, 0.0
    teacher = build_network("UNet", channels=(4, 8), strides=(2,))
    start = time.perf_counter()
    folder = root / f"pseudo-{mode}" if mode == "disk" else None
    volumes = methods.pseudo.pseudo_labelled_volumes(cfg, teacher, records, torch.device("cpu"), folder=folder)
    for index in range(len(volumes)):
        volumes[index]["label"].sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    on_disk = sum(p.stat().st_size for p in folder.glob("*.pt")) / 2**20 if folder else 0.0
    return {"pseudo targets": mode, "cases": cases, "peak RSS MB": round(peak), "on disk MB": round(on_disk),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pancreas")
    parser.add_argument("--steps", type=int, default=6, help="training batches timed per cache")
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--logits", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--pseudo", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(serve(Path(args.serve[0]), args.serve[1], args.steps)))
        return
    if args.logits:
        print(json.dumps(logits_memory(Path(args.logits[0]), args.logits[1])))
        return
    if args.pseudo:
        print(json.dumps(pseudo_memory(Path(args.pseudo[0]), args.pseudo[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "record.json").write_text(json.dumps(make_case(root, args.dataset)))
        env = {**os.environ, "FEDSEG_CACHE": str(root / "cache")}

        def fresh(part: str, mode: str) -> dict:
            """One measurement in a fresh process, so each peak RSS is its own."""
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), part, str(root), mode],
                                 env=env, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(row, flush=True)
            return row

        rows = [fresh("--serve", mode) for mode in ("volumes", "patches")]
        memory = [fresh("--logits", mode) for mode in ("all", "streamed")]
        pseudo = [fresh("--pseudo", mode) for mode in ("memory", "disk")]
    import pandas as pd

    table = pd.DataFrame(rows).set_index("cache")
    print(f"\npaper profile, one {args.dataset} phantom case at 1 mm, batches of 8 patches of 96^3, one process, "
          "one torch thread")
    print(table.to_markdown())
    print("\n04's logits of that case for a run's ten models (4 SL, central, FL global, 4 FL local)")
    print(pd.DataFrame(memory).set_index("04 logits").to_markdown())
    print("\na pseudo-label client's completed targets for 4 copies of that case")
    print(pd.DataFrame(pseudo).set_index("pseudo targets").to_markdown())


if __name__ == "__main__":
    main()
