"""The paper profile's GPU time budget, estimated from its settings and the manifest's split sizes.

Nothing here is measured on a GPU: the two costs a budget needs are inputs, with defaults from the arithmetic
written in docs/paper_scale.md (a training step of 8 patches of 96^3 through DynUNet 32-320 with AMP, 9.6 TFLOP,
takes 0.3-0.8 s at 12-32 TFLOP/s of sustained convolution throughput; one whole-volume sliding-window inference
at 1 mm with overlap 0.5, about 0.4 TFLOP per 96^3 window and ~300 windows, takes 4-7 s). Everything else,
the number of steps, validations, rounds, cases and models, comes from the profile and data_manifest.csv.
"Before" is the profile and code as they were: validation every 500 steps (SL, central) and every round (FL)
on every validation case, and 02's models one after another on one GPU. It assumes the data path keeps the
GPU busy (docs/paper_scale.md, patch cache).

    .venv/bin/python benchmarks/paper_budget.py            # low and high cost, 1 and 4 GPUs
"""

from __future__ import annotations

import argparse

import pandas as pd

from fedseg.config import load_profile
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.data.manifest import MANIFEST_PATH
from fedseg.federated.task import validated_round
from fedseg.train.training import TrainSettings, validation_interval


def split_sizes() -> pd.DataFrame:
    manifest = pd.read_csv(MANIFEST_PATH)
    return manifest.groupby(["dataset", "split"]).size().unstack(fill_value=0)


def validation_cases(n_val: int, val_cases: int | None) -> int:
    return min(n_val, int(val_cases)) if val_cases else n_val


def makespan(jobs: list[float], gpus: int) -> float:
    """Longest job first onto the least loaded GPU, as 02's process pool takes them."""
    loads = [0.0] * gpus
    for job in sorted(jobs, reverse=True):
        loads[loads.index(min(loads))] += job
    return max(loads)


def budget(cfg: dict, sizes: pd.DataFrame, step_s: float, infer_s: float, gpus: int,
           spread_02: bool = True) -> dict[str, float]:
    """Hours of 02, 03 and 04, and the share of validation in 02 + 03, on `gpus` GPUs (02's models one per GPU
    with `spread_02`, else one after another on one GPU, as before)."""
    train, fl = cfg["train"], cfg["federated"]
    n_val = {d: validation_cases(int(sizes.loc[d, "val"]), train.get("val_cases")) for d in TRAIN_DATASETS}

    def validations(steps: int) -> int:
        return steps // validation_interval(TrainSettings.of(train), steps)

    sl_jobs, sl_val = [], 0.0
    for d in TRAIN_DATASETS:
        val = validations(int(train["steps"])) * n_val[d] * infer_s
        sl_jobs.append(int(train["steps"]) * step_s + val)
        sl_val += val
    central_steps = int(train["central_steps"] or train["steps"] * len(TRAIN_DATASETS))
    central_val = validations(central_steps) * sum(n_val.values()) * infer_s
    sl_jobs.append(central_steps * step_s + central_val)
    sl_jobs.append(int(cfg["localiser"]["steps"]) * step_s)  # coarse, far cheaper per step: an upper bound
    hours_02 = makespan(sl_jobs, gpus if spread_02 else 1) / 3600

    rounds, local = int(fl["rounds"]), int(fl["local_steps"])
    fl_settings = {"val_every": fl.get("val_every", 1), "rounds": rounds}
    validated = sum(validated_round(fl_settings, r) for r in range(1, rounds + 1))
    per_client_train = local * step_s
    per_client_val = {d: 2 * n_val[d] * infer_s for d in TRAIN_DATASETS}  # its local model and the global one
    at_once = min(gpus, len(TRAIN_DATASETS))
    if at_once == 1:
        train_03 = rounds * len(TRAIN_DATASETS) * per_client_train
        val_03 = validated * sum(per_client_val.values())
    else:  # clients in parallel, one per GPU; a round waits for its slowest client
        train_03 = rounds * per_client_train * -(-len(TRAIN_DATASETS) // at_once)
        val_03 = validated * max(per_client_val.values()) * -(-len(TRAIN_DATASETS) // at_once)
    hours_03 = (train_03 + val_03) / 3600

    models = 2 * len(TRAIN_DATASETS) + 2  # SL and FL local per dataset, central, FL global
    tests = int(sum(sizes.loc[d, "test"] for d in TRAIN_DATASETS))
    btcv = int(sizes.loc["btcv", "test"]) if "btcv" in sizes.index else 0
    inferences_04 = models * tests + (models + len(TRAIN_DATASETS)) * btcv  # + coarse-to-fine's local pass
    hours_04 = inferences_04 * infer_s / 3600  # 04 runs on one GPU

    # validation's share of the GPU time of 02 and 03 (the same on 1 or 4 GPUs)
    gpu_val = sl_val + central_val + validated * sum(per_client_val.values())
    gpu_all = sum(sl_jobs) + rounds * len(TRAIN_DATASETS) * per_client_train + validated * sum(per_client_val.values())
    return {"02 h": hours_02, "03 h": hours_03, "04 h": hours_04, "02+03+04 h": hours_02 + hours_03 + hours_04,
            "validation share of 02+03": gpu_val / gpu_all}


def before(cfg: dict) -> dict:
    """The paper profile as it was before validation was made to scale."""
    train = {k: v for k, v in cfg["train"].items() if k not in ("validations", "val_cases")}
    return {**cfg, "train": {**train, "val_every": 500},
            "federated": {**cfg["federated"], "val_every": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, nargs=2, default=(0.3, 0.8), metavar=("LOW", "HIGH"),
                        help="GPU seconds per training step (batch 8 of 96^3)")
    parser.add_argument("--infer-s", type=float, nargs=2, default=(4.0, 7.0), metavar=("LOW", "HIGH"),
                        help="GPU seconds per whole-volume inference at 1 mm")
    args = parser.parse_args()
    cfg, sizes = load_profile("paper"), split_sizes()
    rows = []
    for name, profile in (("before", before(cfg)), ("now", cfg)):
        for gpus in (1, 4):
            for cost, step_s, infer_s in (("low", args.step_s[0], args.infer_s[0]),
                                          ("high", args.step_s[1], args.infer_s[1])):
                rows.append({"profile": name, "GPUs": gpus, "cost": cost,
                             **budget(profile, sizes, step_s, infer_s, gpus, spread_02=name == "now")})
    table = pd.DataFrame(rows).set_index(["profile", "GPUs", "cost"])
    print(f"paper profile budget: training step {args.step_s} s, whole-volume inference {args.infer_s} s "
          f"(estimates, not measured on a GPU)")
    print(table.to_markdown(floatfmt=".2f"))


if __name__ == "__main__":
    main()
