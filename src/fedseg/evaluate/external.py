"""The external evaluation on BTCV (docs/study.md, Experiments, item 8; Shen et al. 2022 §3.4, Table 3).

Coarse-to-fine inference follows Wang & Ma 2022.

Every method is scored on the original BTCV grid: sliding-window inference at the profile's spacing, the
prediction resampled back to the file's grid (`inference.to_original_grid`), then Dice, NSD and HD95 per
organ (`metrics.score_case`) against the BTCV labels mapped to liver, spleen, pancreas, kidney (right ∪ left).
Each model runs once per case; the methods are combinations of those passes:

- **FL global model**: the server's best model alone.
- **FL local model (ensemble)**: each channel from the local best of the client that owns it.
- **FL local model (processed)**: the ensemble, then the largest connected component per channel (both
  kidneys kept) and fusion in Shen et al. 2022's order (a later label overrides an earlier one).
- **SL (ensemble)** / **SL (processed)**: the standalone models combined the same way.
- **Central aggregation**: the one model trained on the pooled data.
- **... coarse-to-fine**: the processed FL local ensemble where a first stage finds the organs' box and the fine
  pass runs only there (Wang & Ma's two stages); timed against the full sliding window. The first stage is the
  run's localiser (02: a network of the same design trained on the pooled data at twice the voxel size) when the
  run has one; without it, the FL local models themselves at half resolution (which loses small organs). An organ
  the first stage does not find is segmented over the full window instead, and recorded per case and organ
  (`LOCALISER_COLUMNS`, 04's `metrics/btcv_localiser.csv`).

A BTCV case of the run whose files are missing under the data root stops the evaluation before any model is
loaded (`require_btcv_files`), naming every missing file and the fix.

Every prediction is written as a NIfTI label map (fused, values = channel index) beside the metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.data.datasets import present_datasets
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.data.layouts import case_files
from fedseg.evaluate import metrics
from fedseg.evaluate.evaluation import load_best
from fedseg.train import inference
from fedseg.train.training import LOCALISER_NAME, select_device

GLOBAL, LOCAL, LOCAL_PP = "FL global model", "FL local model (ensemble)", "FL local model (processed)"
SL, SL_PP, CENTRAL = "SL (ensemble)", "SL (processed)", "Central aggregation"
COARSE = f"{LOCAL_PP}, coarse-to-fine"
#: Methods in table order (those whose models a run lacks are skipped).
METHODS = (SL, SL_PP, CENTRAL, GLOBAL, LOCAL, LOCAL_PP)
#: Columns of `evaluate_btcv`'s tables (also when there is no BTCV case to fill them).
SCORE_COLUMNS = ("method", "case_id", "organ", "dice", "nsd", "hd95", "pred_empty", "truth_empty")
TIMING_COLUMNS = ("method", "case_id", "seconds", "fine_pass_coverage", "voxels")
#: Columns of the first stage's record (`metrics/btcv_localiser.csv`): per case and organ, whether coarse-to-fine's
#: first stage found it, and where the fine pass segmented it ("box", or "full" after a miss).
LOCALISER_COLUMNS = ("case_id", "organ", "found", "fine_window", "first_stage")


def slug(method: str) -> str:
    """A folder name for a method: lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")


#: The checkpoint group (`run_checkpoints`) whose models each method combines.
METHOD_GROUP: dict[str, str] = {SL: "sl", SL_PP: "sl", CENTRAL: "central", GLOBAL: "fl-global", LOCAL: "fl-local",
                                LOCAL_PP: "fl-local"}


def run_datasets(run_dir: str | Path) -> tuple[str, ...]:
    """The training datasets of a run: those its cases table (`data/cases.csv`, 01) holds, else all four."""
    cases_file = run_folder.cases_file(run_dir)
    if cases_file.exists():
        present = present_datasets(pd.read_csv(cases_file, usecols=["dataset"]), TRAIN_DATASETS)
        if present:
            return present
    return TRAIN_DATASETS


def group_checkpoints(run_dir: str | Path, datasets: tuple[str, ...] | None = None) -> dict[str, dict[str, Path]]:
    """Where a run keeps each group's best checkpoints, whether or not they exist (`run_folder.model_groups`), for
    `datasets`, default the run's training datasets (`run_datasets`: all four unless 01 used part of the data)."""
    return run_folder.model_groups(run_dir, run_datasets(run_dir) if datasets is None else tuple(datasets))


def run_checkpoints(run_dir: str | Path, datasets: tuple[str, ...] | None = None) -> dict[str, dict[str, Path]]:
    """The best checkpoints a run holds, grouped as `group_checkpoints` (`run_folder.trained_groups`: a client
    group counts only when every client, each of `datasets`, default the run's training datasets, has one)."""
    return run_folder.trained_groups(run_dir, run_datasets(run_dir) if datasets is None else tuple(datasets))


def load_group(cfg: dict[str, Any], paths: Mapping[str, Path], device: torch.device) -> dict[str, torch.nn.Module]:
    """The networks of one checkpoint group (name -> path, as `run_checkpoints`), ready for
    `inference.predict_logits`."""
    return {name: load_best(cfg, path, device) for name, path in paths.items()}


def load_localiser(run_dir: str | Path, cfg: dict[str, Any],
                   device: torch.device) -> tuple[dict[str, torch.nn.Module], float] | None:
    """The run's coarse-to-fine localiser (`training.fit_localiser`) and its voxel size over the profile's, or
    None when the run has none. Refuses a localiser trained for another voxel size or network than `cfg`'s."""
    folder = run_folder.model_dir(run_dir, LOCALISER_NAME)
    record = run_folder.localiser_record(run_dir)
    if record is None:
        return None
    if [float(s) for s in record["fine_spacing"]] != [float(s) for s in cfg["preprocess"]["spacing"]] \
            or record["model"] != cfg["model"]:
        raise ValueError(f"{folder} was trained for {record['fine_spacing']} mm voxels and network {record['model']}, "
                         f"not this run's {cfg['preprocess']['spacing']} mm and {cfg['model']}: retrain it (02) or "
                         "evaluate with coarse_to_fine=False.")
    coarse = {**cfg, "preprocess": {**cfg["preprocess"],
                                    "spacing": [float(s) * float(record["factor"]) for s in record["fine_spacing"]]}}
    return {LOCALISER_NAME: load_best(coarse, folder / run_folder.BEST, device)}, float(record["factor"])


def group_methods(groups: Mapping[str, Any]) -> list[str]:
    """The methods of `METHODS` that the checkpoint groups `groups` (`run_checkpoints`) can run, in table order."""
    return [m for m in METHODS if METHOD_GROUP[m] in groups]


def group_logits(group: str, models: Mapping[str, torch.nn.Module], image, cfg: dict[str, Any],
                 device: torch.device) -> torch.Tensor:
    """The (8, X, Y, Z) logits a checkpoint group (`load_group`) gives on a preprocessed image: a client group's
    ensemble (`inference.predict_ensemble`, one model's logits in memory at a time) or the one model's."""
    if group in ("sl", "fl-local"):
        return inference.predict_ensemble(models, image, cfg, device)
    return inference.predict_logits(models["model"], image, cfg, device)


def method_mask(method: str, logits: torch.Tensor, image, cfg) -> np.ndarray:
    """The (8, *original grid) bool mask of a method from its group's logits (`group_logits` of the method's
    `METHOD_GROUP`) on the preprocessed image `image` (`inference.inference_transform`) they were computed on.
    `inference.fuse` of it is the label map 04 writes."""
    mask = np.asarray(inference.to_original_grid(logits, image, cfg, logits=True))
    return inference.postprocess(mask) if method in (SL_PP, LOCAL_PP) else mask


def btcv_test_cases(cases: pd.DataFrame) -> pd.DataFrame:
    """The BTCV test rows of a cases table; an error naming the fix when there are none."""
    btcv = cases[(cases["dataset"] == "btcv") & (cases["split"] == "test")]
    if btcv.empty:
        raise ValueError("The cases table has no BTCV test cases: run 01_data_prep (BTCV must be under data_root).")
    return btcv


def missing_btcv_files(cfg: dict[str, Any], cases: pd.DataFrame) -> dict[str, list[Path]]:
    """The BTCV test cases of `cases` whose image or label is not under `cfg["data_root"]`: case id -> missing files."""
    missing = {}
    for _, row in cases[(cases["dataset"] == "btcv") & (cases["split"] == "test")].iterrows():
        lacking = [path for path in case_files(cfg["data_root"], row) if not path.is_file()]
        if lacking:
            missing[row["case_id"]] = lacking
    return missing


def require_btcv_files(cfg: dict[str, Any], cases: pd.DataFrame, run_dir: str | Path | None = None) -> None:
    """Refuse, before any model is loaded, to evaluate on BTCV when files of the run's BTCV test cases are not
    under `cfg["data_root"]`: one FileNotFoundError that lists every missing file and says the fix (put them back,
    point data_root at the folder 01 used, or rerun 01 declaring only the cases present with `datasets`/`cases`).

    Table 3 is a mean over the run's BTCV cases: scoring only those present would make it a number over other
    cases than the run's (and than another method's, or another run's), so 04 does not do it silently."""
    missing = missing_btcv_files(cfg, cases)
    if not missing:
        return
    files = [str(path) for paths in missing.values() for path in paths]
    shown = "".join(f"\n  {f}" for f in files[:10]) + (f"\n  ... and {len(files) - 10} more" if len(files) > 10 else "")
    btcv = cases[(cases["dataset"] == "btcv") & (cases["split"] == "test")]
    present = [c for c in btcv["case_id"] if c not in missing]
    fixes = []
    prepared = run_folder.data_summary(run_dir) if run_dir is not None else None
    if prepared is not None and prepared.exists():
        used = json.loads(prepared.read_text()).get("data_root")
        if used and Path(used) != Path(cfg["data_root"]):
            fixes.append(f"01 prepared this run from data_root={used}, but this evaluation reads "
                         f"data_root={cfg['data_root']}: pass data_root={used} (or leave it None)")
    if cfg.get("data", {}).get("source") == "synthetic":
        fixes.append("rerun 01_data_prep, which regenerates synthetic data that lacks files, then this notebook")
    else:
        fixes.append("put them back under data_root (BTCV's RawData.zip: fedseg.data.download.btcv_instructions)")
    datasets = ",".join(present_datasets(cases))
    if present:
        fixes.append(f"or evaluate on the {len(present)} BTCV case(s) present: rerun 01_data_prep with "
                     f"`-p datasets={datasets} -p cases={','.join(present)}` (with datasets declared, these ids "
                     "narrow BTCV only; add any case ids the run already declares), then 04")
    else:
        training = ",".join(present_datasets(cases, TRAIN_DATASETS))
        fixes.append(f"or run without BTCV: rerun 01_data_prep with `-p datasets={training}`, then 04 skips the "
                     "external evaluation")
    raise FileNotFoundError(
        f"{len(missing)} of the run's {len(btcv)} BTCV test cases ({', '.join(missing)}) have files missing under "
        f"{cfg['data_root']}:{shown}\nNo case was evaluated. Fix: " + "; ".join(fixes) + ".")


def figure_case(cfg: dict[str, Any], cases: pd.DataFrame, run_dir: str | Path,
                method: str = LOCAL_PP) -> tuple[str, Path, Path] | None:
    """For Fig. 3 (05): the first BTCV case (by id) whose CT is under `cfg["data_root"]` and whose `method` label map 04
    wrote, as (case id, CT path, prediction path); None, with a printed note saying why, when there is none (BTCV
    absent from the run, its files missing under data_root, or 04 not run)."""
    btcv = cases[cases["dataset"] == "btcv"].sort_values("case_id")
    if btcv.empty:
        print("BTCV is absent from this run's cases (01 did not use it): no Fig. 3.")
        return None
    for _, row in btcv.iterrows():
        image_path, _ = case_files(cfg["data_root"], row)
        prediction = run_folder.predictions_dir(run_dir, "btcv", slug(method), f"{row['case_id']}.nii.gz")
        if image_path.is_file() and prediction.is_file():
            return row["case_id"], image_path, prediction
    print(f"No BTCV case of this run has both its CT under {cfg['data_root']} and 04's {method} prediction under "
          f"{run_folder.predictions_dir(run_dir, 'btcv', slug(method))}: no Fig. 3 (run 04 with this run_dir and "
          "data_root first).")
    return None


def load_btcv_case(cfg: dict[str, Any], row: pd.Series, transform) -> tuple[Path, Any, dict[str, np.ndarray],
                                                                          tuple[float, ...]]:
    """One BTCV case: its image path, the image through `transform` (`inference.inference_transform`, kept
    invertible), the four organs' truth masks on the original grid, and that grid's spacing (mm)."""
    image_path, label_path = case_files(cfg["data_root"], row)
    label = nib.load(str(label_path))
    truth = inference.btcv_truth(np.asanyarray(label.dataobj))
    spacing = tuple(float(z) for z in label.header.get_zooms()[:3])
    return image_path, transform({"image": str(image_path)})["image"], truth, spacing


def evaluate_btcv(cfg: dict[str, Any], cases: pd.DataFrame, run_dir: str | Path,
                  tolerances: Mapping[str, float] | None = None, coarse_to_fine: bool = True,
                  coarse_factor: float = 2.0, margin_mm: float = 20.0, write: bool = True,
                  progress: bool = True) -> dict[str, pd.DataFrame]:
    """Score every method the run has models for on every BTCV case of `cases` (split test).

    Returns {"scores": per case and organ (method, case_id, organ, dice, nsd, hd95, pred_empty, truth_empty),
    "timing": per case and method (seconds of inference incl. inversion and post-processing, fraction of
    voxels the fine pass covered), "localiser": per case and organ, whether coarse-to-fine's first stage found
    it and where the fine pass segmented it (`LOCALISER_COLUMNS`; "full", the whole grid, after a miss)}.
    Predictions go to `<run_dir>/predictions/btcv/<method>/<case>.nii.gz`.
    Coarse-to-fine's first stage is the run's localiser when it has one (its own voxel factor replaces
    `coarse_factor`), else the FL local models at `coarse_factor` times the voxel size. The client groups are
    the models of the training datasets `cases` holds. Without BTCV in `cases` (a run on part of the data), it
    says so and returns the tables empty; a BTCV case of `cases` with files missing under the data root is
    refused up front (`require_btcv_files`), before any model is loaded.
    """
    run_dir = Path(run_dir)
    if not ((cases["dataset"] == "btcv") & (cases["split"] == "test")).any():
        print("BTCV is absent from this run's cases (01_data_prep did not use it: not declared, or not under "
              "data_root), so there is no external evaluation: the BTCV tables stay empty.")
        return {"scores": pd.DataFrame(columns=list(SCORE_COLUMNS)),
                "timing": pd.DataFrame(columns=list(TIMING_COLUMNS)),
                "localiser": pd.DataFrame(columns=list(LOCALISER_COLUMNS))}
    require_btcv_files(cfg, cases, run_dir)  # before any model: name every missing file at once
    run_folder.require_finished_federation(run_dir)  # never score the bests of a federation that failed half-way
    groups = run_checkpoints(run_dir, present_datasets(cases, TRAIN_DATASETS) or None)
    methods = group_methods(groups)
    if not methods:
        raise FileNotFoundError(f"No trained models under {run_folder.checkpoints_dir(run_dir)}: "
                                "run 02 and 03 with this run_dir.")
    btcv = btcv_test_cases(cases)
    device = select_device()
    models = {group: load_group(cfg, paths, device) for group, paths in groups.items()}
    transform = inference.inference_transform(cfg)
    localiser = load_localiser(run_dir, cfg, device) if coarse_to_fine else None
    coarse_models = None
    if localiser is not None:
        coarse_models, coarse_factor = localiser
    first_stage = LOCALISER_NAME if localiser is not None else f"fl-local models at 1/{coarse_factor:g} resolution"
    scores, timing, localised = [], [], []
    for _, row in tqdm(list(btcv.iterrows()), desc="BTCV cases", disable=not progress):
        image_path, image, truth, spacing = load_btcv_case(cfg, row, transform)
        # one group's logits at a time (a group's methods follow each other in METHODS), timed once per case
        group, logits, group_seconds = None, None, 0.0
        runs = [(m, None) for m in methods]
        if coarse_to_fine and "fl-local" in models:
            runs.append((COARSE, "fl-local"))
        for method, coarse_group in runs:
            if coarse_group:
                group, logits = None, None  # coarse-to-fine computes its own
            elif METHOD_GROUP[method] != group:
                group, logits = METHOD_GROUP[method], None  # the last group's logits freed first
                began = time.perf_counter()
                logits = group_logits(group, models[group], image, cfg, device)
                group_seconds = time.perf_counter() - began
            start = time.perf_counter()
            covered = 1.0
            if coarse_group:
                result = inference.coarse_to_fine_logits(models[coarse_group], image, cfg, device,
                                                         coarse_factor=coarse_factor, margin_mm=margin_mm,
                                                         coarse_models=coarse_models)
                mask = method_mask(LOCAL_PP, inference.ensemble_logits(result.logits), image, cfg)
                covered, model_seconds = result.covered, 0.0
                localised += [{"case_id": row["case_id"], "organ": organ, "found": found,
                               "fine_window": result.window(organ), "first_stage": first_stage}
                              for organ, found in result.organs.items()]
            else:
                mask = method_mask(method, logits, image, cfg)
                model_seconds = group_seconds
            fused = inference.fuse(mask)
            elapsed = time.perf_counter() - start + model_seconds
            if write:
                inference.write_prediction(fused, image_path,
                                           run_folder.predictions_dir(run_dir, "btcv", slug(method))
                                           / f"{row['case_id']}.nii.gz")
            predicted = inference.organ_masks(fused if method in (SL_PP, LOCAL_PP, COARSE) else mask)
            for item in metrics.score_case(predicted, truth, spacing, tolerances):
                scores.append({"method": method, "case_id": row["case_id"], **item})
            timing.append({"method": method, "case_id": row["case_id"], "seconds": round(elapsed, 3),
                           "fine_pass_coverage": round(covered, 3), "voxels": int(np.prod(fused.shape))})
    return {"scores": pd.DataFrame(scores, columns=list(SCORE_COLUMNS)),
            "timing": pd.DataFrame(timing, columns=list(TIMING_COLUMNS)),
            "localiser": pd.DataFrame(localised, columns=list(LOCALISER_COLUMNS))}


def fallback_cases(localiser: pd.DataFrame | None) -> dict[str, list[str]]:
    """The cases where coarse-to-fine's first stage missed an organ (`evaluate_btcv`'s "localiser" record): case id
    -> the organs the fine pass segmented over the full window instead of the box."""
    if localiser is None or localiser.empty:
        return {}
    missed = localiser[~localiser["found"].astype(bool)]
    return {case: list(group["organ"]) for case, group in missed.groupby("case_id", sort=False)}


def fallback_note(localiser: pd.DataFrame | None) -> str:
    """A sentence naming the cases whose organs the first stage missed ("" when it found every organ)."""
    cases = fallback_cases(localiser)
    if not cases:
        return ""
    listed = "; ".join(f"{case}: {', '.join(organs)}" for case, organs in cases.items())
    return (f"The first stage missed an organ in {len(cases)} case(s), segmented over the full window instead of the "
            f"box ({listed}); the fine pass coverage (mean) is over the other cases "
            "(metrics/btcv_localiser.csv).")


def speed_table(scores: pd.DataFrame, timing: pd.DataFrame,
                methods: tuple[str, ...] = (LOCAL_PP, COARSE), localiser: pd.DataFrame | None = None) -> pd.DataFrame:
    """Full sliding window vs coarse-to-fine, side by side: seconds per case (mean, max), the fraction of
    the volume the fine pass covered, and mean Dice per organ and over the organs.

    With the first stage's record (`localiser`, `evaluate_btcv`'s) showing an organ missed, coarse-to-fine's
    coverage is the mean over the cases where the first stage found every organ (the others also ran a
    full-window pass), and two columns count the cases with a fallback and the organs it took; when the first
    stage found every organ, the table is the one without the record."""
    fallbacks = fallback_cases(localiser)
    rows = {}
    for method in methods:
        times, dice = timing[timing["method"] == method], scores[scores["method"] == method]
        if times.empty:
            continue
        per_organ = dice.groupby("organ", sort=False)["dice"].mean()
        coverage = times["fine_pass_coverage"]
        if fallbacks and method == COARSE:
            coverage = coverage[~times["case_id"].isin(list(fallbacks))]
        rows[method] = {"cases": len(times), "seconds per case (mean)": times["seconds"].mean(),
                        "seconds per case (max)": times["seconds"].max(),
                        "fine pass coverage (mean)": coverage.mean(),
                        **{f"Dice {organ}": value for organ, value in per_organ.items()},
                        "Dice (mean of organs)": per_organ.mean()}
        if fallbacks:
            fell_back = [organs for case, organs in fallbacks.items() if method == COARSE
                         and case in set(times["case_id"])]
            counts = pd.Series([organ for organs in fell_back for organ in organs], dtype=object).value_counts()
            rows[method] |= {"cases with a full-window fallback": len(fell_back),
                             "organs over the full window": ", ".join(f"{o} ({n})" for o, n in counts.items())}
    return pd.DataFrame.from_dict(rows, orient="index").round(3)
