"""Builders shared by more than one test module: tiny data, configurations, models and fake Flower messages.

Test modules import them with `from helpers import ...` (pytest puts tests/ on sys.path; the subprocess scripts of
test_methods.py and test_training.py put it there themselves). No test module imports from another.

Tiny data (24^3 voxels of VOXEL mm, written as NIfTI):
- `make_data(root, counts, seed)`: liver and spleen cases in their MSD layouts (LAYOUT) and their case table
  (dataset, case_id, image, label, split): a bright sphere (organ), for liver with a dark core (tumour). A
  federation's data.
- `make_records(root, count, seed)`: liver-dataset cases (the same spheres) as training records (image and label
  paths, dataset, case_id, split, owned channels). One model's data.
- `write_case(root, affine, shape)`: one liver-dataset case (an off-centre ellipsoid with a tumour) stored on the grid
  `affine`, and its label array; `AFFINES` are two non-RAS, anisotropic grids for it (LAS, and a permuted PRI).

Configurations (hand-written dicts, not derived from the smoke profile: that would add settings the code reads,
e.g. `train.loss_options.batch`, which changes the loss):
- `federation_config(data_root, rounds, local_steps)`: a two-client federation's profile (UNet 8-16 whose last layer
  gives the logits, masked Dice, constant lr, 16^3 patches, `federated` section).
- `training_config(root, steps)`: one model's training profile (UNet 8-16 with residual units, cosine schedule,
  two cases a step; no `federated` section).
- `inference_config(spacing, patch)`: the preprocessing and sliding-window settings inference reads.

Models:
- `new_model(cfg)`: the network of `cfg["model"]`, initialised under `cfg["seed"]`.

Fake Flower messages, built as Flower builds them:
- `metadata(node_id, kind)`: a reply's metadata (its src_node_id is the client's node).
- `reply(node_id, dataset, arrays, num_examples, kind, **values)`: a client's train/evaluate/query reply.
- `error_reply(node_id, reason, kind)`: a client's error reply.
- `client_message(cfg, kind, server_round, federation)`: the server's train or evaluate message to a client (random
  weights under seed 0), and the model it carries.
- `client_context(cfg, run_dir, cases, node_config)`: a client's Context, with the run_config of a simulated liver and
  spleen federation (its case table written where that run_config says).
"""

import time

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedseg.config import merge_profile
from fedseg.data.labels import TRAIN_DATASETS, owned_mask
from fedseg.federated import task
from fedseg.federated.simulation import federation_run_config
from fedseg.train.models import build_network

VOXEL = 2.0
SIZE = 24
LAYOUT = {"liver": "Task03_Liver", "spleen": "Task09_Spleen"}

#: Non-RAS, anisotropic storage grids: LAS (x flipped) and a permuted one (storage axes P, R, I).
AFFINES = {
    "LAS": np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]]),
    "PRI": np.array([[0, 0.9, 0, -15.0], [-2.5, 0, 0, 40.0], [0, 0, -0.7, 12.0], [0, 0, 0, 1]]),
}


# --------------------------------------------------------------------------------------------------
# Tiny data
# --------------------------------------------------------------------------------------------------

def make_data(root, counts=None, seed=0):
    """Cases of each dataset (train, val): a bright sphere (organ), for liver with a dark core (tumour)."""
    counts = counts or {"liver": (2, 1), "spleen": (2, 1)}
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    rows = []
    for dataset, (n_train, n_val) in counts.items():
        folder = root / LAYOUT[dataset]
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_val):
            centre = rng.uniform(9, 15, size=3)
            distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
            label = (distance < 6).astype(np.uint8)
            if dataset == "liver":
                label += (distance < 2.5).astype(np.uint8)
            image = np.where(label == 1, 150, np.where(label == 2, 40, -100)) + rng.normal(0, 10, label.shape)
            case = f"{dataset}_{i}"
            affine = np.diag([VOXEL] * 3 + [1.0])
            nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(folder / "imagesTr" / f"{case}.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"{case}.nii.gz"))
            rows.append({"dataset": dataset, "case_id": case, "image": f"imagesTr/{case}.nii.gz",
                         "label": f"labelsTr/{case}.nii.gz", "split": "train" if i < n_train else "val"})
    return pd.DataFrame(rows)


def make_records(root, count=3, seed=0):
    """Liver-dataset cases of 24^3 voxels: a bright sphere (liver) with a darker core (tumour)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"))
    records = []
    for i in range(count):
        centre = rng.uniform(9, 15, size=3)
        distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        label = (distance < 6).astype(np.uint8) + (distance < 2.5).astype(np.uint8)
        image = np.where(label == 1, 150, np.where(label == 2, 40, -100)) + rng.normal(0, 10, label.shape)
        affine = np.diag([VOXEL] * 3 + [1.0])
        paths = [root / f"img{i}.nii.gz", root / f"lab{i}.nii.gz"]
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(paths[0]))
        nib.save(nib.Nifti1Image(label, affine), str(paths[1]))
        records.append({"image": str(paths[0]), "label": str(paths[1]), "dataset": "liver",
                        "case_id": f"liver_{i}", "split": "train", "owned": owned_mask("liver").astype(np.uint8)})
    return records


def write_case(root, affine, shape=(44, 40, 16)):
    """A liver-dataset case: an off-centre ellipsoid (liver, HU 150) with a tumour (2, HU 40) at one end."""
    world = nib.affines.apply_affine(affine, np.stack(np.indices(shape), -1))
    centre = nib.affines.apply_affine(affine, np.array(shape) * [0.35, 0.4, 0.45])
    offset = (world - centre) / [11.0, 8.0, 9.0]
    label = (np.sqrt((offset**2).sum(-1)) < 1).astype(np.uint8)
    label[(np.sqrt(((world - centre - [5.0, 0, 0]) ** 2).sum(-1)) < 4.5) & (label == 1)] = 2
    image = np.where(label == 1, 150, np.where(label == 2, 40, -100)).astype(np.int16)
    paths = {"image": root / "img.nii.gz", "label": root / "lab.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), str(paths["image"]))
    nib.save(nib.Nifti1Image(label, affine), str(paths["label"]))
    return paths, label


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------

#: Where the tiny profiles differ from the base's training settings besides their budgets: per-sample Dice, a
#: validation interval instead of a count, one model at a time.
SMALL_TRAIN = {"loss_options": {}, "validations": None, "parallel_models": None}


def federation_config(data_root, rounds=2, local_steps=2):
    """A two-client federation's profile on `make_data`'s cases (its differences from the base profile)."""
    return merge_profile({
        "name": "tiny", "seed": 0, "data_root": str(data_root),
        "preprocess": {"spacing": [VOXEL] * 3, "hu_window": [-500, 500], "patch_size": [16, 16, 16],
                       "patch_sampling": "posneg", "patches_per_volume": 2, "num_workers": 0,
                       "intensity_shift": {"prob": 0.8, "offset": 0.1}, "in_memory": False},
        # num_res_units 0: the last layer gives the logits, so ownerfedavg runs and the dilution is measured
        "model": {"name": "UNet", "channels": [8, 16], "strides": [2], "num_res_units": 0},
        "train": {"loss": "masked_dice", "optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0,
                  "schedule": "constant", "cases_per_step": 1, "steps": 4, "val_every": 2,
                  "checkpoint_every": 2, "sw_batch_size": 2, "sw_overlap": 0.25, "amp": True, **SMALL_TRAIN},
        "federated": {"rounds": rounds, "local_steps": local_steps, "client_cpus": 1, "client_gpus": 0.0},
    }, "tests.helpers.federation_config")


def training_config(root, steps=12):
    """One model's training profile on `make_records`' cases (its differences from the base profile)."""
    return merge_profile({
        "seed": 0, "data_root": str(root),
        "preprocess": {"spacing": [VOXEL] * 3, "hu_window": [-500, 500], "patch_size": [16, 16, 16],
                       "patch_sampling": "posneg", "patches_per_volume": 2, "num_workers": 0,
                       "intensity_shift": {"prob": 0.8, "offset": 0.1}, "in_memory": False},
        "model": {"name": "UNet", "channels": [8, 16], "strides": [2], "num_res_units": 1},
        "train": {"loss": "masked_dice", "optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0,
                  "schedule": "cosine", "cases_per_step": 2, "steps": steps, "val_every": 4,
                  "checkpoint_every": 2, "sw_batch_size": 2, "sw_overlap": 0.25, "amp": True, **SMALL_TRAIN},
    }, "tests.helpers.training_config")


def inference_config(spacing=1.5, patch=16):
    """The preprocessing and sliding-window settings whole-volume inference reads."""
    return merge_profile({
        "preprocess": {"spacing": [spacing] * 3, "hu_window": [-500, 500], "patch_size": [patch] * 3},
        "train": {"sw_batch_size": 2, "sw_overlap": 0.25, "amp": True},
    }, "tests.helpers.inference_config")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def new_model(cfg):
    """The network of `cfg["model"]`, initialised under `cfg["seed"]`."""
    torch.manual_seed(cfg["seed"])
    return build_network(**cfg["model"])


# --------------------------------------------------------------------------------------------------
# Fake Flower messages and contexts
# --------------------------------------------------------------------------------------------------

def metadata(node_id, kind):
    """A reply's metadata, as Flower builds it: its src_node_id is the client's node."""
    return Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)


def reply(node_id, dataset, arrays=None, num_examples=1, kind="train", **values):
    """A client's reply: its dataset's identity, num-examples, scalar metrics (per-channel NaN unless given)."""
    metrics = {"num-examples": num_examples, "partition-id": TRAIN_DATASETS.index(dataset),
               "dataset-index": TRAIN_DATASETS.index(dataset), "mean-dice": 0.5,
               **task.channel_dice({}), **values}
    if kind == "train":
        metrics.setdefault("train-loss", 1.0)
        metrics.setdefault("local-best-updated", 1)
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: v for k, v in arrays.items()})
    return Message(content=RecordDict(content), metadata=metadata(node_id, kind))


def error_reply(node_id, reason, kind="train"):
    """A client's error reply (code 2) with `reason`."""
    return Message(error=Error(code=2, reason=reason), metadata=metadata(node_id, kind))


def client_message(cfg, kind, server_round=1, federation="fed-A"):
    """A train or evaluate message of the server's round `server_round` of federation `federation`."""
    torch.manual_seed(0)
    model = build_network(**cfg["model"])
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round, task.FEDERATION_KEY: federation})})
    meta = Metadata(run_id=1, message_id="in", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=meta), model


def client_context(cfg, run_dir, cases, node_config):
    """A client's Context with the run_config a simulated federation of liver and spleen gives it."""
    run_config = federation_run_config(cfg, run_dir, clients=("liver", "spleen"))
    cases.to_csv(run_config["cases"], index=False)
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)
