"""A data root as a run uses it: its manifest, its validation against the manifest (`check_data`), obtaining the
data (synthetic generation or download) and the part of it a run declares (datasets, cases).

The layouts themselves (where each dataset's files lie) are `fedseg.data.layouts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fedseg.data import download as downloads
from fedseg.data.labels import DATASETS, TRAIN_DATASETS, allowed_values
from fedseg.data.layouts import (
    DATASET_DIRS,
    LAYOUTS,
    LOCAL_MANIFEST,
    case_files,
    dataset_dir,
)
from fedseg.data.manifest import MANIFEST_PATH, load_manifest
from fedseg.data.phantom import generate


def manifest_for(data_root: str | Path) -> pd.DataFrame:
    """The manifest that defines a data root: its own `manifest.csv` (synthetic data) or the study's."""
    local = Path(data_root) / LOCAL_MANIFEST
    return load_manifest(local if local.exists() else MANIFEST_PATH)


# --------------------------------------------------------------------------------------------------
# Validation of a data root against its manifest
# --------------------------------------------------------------------------------------------------

#: Largest image/label affine difference (mm, any entry) still taken as the same voxel grid.
AFFINE_ATOL_MM = 1e-3

#: Columns of a `check_dataset` report.
PROBLEM_COLUMNS: tuple[str, ...] = ("dataset", "case_id", "file", "problem")

#: Prefix of the report rows that are warnings, not faults (files the manifest does not list).
EXTRA_PREFIX = "not in manifest"


class DataError(ValueError):
    """A data root does not match its manifest; the message names the file and the fix."""

class _Fault(Exception):
    """Internal: one problem of one file (the message is the user-facing sentence)."""
    def __init__(self, file: Path, message: str):
        super().__init__(message)
        self.file = file
        self.message = message


def _fix_hint(dataset: str) -> str:
    """How to get a good copy of a file of `dataset` back (ends a problem sentence)."""
    if dataset == "btcv":
        return "put the file from Synapse's RawData.zip in place as fedseg.data.download.btcv_instructions() describes"
    if dataset == "kits19":
        return ("run fedseg.data.download.fetch_dataset('kits19', data_root), which fetches missing files "
                "(delete bad ones)")
    return (
        f"delete the {DATASET_DIRS[dataset]} folder and run fedseg.data.download.fetch_dataset({dataset!r}, data_root) "
        "to extract the MSD archive again"
    )


def _read(path: Path, dataset: str, role: str, scaled: bool):
    """Load a NIfTI and read its whole data array once (so truncated files fail here, not in training)."""
    if not path.is_file():
        raise _Fault(
            path, f"{role} file {path} is missing: fix the manifest row if it is wrong, else {_fix_hint(dataset)}."
        )
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        if scaled or not hasattr(proxy, "get_unscaled"):
            data = np.asanyarray(proxy)
        else:  # raw on-disk dtype: the image is only checked here, so skip the float scaling copy
            data = np.asanyarray(proxy.get_unscaled())
    except MemoryError:
        raise
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError, ImageFileError, struct.error ...
        reason = f"{type(err).__name__}: {err}".strip()
        raise _Fault(
            path,
            f"{role} file {path} cannot be read ({reason}), so it is truncated or corrupt: {_fix_hint(dataset)}.",
        ) from err
    return img, data


def _format_values(values) -> str:

    vals = [int(v) if float(v).is_integer() else float(v) for v in np.asarray(values).tolist()]
    shown = ", ".join(str(v) for v in vals[:10])
    return f"[{shown}{', ...' if len(vals) > 10 else ''}]"


def _case_problems(data_root: str | Path, row: pd.Series, keep: bool = False):
    """(problems, image, label) of one manifest row; problems are (file, message) pairs.

    With `keep`, the returned nibabel images hold the arrays already read (data read once).
    """
    dataset = str(row["dataset"])
    image_path, label_path = case_files(data_root, row)
    problems: list[tuple[Path, str]] = []
    image = label = None
    image_data = label_data = None
    try:
        image, image_data = _read(image_path, dataset, "Image", scaled=keep)
    except _Fault as fault:
        problems.append((fault.file, fault.message))
    try:
        label, label_data = _read(label_path, dataset, "Label", scaled=True)
    except _Fault as fault:
        problems.append((fault.file, fault.message))

    if image is not None and label is not None:
        if image_data.shape != label_data.shape:
            problems.append((label_path, (
                f"Label file {label_path} has shape {tuple(label_data.shape)} but its image {image_path} has "
                f"shape {tuple(image_data.shape)}: the pair does not belong together, so {_fix_hint(dataset)}."
            )))
        elif not np.allclose(image.affine, label.affine, rtol=0.0, atol=AFFINE_ATOL_MM):
            diff = float(np.max(np.abs(np.asarray(image.affine) - np.asarray(label.affine))))
            problems.append((label_path, (
                f"Label file {label_path} has an affine that differs from its image {image_path} by up to "
                f"{diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm): resample the label onto the image grid, or "
                f"{_fix_hint(dataset)}."
            )))
    if label is not None:
        allowed = sorted(allowed_values(dataset))
        bad = ~np.isin(label_data, allowed)
        if bad.any():
            values = np.unique(label_data[bad])
            problems.append((label_path, (
                f"Label file {label_path} contains values {_format_values(values)} outside the {dataset} "
                f"label map {allowed}: check that the file belongs to {dataset}, else {_fix_hint(dataset)}."
            )))

    if keep and not problems:
        image = nib.Nifti1Image(image_data, image.affine, image.header)
        label = nib.Nifti1Image(label_data, label.affine, label.header)
    return problems, image, label


def check_case(data_root: str | Path, row: pd.Series) -> list[str]:
    """All problems of one manifest row (empty list: the case is fine), one sentence each naming the file.

    Checks: image and label exist; both load and their whole data arrays read (truncated .nii.gz caught);
    same shape; same affine within `AFFINE_ATOL_MM`; label values within `allowed_values(dataset)`.
    """
    problems, _, _ = _case_problems(data_root, row)
    return [message for _, message in problems]


def load_case(data_root: str | Path, row: pd.Series):
    """(image, label) nibabel images of one manifest row, checked as `check_case` does.

    The returned images hold their arrays in memory (each file is read once). Raises `DataError` with
    one sentence naming the file for the first problem found (the count of further ones is added).
    """
    problems, image, label = _case_problems(data_root, row, keep=True)
    if problems:
        message = problems[0][1]
        if len(problems) > 1:
            message += f" ({len(problems) - 1} more problem(s) in this case; see fedseg.data.datasets.check_case.)"
        raise DataError(message)
    return image, label


def _unlisted_files(data_root: str | Path, dataset: str, listed: set[Path]) -> list[Path]:
    """Image/label files in the dataset's folders (its layout's pattern) that the manifest does not list."""
    root = dataset_dir(data_root, dataset)
    if not root.is_dir():
        return []
    extra: set[Path] = set()
    for template in LAYOUTS[dataset]:
        pattern = template.replace("{case}", "*").replace("{label_case}", "*")
        for path in root.glob(pattern):
            if path.name.startswith("."):  # macOS AppleDouble `._*` files and other hidden files
                continue
            if path.is_file() and path not in listed:
                extra.add(path)
    return sorted(extra)


def require_root(data_root: str | Path) -> Path:
    """`data_root` as a Path; `DataError` when it does not exist (one sentence, not a missing file per case)."""
    root = Path(data_root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist: check the path (data_root), or create it and put the "
                        "datasets there (real data: see fedseg.data.download; download=True fetches the MSD tasks "
                        "and KiTS19).")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: data_root must be the folder that holds the datasets.")
    return root


def check_dataset(
    data_root: str | Path,
    dataset: str | None = None,
    manifest: pd.DataFrame | None = None,
    progress: bool = True,
    unlisted: bool = True,
    cases: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every problem of `dataset` (or of all datasets in the manifest) under `data_root`, in one table.

    Columns: dataset, case_id, file, problem; zero rows means the data root matches the manifest.
    `manifest` defaults to `manifest_for(data_root)`. With `unlisted`, files in a dataset's folders that
    the manifest does not list are added as warning rows whose problem starts with "not in manifest".
    `cases` (rows of the manifest, e.g. `select_cases`'s) limits the check to those cases; the files of the
    manifest's other cases are still "listed", so they are no warning. A missing `data_root` raises `DataError`.
    """
    require_root(data_root)
    if manifest is None:
        manifest = manifest_for(data_root)
    if dataset is not None:
        dataset_dir(data_root, dataset)  # unknown names fail here
        manifest = manifest[manifest["dataset"] == dataset]
        if cases is not None:
            cases = cases[cases["dataset"] == dataset]
    rows: list[dict[str, str]] = []
    listed: dict[str, set[Path]] = {}
    checked = manifest if cases is None else cases
    if cases is not None:  # the manifest's every file of the checked datasets counts as listed
        for _, row in manifest[manifest["dataset"].isin(set(cases["dataset"]))].iterrows():
            listed.setdefault(str(row["dataset"]), set()).update(case_files(data_root, row))
    bar = tqdm(
        (row for _, row in checked.iterrows()),
        total=len(checked),
        desc=f"check {dataset or 'data'}",
        unit="case",
        disable=not progress,
    )
    for row in bar:
        image_path, label_path = case_files(data_root, row)
        listed.setdefault(str(row["dataset"]), set()).update((image_path, label_path))
        problems, _, _ = _case_problems(data_root, row)
        for file, message in problems:
            rows.append({"dataset": row["dataset"], "case_id": row["case_id"], "file": str(file), "problem": message})
    if unlisted:
        for name, files in listed.items():
            for path in _unlisted_files(data_root, name, files):
                rows.append({
                    "dataset": name,
                    "case_id": "",
                    "file": str(path),
                    "problem": (
                        f"{EXTRA_PREFIX}: {path} is in the {name} folder but the manifest does not list it, "
                        "so it is ignored; add it to the manifest or move it away if it should be used."
                    ),
                })
    return pd.DataFrame(rows, columns=list(PROBLEM_COLUMNS))


def require_valid(
    data_root: str | Path,
    dataset: str | None = None,
    manifest: pd.DataFrame | None = None,
    progress: bool = True,
    strict: bool = False,
    show: int = 5,
    report: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Run `check_dataset` (or take its `report`) and raise `DataError` if any case has a problem.

    "not in manifest" rows are warnings and only fail with `strict`; they stay in the returned report.
    """
    if report is None:
        report = check_dataset(data_root, dataset, manifest, progress=progress)
    is_warning = report["problem"].str.startswith(EXTRA_PREFIX)
    faults = report if strict else report[~is_warning]
    if len(faults):
        first = " | ".join(faults["problem"].head(show))
        more = f" | ... and {len(faults) - show} more" if len(faults) > show else ""
        where = f"dataset {dataset!r}" if dataset else "the manifest's datasets"
        raise DataError(
            f"{len(faults)} problem(s) in {where} under {data_root} "
            f"(run fedseg.data.datasets.check_dataset for the full table): {first}{more}"
        )
    return report


def obtain_data(cfg: dict, download: bool = False, progress: bool = True) -> Path:
    """The data root of a resolved profile, ready to check: synthetic data generated once, real data found
    (and, with `download`, fetched where the source allows it). Real data: a missing data root, or a missing
    folder of a dataset the run uses (`cfg["data"]["datasets"]`/`["cases"]`, default all), is an error naming it."""
    root = Path(cfg["data_root"])
    if cfg["data"]["source"] == "synthetic":

        phantom = dict(cfg["data"]["phantom"])
        phantom["min_cases"] = tuple(phantom["min_cases"])
        return generate(root, seed=cfg["seed"], progress=progress, **phantom)
    if download and not root.exists():
        root.mkdir(parents=True)
    require_root(root)
    declared = declared_datasets(cfg["data"].get("datasets"))
    if declared is None and parse_names(cfg["data"].get("cases")):  # cases alone: the datasets they belong to
        chosen = select_cases(manifest_for(root), None, cfg["data"].get("cases"))
        declared = tuple(d for d in DATASETS if (chosen["dataset"] == d).any())
    wanted = declared or DATASETS
    missing = [name for name in wanted if not dataset_dir(root, name).is_dir()]
    if download:
        for name in [m for m in missing if m in downloads.SOURCES]:
            downloads.fetch_dataset(name, root, progress=progress)
        missing = [name for name in wanted if not dataset_dir(root, name).is_dir()]
    if missing:
        hints = [downloads.btcv_instructions(root)] if "btcv" in missing else []
        if set(missing) - {"btcv"}:
            hints.insert(0, "download them with download=True (MSD tasks, KiTS19) or place them there by hand")
        found = [name for name in DATASETS if dataset_dir(root, name).is_dir()]
        if declared is None and found:
            hints.append(f"or run on the datasets that are there: declare them with datasets={','.join(found)} "
                         f"(`-p datasets={','.join(found)}`), and the others are listed as absent")
        raise DataError(
            f"No {', '.join(DATASET_DIRS[m] for m in missing)} folder under {root}: " + "; ".join(hints) + "."
        )
    return root


# --------------------------------------------------------------------------------------------------
# Part of the data: the datasets (and cases) a run declares
# --------------------------------------------------------------------------------------------------


def parse_names(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A declaration as a tuple of names: "a,b" or a list -> ("a", "b"); None, "" or "all" -> None (all)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    return None if not names or names == ("all",) else names


def declared_datasets(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """The datasets a run declares (`parse_names`), in study order; None: all. Unknown names are a ValueError."""
    names = parse_names(value)
    if names is None:
        return None
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise ValueError(f"datasets={','.join(names)}: {', '.join(unknown)} is not a dataset of the study; declare "
                         f"names from {', '.join(DATASETS)} (comma-separated, e.g. spleen,btcv), or '' for all.")
    return tuple(name for name in DATASETS if name in names)


def declare(cfg: dict, datasets: str | Iterable[str] | None = None,
            cases: str | Iterable[str] | None = None) -> dict:
    """`cfg` with the datasets and cases the run declares in `cfg["data"]` (lists, None = all): the
    notebook's parameters where given, else the profile's `data.datasets` / `data.cases` ("" = all)."""
    data = cfg.setdefault("data", {})
    chosen = declared_datasets(data.get("datasets") if datasets is None else datasets)
    named = parse_names(data.get("cases") if cases is None else cases)
    data["datasets"] = None if chosen is None else list(chosen)
    data["cases"] = None if named is None else list(named)
    return cfg


def select_cases(manifest: pd.DataFrame, datasets: str | Iterable[str] | None = None,
                 cases: str | Iterable[str] | None = None) -> pd.DataFrame:
    """The manifest rows a run uses, in manifest order: those of the declared `datasets` (default: all), where
    declared `cases` (case ids) narrow the datasets they belong to (the other declared datasets keep all their
    cases; with no datasets declared, exactly those cases). A declared name the manifest lacks is a `DataError`."""
    declared = declared_datasets(datasets)
    named = parse_names(cases)
    if declared is not None:
        lacking = [d for d in declared if not (manifest["dataset"] == d).any()]
        if lacking:
            raise DataError(f"datasets {', '.join(lacking)} are declared but the manifest has no case of them: "
                            "leave them out of datasets, or use the study's manifest.")
    keep = manifest["dataset"].isin(declared) if declared is not None else pd.Series(True, index=manifest.index)
    if named is not None:
        known = set(manifest["case_id"])
        unknown = [c for c in named if c not in known]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(f"cases {shown} are not in the manifest: declare case ids from its case_id column "
                            "(e.g. spleen_2, img0001).")
        chosen = manifest["case_id"].isin(named)
        if declared is not None:
            outside = manifest[chosen & ~manifest["dataset"].isin(declared)]
            if len(outside):
                pairs = ", ".join(f"{c} ({d})" for c, d in zip(outside["case_id"], outside["dataset"]))
                raise DataError(f"cases {pairs} belong to datasets not declared (datasets="
                                f"{','.join(declared)}): add their datasets, or drop those cases.")
            keep = (keep & ~manifest["dataset"].isin(set(manifest.loc[chosen, "dataset"]))) | chosen
        else:
            keep = chosen
    return manifest[keep].reset_index(drop=True)


@dataclass
class DataCheck:
    """What `check_data` found: the cases the run uses, their problems, and the datasets it leaves out."""
    data_root: Path
    #: The manifest rows the run uses (declared datasets and cases), in manifest order: 01's cases.csv.
    cases: pd.DataFrame
    #: `check_dataset`'s table over those cases (errors, and "not in manifest" warnings).
    problems: pd.DataFrame
    #: Datasets used, in study order.
    datasets: tuple[str, ...]
    #: Datasets of the manifest the run does not use (not declared): neither checked nor used, and no problem.
    absent: tuple[str, ...]
    #: Cases per dataset in the manifest (to say when declared cases narrow a dataset).
    listed: dict[str, int]

    def summary(self) -> str:
        """Which datasets (and how many of their cases) are checked and used, and which are absent."""
        counts = self.cases.groupby("dataset", sort=False).size()
        used = ", ".join(f"{d} ({counts[d]}" + (f" of {self.listed[d]}" if counts[d] < self.listed[d] else "")
                         + " cases)" for d in self.datasets)
        text = f"Using {len(self.cases)} cases under {self.data_root}: {used}."
        if self.absent:
            on_disk = [d for d in self.absent if dataset_dir(self.data_root, d).is_dir()]
            text += (f" Absent (not declared, so neither checked nor used): {', '.join(self.absent)}"
                     + (f"; folders present but unused: {', '.join(on_disk)}" if on_disk else "") + ".")
        for dataset in self.datasets:
            if dataset in TRAIN_DATASETS:
                splits = set(self.cases.loc[self.cases["dataset"] == dataset, "split"])
                lacking = [s for s in ("train", "val", "test") if s not in splits]
                if lacking:
                    text += f" Note: {dataset} has no {'/'.join(lacking)} cases."
        return text


def check_data(data_root: str | Path, manifest: pd.DataFrame | None = None,
               datasets: str | Iterable[str] | None = None, cases: str | Iterable[str] | None = None,
               progress: bool = True, unlisted: bool = True) -> DataCheck:
    """Check the datasets (and cases) a run declares, strictly, and list the manifest's others as absent.

    `datasets` / `cases` as `select_cases` takes them (None, "" or "all": everything, which is the strict
    check of the whole manifest). A declared dataset or case with a missing or broken file is a problem row
    naming the file, as `check_dataset` reports it; an undeclared dataset is only named in `absent`. A
    missing `data_root` raises `DataError` ("data root ... does not exist"). `manifest` defaults to
    `manifest_for(data_root)`.
    """
    root = require_root(data_root)
    if manifest is None:
        manifest = manifest_for(root)
    chosen = select_cases(manifest, datasets, cases)
    used = tuple(d for d in DATASETS if (chosen["dataset"] == d).any())
    listed = {d: int(n) for d, n in manifest.groupby("dataset").size().items()}
    absent = tuple(d for d in DATASETS if d in listed and d not in used)
    problems = check_dataset(root, manifest=manifest, progress=progress, unlisted=unlisted, cases=chosen)
    return DataCheck(data_root=root, cases=chosen, problems=problems, datasets=used, absent=absent, listed=listed)


def present_datasets(cases: pd.DataFrame, among: Iterable[str] = DATASETS) -> tuple[str, ...]:
    """The datasets of `among` that a run's cases table (01's cases.csv) holds, in `among`'s order."""
    held = set(cases["dataset"])
    return tuple(d for d in among if d in held)


def training_datasets(cases: pd.DataFrame) -> tuple[str, ...]:
    """The training datasets a run's cases table holds (study order): 02's SL models and 03's default clients.

    A ValueError naming the fix when it holds none, or one without train or val cases (its model could
    neither train nor be validated)."""
    present = present_datasets(cases, TRAIN_DATASETS)
    if not present:
        raise ValueError(f"The cases table has no training dataset, so there is no model to train: declare at "
                         f"least one of {', '.join(TRAIN_DATASETS)} in 01_data_prep (datasets=...) and have it "
                         "under data_root.")
    for dataset in present:
        splits = set(cases.loc[cases["dataset"] == dataset, "split"])
        lacking = [s for s in ("train", "val") if s not in splits]
        if lacking:
            raise ValueError(f"{dataset} has no {' or '.join(lacking)} cases in the cases table, so its model can "
                             f"neither train nor be validated: declare some of its {'/'.join(lacking)} cases in "
                             f"01_data_prep (cases=...), or leave {dataset} out (datasets=...).")
    return present


def federation_clients(clients: str | Iterable[str] | None, cases: pd.DataFrame) -> str:
    """03's clients as "a,b": the given ones (each must be present in the cases table), else every training
    dataset present (`training_datasets`)."""
    names = parse_names(clients)
    if names is None:
        return ",".join(training_datasets(cases))
    absent = [n for n in names if n in TRAIN_DATASETS and n not in set(cases["dataset"])]
    if absent:
        present = ", ".join(present_datasets(cases, TRAIN_DATASETS)) or "none"
        raise ValueError(f"clients={','.join(names)}: {', '.join(absent)} absent from this run's cases (01_data_prep "
                         f"did not use it; training datasets present: {present}): drop it from clients, or declare "
                         "it in 01 and have it under data_root.")
    return ",".join(names)
