"""Validation: sliding-window inference on whole preprocessed volumes, sigmoid > 0.5, Dice per channel the case's
dataset owns.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from monai.data import PersistentDataset
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric

from fedseg.data.labels import CHANNELS
from fedseg.data.transforms import (
    IMAGE,
    LABEL,
)
from fedseg.train.training.runtime import (
    autocast,
)
from fedseg.train.training.settings import TrainingSettings


def predictor(model: torch.nn.Module, task: str | None) -> Callable:
    """The callable sliding-window inference runs: the model, or one task block of a SegViz network."""
    return functools.partial(model, task=task) if task else model


@torch.no_grad()
def validate(model: torch.nn.Module, volumes: PersistentDataset, records: list[dict[str, Any]],
             cfg: TrainingSettings | Mapping[str, Any], device: torch.device, task: str | None = None) -> pd.DataFrame:
    """Dice per case and owned channel (sigmoid > 0.5), from sliding-window inference on whole volumes, under a
    training's settings (`TrainingSettings`, or a resolved configuration's): the patch size, the sliding window's
    batch and overlap, mixed precision.

    Returns long-form rows: dataset, case_id, channel, dice (NaN where the case has none of that channel).
    """
    model.eval()
    settings = TrainingSettings.of(cfg)
    train = settings.train
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    rows = []
    for index, record in enumerate(records):
        case = volumes[index]
        image = torch.as_tensor(case[IMAGE])[None].to(device)
        with autocast(device, train):
            logits = sliding_window_inference(image, settings.preprocess.patch_size, train.sw_batch_size,
                                              predictor(model, task), overlap=train.sw_overlap)
        prediction = (torch.sigmoid(logits.float()) > 0.5).cpu()
        target = torch.as_tensor(case[LABEL])[None]
        dice = metric(prediction, target)[0]
        for channel in np.flatnonzero(np.asarray(record["owned"])):
            rows.append({"dataset": record["dataset"], "case_id": record["case_id"],
                         "channel": CHANNELS[channel], "dice": float(dice[channel])})
    model.train()
    return pd.DataFrame(rows, columns=["dataset", "case_id", "channel", "dice"])


def channel_means(scores: pd.DataFrame) -> pd.Series:
    """Mean Dice per channel over the cases that have it (NaN cases, i.e. channel absent, left out)."""
    return scores.groupby("channel", sort=False)["dice"].mean()
