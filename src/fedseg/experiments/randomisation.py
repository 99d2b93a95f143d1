"""Domain randomisation, measured by a proxy the project can compute (docs/phantom.md, "Domain randomisation").

Whether models trained only on phantoms segment real CT is checked outside the project, on real scans kept
aside. What the project can measure is the same question one step removed: does training on randomised
images make a model robust to images it has not seen? Each training dataset's standalone model is trained
twice with the same budget and seed, once on the CT-realistic phantom (`default`) and once on the randomised
phantom with MONAI's intensity augmentation (`randomised`: `data.phantom.domain: randomised`,
`preprocess.domain_augment`). Both are tested on the same test cases generated three times: realistic CT
(the training scanner), `other scanner` (the other contrast phase, a softer kernel, more noise, another
calibration) and `MRI-like` (FedGIN's contrast). The anatomy and labels of a case are the same in every
domain; only the image changes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedseg.config import synthetic_data_root
from fedseg.data.datasets import check_data, obtain_data
from fedseg.data.labels import TRAIN_DATASETS, owned_channels
from fedseg.data.transforms import build_cache, case_records
from fedseg.evaluate.evaluation import score_test_splits
from fedseg.train.training import fit_models

#: The training augmentation of the randomised regime (`transforms.domain_augmentation`).
DEFAULT_AUGMENT: dict[str, Any] = {"prob": 0.3}
#: The test domains: phantom settings of the same test cases.
TEST_DOMAINS: dict[str, dict[str, Any]] = {
    "CT": {"domain": "ct", "mri_like": []},
    "other scanner": {"domain": "other_scanner", "mri_like": []},
    "MRI-like": {"domain": "ct", "mri_like": list(TRAIN_DATASETS)},
}
REGIMES = ("default", "randomised")
NOTE = ("Dice (%) of each dataset's standalone model on its organ, mean over the test cases; both regimes trained "
        "with the same steps, seed and network; rows: how the training images were made; columns: the test "
        "images (the same cases and labels, imaged three ways).")


def randomised_profile(profile: Mapping[str, Any], augment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`profile` trained on randomised phantoms with domain augmentation, named `<name>-randomised`."""
    out = copy.deepcopy(dict(profile))
    out["name"] = f"{profile['name']}-randomised"
    out["data"]["phantom"]["domain"] = "randomised"
    out["preprocess"]["domain_augment"] = dict(augment or DEFAULT_AUGMENT)
    return out


def _with_phantom(profile: Mapping[str, Any], **phantom: Any) -> dict[str, Any]:
    out = copy.deepcopy(dict(profile))
    out["data"]["phantom"].update(phantom)
    return out


def prepare(profile: Mapping[str, Any], seed: int, datasets: Sequence[str],
            progress: bool = True) -> tuple[dict[str, Any], pd.DataFrame]:
    """The profile's synthetic data (generated if missing), checked and cached: (cfg, the cases)."""
    cfg = {**copy.deepcopy(dict(profile)), "seed": int(seed)}
    cfg["data_root"] = str(synthetic_data_root(cfg, seed).resolve())
    obtain_data(cfg, progress=progress)
    cases = check_data(cfg["data_root"], datasets=",".join(datasets), progress=progress).cases
    build_cache(cfg, case_records(cfg["data_root"], cases), progress=progress)
    return cfg, cases


def train(profile: Mapping[str, Any], seed: int, run_dir: str | Path, datasets: Sequence[str] = TRAIN_DATASETS,
          steps: int | None = None, progress: bool = True) -> dict[str, dict[str, Path]]:
    """Each dataset's standalone model in both regimes, into `run_dir/<regime>/`: {regime: {dataset: best.pt}}."""
    out = {}
    for regime, variant in (("default", dict(profile)), ("randomised", randomised_profile(profile))):
        cfg, cases = prepare(variant, seed, datasets, progress)
        jobs = {}
        for dataset in datasets:
            rows = cases[cases["dataset"] == dataset]
            jobs[dataset] = (case_records(cfg["data_root"], rows[rows["split"] == "train"]),
                             case_records(cfg["data_root"], rows[rows["split"] == "val"]),
                             int(steps or cfg["train"]["steps"]))
        fitted = fit_models(cfg, jobs, Path(run_dir) / regime, progress=progress)
        out[regime] = {dataset: Path(done["best"]) for dataset, done in fitted.items()}
    return out


def score(profile: Mapping[str, Any], seed: int, checkpoints: Mapping[str, Mapping[str, Path]],
          datasets: Sequence[str] = TRAIN_DATASETS, progress: bool = True) -> pd.DataFrame:
    """Every regime's models on every test domain. Long form: regime, test, model, dataset, case_id, channel, dice
    (each model on its own dataset's test split)."""
    frames = []
    for test, phantom in TEST_DOMAINS.items():
        cfg, cases = prepare(_with_phantom(profile, **phantom), seed, datasets, progress)
        for regime, models in checkpoints.items():
            for dataset, best in models.items():
                scores = score_test_splits(cfg, {dataset: best}, cases, (dataset,), progress=False)
                frames.append(scores.assign(regime=regime, test=test))
    return pd.concat(frames, ignore_index=True)


def organ_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Dice % of each organ (rows: regime and organ, plus each regime's mean over organs) per test domain."""
    organs = scores[scores["channel"].isin([owned_channels(d)[0] for d in TRAIN_DATASETS])]
    table = organs.groupby(["regime", "channel", "test"])["dice"].mean().unstack("test") * 100
    table = table[[t for t in TEST_DOMAINS if t in table.columns]]
    means = table.groupby(level="regime").mean()
    means.index = pd.MultiIndex.from_tuples([(r, "mean over organs") for r in means.index])
    out = pd.concat([table, means]).sort_index(level=0, sort_remaining=False)
    out.index = out.index.set_names(["trained on", "organ"])
    return out.round(1)


def gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per regime: the drop (Dice points) from the training scanner's CT to each unseen domain, organ means."""
    means = table.xs("mean over organs", level=1)
    return pd.DataFrame({f"CT -> {t}": means["CT"] - means[t] for t in means.columns if t != "CT"}).round(1)
