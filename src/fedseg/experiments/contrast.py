"""FedGIN's cross-contrast experiment (Nagaraju et al. 2025; docs/study.md, Experiments, item 6) on the synthetic data.

Some clients hold MRI-like data (the phantom's `data.phantom.mri_like`, default liver and spleen), the others
CT. The federation runs with and without GIN augmentation (`fedgin` vs `fedavg`), and every model is then
tested on every dataset's test cases in **both** contrasts: the same cases generated once all CT and once all
MRI-like (the phantom draws a case's anatomy before its intensities, so only the contrast differs; the labels
are checked to be identical). A channel is "in contrast" when tested in the contrast its owning client trained
on and "cross contrast" otherwise: a CT client's pancreas on MRI-like images has only the MRI-like clients'
images to have learned MRI from, and those never label the pancreas.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from fedseg.config import synthetic_data_root
from fedseg.data.datasets import obtain_data
from fedseg.data.labels import CHANNELS, TRAIN_DATASETS, owned_channels
from fedseg.data.layouts import case_files
from fedseg.data.transforms import CT, MRI
from fedseg.evaluate.evaluation import score_test_splits

DEFAULT_MRI_LIKE = ("liver", "spleen")
CONTRAST_NAMES = {CT: "CT", MRI: "MRI-like"}
NOTE = ("Dice (%) on the test cases of each channel's dataset, generated in both contrasts (same anatomy); mean over "
        "cases, then the unweighted mean over the channels of each group. SL and FL local: each dataset's own model "
        "on its own channels; FL global: the server's best model on every channel.")


def column(channel: str, contrast: str) -> str:
    """The `channel_table` column of a channel tested in a contrast, e.g. "liver tumor (MRI-like)"."""
    return f"{channel.replace('_', ' ')} ({CONTRAST_NAMES[contrast]})"


def contrast_profile(profile: Mapping[str, Any], mri_like: Sequence[str]) -> dict[str, Any]:
    """`profile` with `mri_like` datasets in the MRI-like contrast, named `<name>-mri`."""
    unknown = sorted(set(mri_like) - set(TRAIN_DATASETS))
    if not mri_like or unknown or set(mri_like) == set(TRAIN_DATASETS):
        raise ValueError(f"mri_like={list(mri_like)}: name one to three of {', '.join(TRAIN_DATASETS)} "
                         "(some clients MRI-like, some CT).")
    out = copy.deepcopy(dict(profile))
    out["name"] = f"{profile['name']}-mri"
    out["data"]["phantom"]["mri_like"] = sorted(mri_like)
    return out


def test_roots(profile: Mapping[str, Any], seed: int, progress: bool = True) -> dict[str, Path]:
    """The data roots holding every case in one contrast: {CT: all CT, MRI: all MRI-like}, generated if missing.
    The all-CT root is the base profile's own synthetic data."""
    roots = {}
    for contrast, mri_like in ((CT, []), (MRI, list(TRAIN_DATASETS))):
        variant = copy.deepcopy(dict(profile))
        variant["name"] = profile["name"].removesuffix("-mri")
        variant["data"]["phantom"]["mri_like"] = mri_like
        root = synthetic_data_root(variant, seed)
        roots[contrast] = obtain_data({**variant, "seed": seed, "data_root": str(root)}, progress=progress)
    return roots


def check_same_cases(cases: pd.DataFrame, roots: Mapping[str, Path]) -> None:
    """Every test case of `cases` exists with identical labels in every root (the contrasts differ, not the anatomy)."""
    tests = cases[(cases["split"] == "test") & cases["dataset"].isin(TRAIN_DATASETS)]
    for _, row in tests.iterrows():
        labels = []
        for contrast, root in roots.items():
            _, label = case_files(root, row)
            if not label.exists():
                raise FileNotFoundError(f"{label} is missing: the {CONTRAST_NAMES.get(contrast, contrast)} test root "
                                        f"does not hold {row['case_id']}; regenerate it with the run's profile "
                                        "(phantom settings).")
            labels.append(np.asanyarray(nib.load(str(label)).dataobj))
        if any(not np.array_equal(labels[0], other) for other in labels[1:]):
            raise ValueError(f"{row['case_id']} has different labels in the two contrasts' roots: they were generated "
                             "with different phantom settings or seeds.")


def score_contrasts(cfg: dict[str, Any], cases: pd.DataFrame, checkpoints: Mapping[str, Path],
                    roots: Mapping[str, Path], progress: bool = True) -> pd.DataFrame:
    """`evaluation.score_test_splits` of every checkpoint (trained under `cfg`) on the test splits of each
    contrast's root. Long form: model, dataset, case_id, channel, dice, contrast."""
    frames = [score_test_splits({**cfg, "data_root": str(root)}, dict(checkpoints), cases, TRAIN_DATASETS,
                                progress=progress, trained=cfg).assign(contrast=contrast)
              for contrast, root in roots.items()]
    return pd.concat(frames, ignore_index=True)


def channel_table(scores: pd.DataFrame, rows: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """Dice % per channel and test contrast for each row; `rows[row][dataset]` is the model scored on that
    dataset's channels (its own SL or local model, or one global model for all). Columns "<channel> (<contrast>)"."""
    out = {}
    for row, model_of in rows.items():
        parts = [scores[(scores["model"] == model) & (scores["dataset"] == dataset)]
                 for dataset, model in model_of.items()]
        means = pd.concat(parts).groupby(["contrast", "channel"])["dice"].mean()
        out[row] = {column(c, k): 100 * means.get((k, c), np.nan) for k in (CT, MRI) for c in CHANNELS[1:]}
    return pd.DataFrame.from_dict(out, orient="index").round(1)


def contrast_summary(channels: pd.DataFrame, mri_like: Sequence[str]) -> pd.DataFrame:
    """Per row of `channel_table`: the mean over the channels of the CT clients and of the MRI-like clients,
    each tested in its own contrast and in the other one, and the in/cross-contrast means over all channels."""
    groups = {CT: [c for d in TRAIN_DATASETS if d not in mri_like for c in owned_channels(d)],
              MRI: [c for d in mri_like for c in owned_channels(d)]}
    other = {CT: MRI, MRI: CT}
    out = {}
    for row, values in channels.iterrows():
        def dice(chs: list[str], contrast: str) -> list[float]:
            return [values[column(c, contrast)] for c in chs]

        cells = {}
        for trained, chs in groups.items():
            name = CONTRAST_NAMES[trained]
            cells[f"{name} clients' channels on {name}"] = np.nanmean(dice(chs, trained))
            cells[f"{name} clients' channels on {CONTRAST_NAMES[other[trained]]}"] = np.nanmean(
                dice(chs, other[trained]))
        cells["in contrast (all channels)"] = np.nanmean(dice(groups[CT], CT) + dice(groups[MRI], MRI))
        cells["cross contrast (all channels)"] = np.nanmean(dice(groups[CT], MRI) + dice(groups[MRI], CT))
        out[row] = cells
    return pd.DataFrame.from_dict(out, orient="index").round(1)


def contrast_figure(channels: pd.DataFrame, mri_like: Sequence[str]):
    """Dice per channel for each row, tested on CT (left) and MRI-like (right); MRI-like clients' channels shaded."""
    import matplotlib.pyplot as plt

    channels_of_mri = {c for d in mri_like for c in owned_channels(d)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), sharey=True)
    width = 0.8 / len(channels)
    for ax, contrast in zip(axes, (CT, MRI)):
        for i, channel in enumerate(CHANNELS[1:]):
            if channel in channels_of_mri:
                ax.axvspan(i - 0.45, i + 0.45, color="tab:purple", alpha=0.08, lw=0)
        for k, (row, values) in enumerate(channels.iterrows()):
            x = np.arange(len(CHANNELS) - 1) + (k - (len(channels) - 1) / 2) * width
            ax.bar(x, [values[column(c, contrast)] for c in CHANNELS[1:]], width, label=row)
        ax.set_xticks(np.arange(len(CHANNELS) - 1), [c.replace("_", " ") for c in CHANNELS[1:]],
                      rotation=30, ha="right")
        ax.set_title(f"tested on {CONTRAST_NAMES[contrast]} (shaded: channels of the MRI-like clients)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice (%)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
