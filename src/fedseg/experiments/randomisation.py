"""Training options measured across contrast phases and scanners, by a proxy the project can compute
(docs/phantom.md, "The proxy: which training holds up across phases and scanners?").

Whether models trained only on phantoms segment real CT is checked outside the project, on real scans kept
aside. What the project can measure is the same question one step removed: does a training option make a model
robust to images it has not seen? Each training dataset's standalone model is trained under every training
option (`OPTIONS`: a set of profile overrides; the same steps, seed and network) and tested on the same test
cases imaged several ways (`TEST_DOMAINS`): as CT in each dataset's published phase (as trained by default), in
each contrast phase (unenhanced, late arterial, portal venous, delayed), by another scanner and in FedGIN's
MRI-like contrast. The anatomy and labels of a case are the same in every domain; only the image changes.

The option is chosen on validation phantoms (`selection_table`, `choose`: `RULE`), and the chosen option's
test-split table is reported beside the default's (`test_bar`, `verdict`). The coarse-to-fine localiser, trained
once on the default phantoms, is checked per organ and phase (`localiser_found`, `localiser_table`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai import transforms as mt
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.config import synthetic_data_root
from fedseg.data.datasets import check_data, obtain_data
from fedseg.data.labels import CHANNEL_INDEX, TRAIN_DATASETS, owned_channels
from fedseg.data.transforms import IMAGE, LABEL, build_cache, case_records, evaluation_dataset, file_stamp
from fedseg.evaluate.evaluation import load_best
from fedseg.train import inference
from fedseg.train.training import (
    LOCALISER_NAME,
    StaleCheckpointError,
    check_resumable,
    data_identity,
    fit_localiser,
    fit_models,
    localiser_config,
    select_device,
    training_settings,
    validate,
    validation_subset,
)

#: The training augmentation of the randomised option (`transforms.domain_augmentation`).
DEFAULT_AUGMENT: dict[str, Any] = {"prob": 0.3}


@dataclass(frozen=True)
class Option:
    """A training option: profile overrides of `data.phantom` and `preprocess`; `data` names its data root (a suffix
    of the profile's name; "" for the default phantom's, which options that only change the training share)."""

    about: str
    phantom: Mapping[str, Any] = field(default_factory=dict)
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    data: str = ""

    def overrides(self) -> str:
        """The option's profile overrides, as a reader would write them."""
        items = [f"data.phantom.{k}: {json.dumps(v)}" for k, v in self.phantom.items()]
        items += [f"preprocess.{k}: {json.dumps(v)}" for k, v in self.preprocess.items()]
        return "; ".join(items) or "none (the profile as it is)"


#: The option every other is compared with.
BASELINE = "default"
#: The training options, each trained with the same steps, seed and network.
OPTIONS: dict[str, Option] = {
    BASELINE: Option("CT phantoms, each dataset's published phase"),
    "randomised": Option("randomised phantoms (SynthSeg-style intensities) and MONAI intensity augmentation",
                         {"domain": "randomised"}, {"domain_augment": DEFAULT_AUGMENT}, "randomised"),
    "phase_mix": Option("CT phantoms, every training case in a random phase", {"phases": "all"}, {}, "phase-mix"),
    "phase_mix_augment": Option("phase mix and MONAI intensity augmentation", {"phases": "all"},
                                {"domain_augment": DEFAULT_AUGMENT}, "phase-mix"),
    "augment": Option("CT phantoms (published phases) and MONAI intensity augmentation", {},
                      {"domain_augment": DEFAULT_AUGMENT}),
}
#: The test domains: phantom settings of the same cases. "CT" is each dataset's published phase (as trained by
#: default: KiTS19 late arterial, the others portal venous); each phase puts every case in that phase.
TEST_DOMAINS: dict[str, dict[str, Any]] = {
    "CT": {"domain": "ct", "phases": "published", "mri_like": []},
    "portal venous": {"domain": "ct", "phases": "portal", "mri_like": []},
    "arterial": {"domain": "ct", "phases": "arterial", "mri_like": []},
    "delayed": {"domain": "ct", "phases": "delayed", "mri_like": []},
    "unenhanced": {"domain": "ct", "phases": "unenhanced", "mri_like": []},
    "other scanner": {"domain": "other_scanner", "phases": "published", "mri_like": []},
    "MRI-like": {"domain": "ct", "phases": "published", "mri_like": list(TRAIN_DATASETS)},
}
#: The validation images the option is chosen on, and the two it must gain on.
VALIDATION_TESTS = ("CT", "unenhanced", "other scanner")
GAIN_TESTS = ("unenhanced", "other scanner")
#: The most Dice points (mean over organs) an option may lose against the baseline on CT.
MAX_CT_LOSS = 2.0
RULE = (f"Among the options that lose at most {MAX_CT_LOSS:g} Dice points (mean over organs) against {BASELINE} on "
        f"the CT validation images, the one with the largest mean gain over {BASELINE} on the unenhanced and "
        f"other-scanner validation images ({BASELINE} itself, gain 0, when none gains; ties go to the option "
        f"listed first). On the test split it meets the bar when it loses at most {MAX_CT_LOSS:g} points on CT and "
        f"gains on both unenhanced and other-scanner images.")
#: The test domains the localiser is checked on (MRI-like images are no CT it is meant for).
LOCALISER_TESTS = ("CT", "portal venous", "arterial", "delayed", "unenhanced", "other scanner")
NOTE = ("Dice (%) of each dataset's standalone model on its organ, mean over the test cases; every option trained "
        "with the same steps, seed and network; rows: the training option; columns: the test images (the same cases "
        "and labels, imaged each way).")
#: The organ each training dataset's model is scored on.
ORGANS: dict[str, str] = {dataset: owned_channels(dataset)[0] for dataset in TRAIN_DATASETS}
MEAN = "mean over organs"


def option_profile(profile: Mapping[str, Any], option: str) -> dict[str, Any]:
    """The profile an option (`OPTIONS`) trains under: named `<name>-<data>` when its phantom differs."""
    spec = OPTIONS[option]
    out = copy.deepcopy(dict(profile))
    if spec.data:
        out["name"] = f"{profile['name']}-{spec.data}"
    out["data"]["phantom"].update(copy.deepcopy(dict(spec.phantom)))
    out["preprocess"].update(copy.deepcopy(dict(spec.preprocess)))
    return out


def randomised_profile(profile: Mapping[str, Any], augment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`profile` trained on randomised phantoms with domain augmentation, named `<name>-randomised`."""
    out = option_profile(profile, "randomised")
    out["preprocess"]["domain_augment"] = dict(augment or DEFAULT_AUGMENT)
    return out


def _with_phantom(profile: Mapping[str, Any], **phantom: Any) -> dict[str, Any]:
    out = copy.deepcopy(dict(profile))
    out["data"]["phantom"].update(copy.deepcopy(phantom))
    return out


def training_config(profile: Mapping[str, Any], option: str, seed: int) -> dict[str, Any]:
    """The configuration an option's models were trained under (its data root named, not generated)."""
    cfg = {**option_profile(profile, option), "seed": int(seed)}
    cfg["data_root"] = str(synthetic_data_root(cfg, seed).resolve())
    return cfg


def prepare(profile: Mapping[str, Any], seed: int, datasets: Sequence[str], progress: bool = True,
            splits: Sequence[str] | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """The profile's synthetic data (generated if missing, reused if current), checked, and the cases of `splits`
    (default all) preprocessed into the cache: (cfg, the cases of `datasets`)."""
    cfg = {**copy.deepcopy(dict(profile)), "seed": int(seed)}
    cfg["data_root"] = str(synthetic_data_root(cfg, seed).resolve())
    obtain_data(cfg, progress=progress)
    cases = check_data(cfg["data_root"], datasets=",".join(datasets), progress=progress).cases
    cached = cases if splits is None else cases[cases["split"].isin(list(splits))]
    build_cache(cfg, case_records(cfg["data_root"], cached), progress=progress)
    return cfg, cases


def _split(cfg: Mapping[str, Any], cases: pd.DataFrame, datasets: Sequence[str], split: str) -> list[dict[str, Any]]:
    return case_records(cfg["data_root"], cases[cases["dataset"].isin(datasets) & (cases["split"] == split)])


def finished(cfg: dict[str, Any], run_dir: str | Path, name: str, train_records: Sequence[Mapping[str, Any]],
             val_records: Sequence[Mapping[str, Any]], steps: int) -> bool:
    """Whether `run_dir`'s model `name` (`training.fit`'s folder) has finished `steps` steps under the settings `cfg`
    asks for, so it need not be loaded again; a checkpoint of other settings is refused as `fit` would refuse it
    (`training.StaleCheckpointError`, naming what differs)."""
    folder = run_folder.model_dir(run_dir, name)
    last = folder / "last.pt"
    if not (last.exists() and (folder / run_folder.BEST).exists()):
        return False
    saved = torch.load(last, map_location="cpu", weights_only=False)
    settings = training_settings(cfg, loss=cfg["train"]["loss"], budget=int(steps), seed=int(cfg["seed"]), task=None,
                                 train_records=train_records,
                                 val_records=validation_subset(val_records, cfg["train"].get("val_cases")))
    try:
        check_resumable(last, saved.get("settings"), settings)
    except StaleCheckpointError as error:
        raise StaleCheckpointError(f"{error} (benchmarks/domain_randomisation.py: pass another --work folder, or "
                                   f"delete {folder} to train this model again.)") from None
    return int(saved["state"]["step"]) >= int(steps)


def train(profile: Mapping[str, Any], seed: int, work_dir: str | Path, options: Sequence[str] = tuple(OPTIONS),
          datasets: Sequence[str] = TRAIN_DATASETS, steps: int | None = None,
          progress: bool = True) -> dict[str, dict[str, Path]]:
    """Each dataset's standalone model under each option, into `work_dir/<option>/`: {option: {dataset: best.pt}}.
    Finished models are reused, interrupted ones resumed (`training.fit_models`)."""
    out = {}
    for option in options:
        cfg, cases = prepare(option_profile(profile, option), seed, datasets, progress, splits=["train", "val"])
        run_dir = Path(work_dir) / option
        budget = int(steps or cfg["train"]["steps"])
        jobs = {dataset: (_split(cfg, cases, [dataset], "train"), _split(cfg, cases, [dataset], "val"), budget)
                for dataset in datasets}
        todo = {name: job for name, job in jobs.items() if not finished(cfg, run_dir, name, *job)}
        if progress:
            reused = [name for name in jobs if name not in todo]
            print(f"option {option}: training {', '.join(todo) or 'nothing'}"
                  + (f"; finished models reused: {', '.join(reused)}" if reused else ""), flush=True)
        if todo:
            fit_models(cfg, todo, run_dir, progress=progress)
        out[option] = {name: run_folder.model_dir(run_dir, name) / run_folder.BEST for name in jobs}
    return out


def _stamp(paths: Sequence[Path], data_root: str | Path, **extra: Any) -> str:
    """What a cached table was computed from: the files (name, size, modification time) and the data's identity."""
    record = {"files": {str(p): file_stamp(p) for p in paths}, "data": data_identity(data_root), **extra}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_cached(path: Path, stamp: str) -> bool:
    meta = path.with_suffix(".json")
    try:
        return path.exists() and json.loads(meta.read_text()).get("stamp") == stamp
    except (OSError, ValueError):
        return False


def _cache(path: Path, stamp: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """`compute()`, written to `path` (and its stamp and seconds beside it), or read back when the stamp matches."""
    if _is_cached(path, stamp):
        return pd.read_csv(path)
    began = time.perf_counter()
    frame = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.part")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"stamp": stamp,
                                                     "seconds": round(time.perf_counter() - began, 1)}))
    return frame


def score_split(cfg: dict[str, Any], checkpoints: Mapping[str, Path], cases: pd.DataFrame, split: str,
                trained: dict[str, Any], device: torch.device) -> pd.DataFrame:
    """Each dataset's model (dataset -> best.pt) on its own dataset's `split` cases of `cfg`'s data root; `trained`:
    the configuration the models were trained under (another data root, on purpose: `evaluation.load_best`).
    Long form: model, dataset, case_id, channel, dice."""
    frames = []
    for dataset, best in checkpoints.items():
        records = _split(cfg, cases, [dataset], split)
        scores = validate(load_best(cfg, best, device, trained=trained), evaluation_dataset(cfg, records), records,
                          cfg, device)
        frames.append(scores.assign(model=dataset))
    return pd.concat(frames, ignore_index=True)[["model", "dataset", "case_id", "channel", "dice"]]


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def score(profile: Mapping[str, Any], seed: int, checkpoints: Mapping[str, Mapping[str, Path]],
          work_dir: str | Path, split: str = "test", tests: Sequence[str] | None = None,
          progress: bool = True) -> pd.DataFrame:
    """Every option's models (`train`'s result) on `split` of every test domain (default: all of `TEST_DOMAINS` for
    the test split, `VALIDATION_TESTS` for val). Each (option, test) table is kept under
    `work_dir/scores/<split>/` and reused while its models and data are unchanged. Long form: option, split, test,
    model, dataset, case_id, channel, dice."""
    tests = list(tests or (TEST_DOMAINS if split == "test" else VALIDATION_TESTS))
    device = select_device()
    frames = []
    bar = tqdm(total=len(tests) * len(checkpoints), desc=f"scoring the {split} splits", disable=not progress)
    for test in tests:
        variant = _with_phantom(profile, **TEST_DOMAINS[test])
        root = synthetic_data_root({**variant}, seed).resolve()
        prepared = None
        for option, models in checkpoints.items():
            path = Path(work_dir) / "scores" / split / option / f"{_slug(test)}.csv"
            stamp = _stamp([models[d] for d in sorted(models)], root, split=split)
            if prepared is None and not _is_cached(path, stamp):
                prepared = prepare(variant, seed, list(models), progress, splits=[split])
                stamp = _stamp([models[d] for d in sorted(models)], root, split=split)  # the data now exists
            trained = training_config(profile, option, seed)  # the models are tested on other data on purpose
            frame = _cache(path, stamp, lambda: score_split(prepared[0], models, prepared[1], split, trained, device))
            frames.append(frame.assign(option=option, split=split, test=test))
            bar.update()
    bar.close()
    columns = ["option", "split", "test", "model", "dataset", "case_id", "channel", "dice"]
    return pd.concat(frames, ignore_index=True)[columns]


def _ordered(names, order) -> list:
    order = list(order)
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), str(n)))


def organ_table(scores: pd.DataFrame, split: str = "test", options: Sequence[str] | None = None) -> pd.DataFrame:
    """Dice % of each organ (rows: option and organ, plus each option's mean over organs; `options`, default every
    option of the scores in their order) per test domain (columns, in `TEST_DOMAINS`' order), on `split` (scores
    without a split column are taken whole)."""
    if "split" in scores.columns:
        scores = scores[scores["split"] == split]
    organs = scores[scores["channel"].isin(list(ORGANS.values()))]
    means = organs.groupby(["option", "channel", "test"])["dice"].mean().unstack("test") * 100
    tests = _ordered(means.columns, TEST_DOMAINS)
    chosen = list(options or pd.unique(organs["option"]))  # default: in the order of the scores
    organ_names = _ordered(means.index.get_level_values(1), ORGANS.values())
    rows, index = [], []
    for option in chosen:
        block = means.loc[option].reindex(organ_names)[tests]
        rows += [block, block.mean().to_frame(MEAN).T]
        index += [(option, organ) for organ in organ_names] + [(option, MEAN)]
    out = pd.concat(rows)
    out.index = pd.MultiIndex.from_tuples(index, names=["trained with", "organ"])
    out.columns.name = None
    return out


def option_means(scores: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per option (rows) and test domain: Dice % as the mean over organs."""
    return organ_table(scores, split).xs(MEAN, level=1)


def gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per option: the drop (Dice points) from CT to each other test domain, means over organs."""
    means = table.xs(MEAN, level=1)
    return pd.DataFrame({f"CT -> {t}": means["CT"] - means[t] for t in means.columns if t != "CT"})


def _changes(means: pd.DataFrame) -> pd.DataFrame:
    if BASELINE not in means.index:
        raise ValueError(f"The scores have no {BASELINE!r} option to compare the others with.")
    base = means.loc[BASELINE]
    out = pd.DataFrame(index=means.index)
    out["CT change"] = means["CT"] - base["CT"]
    for test in GAIN_TESTS:
        out[f"{test} gain"] = means[test] - base[test]
    return out


def selection_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The validation table the option is chosen on (`RULE`): per option, Dice % (mean over organs) on the CT,
    unenhanced and other-scanner validation images, the change against the baseline, the mean gain on unenhanced
    and other-scanner images, and whether it is eligible (loses at most `MAX_CT_LOSS` points on CT)."""
    means = option_means(scores, "val")
    out = pd.concat([means[list(VALIDATION_TESTS)], _changes(means)], axis=1)
    out["mean gain"] = out[[f"{t} gain" for t in GAIN_TESTS]].mean(axis=1)
    out["eligible"] = out["CT change"] >= -MAX_CT_LOSS
    out.index.name = "option"
    return out


def choose(selection: pd.DataFrame) -> str:
    """`RULE`: the eligible option with the largest mean gain (the first listed on a tie); the baseline when no
    option gains."""
    eligible = selection[selection["eligible"] & selection["mean gain"].notna()]
    if eligible.empty or eligible["mean gain"].max() <= 0:
        return BASELINE
    return str(eligible["mean gain"].idxmax())


def test_bar(scores: pd.DataFrame) -> pd.DataFrame:
    """Per option, on the test split: CT change and the gains against the baseline (Dice points, means over organs),
    and whether it meets the bar (at most `MAX_CT_LOSS` lost on CT, a gain on unenhanced and other-scanner images)."""
    out = _changes(option_means(scores, "test"))
    out["meets the bar"] = (out["CT change"] >= -MAX_CT_LOSS) & (out[[f"{t} gain" for t in GAIN_TESTS]] > 0).all(axis=1)
    out.loc[BASELINE, "meets the bar"] = False  # the baseline is what an option must beat
    out.index.name = "option"
    return out


def verdict(chosen: str, bar: pd.DataFrame) -> str:
    """The sentence that says whether the chosen option meets the bar on the test split, from `test_bar`'s numbers."""
    others = [o for o in bar.index[bar["meets the bar"]] if o != chosen]
    also = (f" Options that meet it on the test split without having been chosen: {', '.join(others)}."
            if others else "")
    if chosen == BASELINE:
        return (f"No option gained on the validation images within the CT bar, so the rule keeps {BASELINE}: no "
                f"option is chosen, and the laptop profile's default stays.{also}")
    row = bar.loc[chosen]
    gains = ", ".join(f"{t} {row[f'{t} gain']:+.1f}" for t in GAIN_TESTS)
    met = bool(row["meets the bar"])
    return (f"Chosen on validation: {chosen}. On the test split it {'meets' if met else 'does not meet'} the bar: "
            f"CT {row['CT change']:+.1f} points against {BASELINE} (at least {-MAX_CT_LOSS:+.1f} allowed), {gains} "
            f"(both must be > 0)." + (f" It becomes the laptop profile's default ({OPTIONS[chosen].overrides()})."
                                      if met and chosen in OPTIONS else "") + also)


def train_localiser(profile: Mapping[str, Any], seed: int, work_dir: str | Path,
                    datasets: Sequence[str] = TRAIN_DATASETS, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """The coarse-to-fine localiser trained once, as 02 trains it (`training.fit_localiser` on the pooled training and
    validation cases of `datasets`, default phantoms), into `work_dir/localiser/` (reused when finished): (the
    configuration it was trained under, its best.pt)."""
    cfg, cases = prepare(option_profile(profile, BASELINE), seed, datasets, progress, splits=["train", "val"])
    run_dir = Path(work_dir) / "localiser"
    coarse = localiser_config(cfg)
    train_records, val_records = _split(cfg, cases, datasets, "train"), _split(cfg, cases, datasets, "val")
    if not finished(coarse, run_dir, LOCALISER_NAME, train_records, val_records, coarse["train"]["steps"]):
        fit_localiser(cfg, train_records, val_records, run_dir, progress=progress)
    elif progress:
        print("localiser: the finished model reused", flush=True)
    return coarse, run_folder.model_dir(run_dir, LOCALISER_NAME) / run_folder.BEST


@torch.no_grad()
def localiser_found(cfg: dict[str, Any], localiser: torch.nn.Module, factor: float, records: Sequence[dict[str, Any]],
                    device: torch.device) -> pd.DataFrame:
    """Per test case and organ its label holds: whether the localiser's coarse pass finds it, by coarse-to-fine's own
    rule (`inference.coarse_to_fine_logits`: the preprocessed image downsampled `factor` times by area averaging,
    sliding-window logits, an organ found where any of its channels is > 0). Columns: dataset, case_id, organ,
    found."""
    volumes = evaluation_dataset(cfg, list(records))
    rows = []
    for index, record in enumerate(records):
        case = volumes[index]
        image, label = torch.as_tensor(case[IMAGE]).float(), torch.as_tensor(case[LABEL])
        shape = tuple(image.shape[1:])
        coarse_image = mt.Resize(spatial_size=tuple(max(1, round(n / factor)) for n in shape), mode="area")(image)
        coarse_image = coarse_image.as_tensor() if hasattr(coarse_image, "as_tensor") else coarse_image
        logits = inference.predict_logits({LOCALISER_NAME: localiser}, coarse_image, cfg, device)
        found = inference._organs_found(logits, list(TRAIN_DATASETS))  # the rule coarse_to_fine_logits applies
        for organ, channels in inference.ORGANS.items():
            if bool(label[[CHANNEL_INDEX[c] for c in channels]].any()):  # the organ is in this case's label
                rows.append({"dataset": record["dataset"], "case_id": record["case_id"], "organ": organ,
                             "found": bool(found[organ])})
    return pd.DataFrame(rows, columns=["dataset", "case_id", "organ", "found"])


def localiser_scores(profile: Mapping[str, Any], seed: int, work_dir: str | Path, trained: dict[str, Any],
                     best: Path, datasets: Sequence[str] = TRAIN_DATASETS, tests: Sequence[str] = LOCALISER_TESTS,
                     btcv: bool = True, progress: bool = True) -> pd.DataFrame:
    """`localiser_found` on the test cases of `datasets` (and of BTCV) imaged each way of `tests`, kept under
    `work_dir/localiser/found/` and reused while the localiser and data are unchanged. Long form: test, cases
    ("test splits" or "BTCV"), dataset, case_id, organ, found."""
    device = select_device()
    factor = float(trained["localiser"]["factor"])
    wanted = [*datasets, "btcv"] if btcv else list(datasets)
    frames = []
    for test in tqdm(tests, desc="localiser per test domain", disable=not progress):
        variant = _with_phantom(profile, **TEST_DOMAINS[test])
        root = synthetic_data_root(variant, seed).resolve()
        path = Path(work_dir) / "localiser" / "found" / f"{_slug(test)}.csv"
        stamp = _stamp([best], root, datasets=wanted)
        if not _is_cached(path, stamp):
            cfg, cases = prepare(variant, seed, wanted, progress, splits=["test"])
            stamp = _stamp([best], root, datasets=wanted)  # the data now exists
            model = load_best(localiser_config(cfg), best, device, trained=trained)
            _cache(path, stamp, lambda: localiser_found(cfg, model, factor, _split(cfg, cases, wanted, "test"), device))
        frame = pd.read_csv(path)
        frames.append(frame.assign(test=test, cases=np.where(frame["dataset"] == "btcv", "BTCV", "test splits")))
    return pd.concat(frames, ignore_index=True)[["test", "cases", "dataset", "case_id", "organ", "found"]]


def localiser_table(found: pd.DataFrame) -> pd.DataFrame:
    """Per case set and organ (rows) and test domain (columns): "% found (found/cases)"."""
    grouped = found.groupby(["cases", "organ", "test"])["found"].agg(["sum", "count"])
    cells = grouped.apply(lambda r: f"{100 * r['sum'] / r['count']:.0f} ({int(r['sum'])}/{int(r['count'])})", axis=1)
    table = cells.unstack("test")
    table = table[_ordered(table.columns, TEST_DOMAINS)]
    order = [(c, o) for c in ("test splits", "BTCV") for o in inference.ORGANS if (c, o) in table.index]
    table = table.loc[order]
    table.columns.name = None
    return table
