"""Inference and metrics on the test splits: each trained model scored on every task's test cases.

Scores are Dice per case and per channel the case's dataset owns (sigmoid > 0.5, MONAI's DiceMetric),
computed on the preprocessed grid of the profile (sliding-window inference, MONAI). Scoring on the
original grid, ensembles and post-processing for BTCV are in `fedseg.evaluate.external`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.data.transforms import IMAGE, LABEL, case_records, evaluation_dataset
from fedseg.train.inference import predict_logits
from fedseg.train.models import build_network, load_weights
from fedseg.train.training import StaleCheckpointError, check_answers_for, select_device, validate


def trained_network(cfg: dict[str, Any], checkpoint: str | Path, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The network a checkpoint was trained as: the one its own settings record (checkpoints carry them), else
    for an older federation checkpoint (`checkpoints/fl-*/`) the one in `<run_dir>/fl/config.json` (SegViz
    trains its own), else the profile's `model`."""
    if saved is None:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    recorded_settings = saved.get("settings") or {}
    if recorded_settings.get("model"):
        return dict(recorded_settings["model"])
    run_dir = run_folder.run_dir_of(checkpoint)
    federated = run_dir is not None and Path(checkpoint).parent.name.startswith("fl-")
    federation = run_folder.federation_config(run_dir) if federated else None
    return federation["model"] if federation else cfg["model"]


def check_federation(checkpoint: str | Path, saved: dict[str, Any]) -> None:
    """A federation's checkpoint (`checkpoints/fl-*/`) answers for its run only if the run's federation wrote it:
    its `federation_id` must be that of the run's finished federation (`fl/summary.json`). A local best left by an
    earlier federation in the same folder (e.g. a site the new one does not have) is refused, naming the fix."""
    run_dir = run_folder.run_dir_of(checkpoint)
    if run_dir is None or not Path(checkpoint).parent.name.startswith("fl-"):
        return
    expected = run_folder.federation_id(run_dir)
    if expected and saved.get("federation_id") != expected:
        raise StaleCheckpointError(
            f"{checkpoint} was written by federation {saved.get('federation_id')!r}, not by this run's "
            f"{expected!r} ({run_folder.fl_summary(run_dir)}): it is an earlier federation's model. Rerun 03 into "
            "this folder (--only 03 --overwrite) or delete that checkpoint folder.")


def load_best(cfg: dict[str, Any], checkpoint: str | Path, device: torch.device | None = None, *,
              trained: dict[str, Any] | None = None) -> torch.nn.Module:
    """The network of a `best.pt` checkpoint (`trained_network`) with its weights, ready for inference; refused
    when it was trained on other data or preprocessing than the run it answers for (`training.check_answers_for`):
    `trained`, the configuration it must have been trained under, default `cfg` (an experiment that tests models on
    other data on purpose passes the training run's configuration here and the test data's as `cfg`)."""
    device = device or select_device()
    saved = torch.load(checkpoint, map_location=device, weights_only=False)
    check_answers_for(checkpoint, saved, trained if trained is not None else cfg)
    check_federation(checkpoint, saved)
    model = build_network(**trained_network(cfg, checkpoint, saved))
    load_weights(model, saved["model"])
    return model.to(device).eval()


def score_test_splits(cfg: dict[str, Any], checkpoints: dict[str, str | Path], cases: pd.DataFrame,
                datasets: tuple[str, ...], progress: bool = True, *,
                trained: dict[str, Any] | None = None) -> pd.DataFrame:
    """Dice of every model (name -> best.pt) on the test split of every dataset in `datasets` of `cfg`'s data root;
    `trained`: the configuration the models were trained under when that is another data root (`load_best`).

    Long form: model, dataset, case_id, channel, dice (NaN where the case has none of that channel).
    """
    device = select_device()
    tests = cases[(cases["split"] == "test") & cases["dataset"].isin(datasets)]
    records = case_records(cfg["data_root"], tests)
    volumes = evaluation_dataset(cfg, records)
    frames = []
    for name, checkpoint in tqdm(checkpoints.items(), desc="test splits", disable=not progress):
        scores = validate(load_best(cfg, checkpoint, device, trained=trained), volumes, records, cfg, device)
        frames.append(scores.assign(model=name))
    columns = ["model", "dataset", "case_id", "channel", "dice"]
    return pd.concat(frames, ignore_index=True)[columns]


def channel_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model, dataset and channel: mean and std Dice over the cases that have the channel, and counts."""
    grouped = scores.groupby(["model", "dataset", "channel"], sort=False)["dice"]
    return grouped.agg(mean="mean", std="std", cases_scored="count", cases="size").reset_index()


@torch.no_grad()
def test_case_panels(cfg: dict[str, Any], cases: pd.DataFrame, models_of: dict[str, dict[str, str | Path]],
                     datasets: tuple[str, ...], case_index: int = 0) -> dict[str, dict[str, Any]]:
    """For Fig. 4: per task, one test case (preprocessed, RAS) with each named model's prediction on it.

    `models_of[name][task]` is the checkpoint model `name` uses on `task` (e.g. "SL" -> sl-<task>/best.pt,
    "FL global" -> the same global best for every task). Masks are sigmoid > 0.5 of sliding-window logits.
    """
    device = select_device()
    loaded: dict[str, torch.nn.Module] = {}
    panels = {}
    for task in datasets:
        tests = cases[(cases["dataset"] == task) & (cases["split"] == "test")].sort_values("case_id")
        if tests.empty:
            continue
        records = case_records(cfg["data_root"], tests.iloc[[min(case_index, len(tests) - 1)]])
        case = evaluation_dataset(cfg, records)[0]
        image = torch.as_tensor(case[IMAGE])
        predictions = {}
        for name, paths in models_of.items():
            path = str(paths[task])
            if path not in loaded:
                loaded[path] = load_best(cfg, path, device)
            logits = predict_logits(loaded[path], image, cfg, device)
            predictions[name] = (torch.sigmoid(logits) > 0.5).numpy()
        panels[task] = {"image": np.asarray(case[IMAGE][0]), "truth": np.asarray(case[LABEL]),
                        "predictions": predictions, "case_id": records[0]["case_id"]}
    return panels
