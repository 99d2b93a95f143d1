"""Where each dataset lives on disk, in its own real layout, and how a case's files are found.

One place defines each dataset's layout (MSD `imagesTr/`+`labelsTr/`, KiTS19 `case_XXXXX/`, BTCV
`img/`+`label/`); the synthetic generator writes the same layouts, so every reader works on both.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedseg.labels import DATASETS

#: Folder of each dataset under a data root, as the dataset ships (MSD tar, KiTS19 repo, BTCV zip).
DATASET_DIRS: dict[str, str] = {
    "liver": "Task03_Liver",
    "pancreas": "Task07_Pancreas",
    "spleen": "Task09_Spleen",
    "kits19": "kits19/data",
    "btcv": "BTCV",
}

#: Case-relative paths (image, label) of each layout; `{case}` is the manifest's case id.
LAYOUTS: dict[str, tuple[str, str]] = {
    "liver": ("imagesTr/{case}.nii.gz", "labelsTr/{case}.nii.gz"),
    "pancreas": ("imagesTr/{case}.nii.gz", "labelsTr/{case}.nii.gz"),
    "spleen": ("imagesTr/{case}.nii.gz", "labelsTr/{case}.nii.gz"),
    "kits19": ("{case}/imaging.nii.gz", "{case}/segmentation.nii.gz"),
    "btcv": ("img/{case}.nii.gz", "label/{label_case}.nii.gz"),
}

#: Name of the manifest a generated (synthetic) data root carries; real roots use data_manifest.csv.
LOCAL_MANIFEST = "manifest.csv"


def dataset_dir(data_root: str | Path, dataset: str) -> Path:
    """The folder of `dataset` under `data_root`."""
    if dataset not in DATASET_DIRS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
    return Path(data_root) / DATASET_DIRS[dataset]


def relative_paths(dataset: str, case_id: str) -> tuple[str, str]:
    """(image, label) paths of a case relative to its dataset folder, in the dataset's real layout."""
    image, label = LAYOUTS[dataset]
    label_case = case_id.replace("img", "label", 1) if dataset == "btcv" else case_id
    return image.format(case=case_id), label.format(case=case_id, label_case=label_case)


def case_files(data_root: str | Path, row: pd.Series) -> tuple[Path, Path]:
    """Absolute (image, label) paths of one manifest row."""
    root = dataset_dir(data_root, row["dataset"])
    return root / row["image"], root / row["label"]


def manifest_for(data_root: str | Path) -> pd.DataFrame:
    """The manifest that defines a data root: its own `manifest.csv` (synthetic data) or the study's."""
    from fedseg.manifest import MANIFEST_PATH, load_manifest

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
        return "put the file from Synapse's RawData.zip in place as fedseg.download.btcv_instructions() describes"
    if dataset == "kits19":
        return "run fedseg.download.fetch_dataset('kits19', data_root), which fetches missing files (delete bad ones)"
    return (
        f"delete the {DATASET_DIRS[dataset]} folder and run fedseg.download.fetch_dataset({dataset!r}, data_root) "
        "to extract the MSD archive again"
    )


def _read(path: Path, dataset: str, role: str, scaled: bool):
    """Load a NIfTI and read its whole data array once (so truncated files fail here, not in training)."""
    import nibabel as nib
    import numpy as np

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
    import numpy as np

    vals = [int(v) if float(v).is_integer() else float(v) for v in np.asarray(values).tolist()]
    shown = ", ".join(str(v) for v in vals[:10])
    return f"[{shown}{', ...' if len(vals) > 10 else ''}]"


def _case_problems(data_root: str | Path, row: pd.Series, keep: bool = False):
    """(problems, image, label) of one manifest row; problems are (file, message) pairs.

    With `keep`, the returned nibabel images hold the arrays already read (data read once).
    """
    import nibabel as nib
    import numpy as np

    from fedseg.labels import allowed_values

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
            message += f" ({len(problems) - 1} more problem(s) in this case; see fedseg.datasets.check_case.)"
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


def check_dataset(
    data_root: str | Path,
    dataset: str | None = None,
    manifest: pd.DataFrame | None = None,
    progress: bool = True,
    unlisted: bool = True,
) -> pd.DataFrame:
    """Every problem of `dataset` (or of all datasets in the manifest) under `data_root`, in one table.

    Columns: dataset, case_id, file, problem; zero rows means the data root matches the manifest.
    `manifest` defaults to `manifest_for(data_root)`. With `unlisted`, files in a dataset's folders that
    the manifest does not list are added as warning rows whose problem starts with "not in manifest".
    """
    from tqdm.auto import tqdm

    if manifest is None:
        manifest = manifest_for(data_root)
    if dataset is not None:
        dataset_dir(data_root, dataset)  # unknown names fail here
        manifest = manifest[manifest["dataset"] == dataset]
    rows: list[dict[str, str]] = []
    listed: dict[str, set[Path]] = {}
    bar = tqdm(
        (row for _, row in manifest.iterrows()),
        total=len(manifest),
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
            f"(run fedseg.datasets.check_dataset for the full table): {first}{more}"
        )
    return report


def obtain_data(cfg: dict, download: bool = False, progress: bool = True) -> Path:
    """The data root of a resolved profile, ready to check: synthetic data generated once, real data found
    (and, with `download`, fetched where the source allows it). Missing datasets are an error naming them."""
    from fedseg import download as downloads

    root = Path(cfg["data_root"])
    if cfg["data"]["source"] == "synthetic":
        from fedseg.phantom import generate

        phantom = dict(cfg["data"]["phantom"])
        phantom["min_cases"] = tuple(phantom["min_cases"])
        return generate(root, seed=cfg["seed"], progress=progress, **phantom)
    missing = [name for name in DATASETS if not dataset_dir(root, name).is_dir()]
    if download:
        for name in [m for m in missing if m in downloads.SOURCES]:
            downloads.fetch_dataset(name, root, progress=progress)
        missing = [name for name in DATASETS if not dataset_dir(root, name).is_dir()]
    if missing:
        hints = [downloads.btcv_instructions(root)] if "btcv" in missing else []
        if set(missing) - {"btcv"}:
            hints.insert(0, "download them with download=True (MSD tasks, KiTS19) or place them there by hand")
        raise DataError(
            f"No {', '.join(DATASET_DIRS[m] for m in missing)} folder under {root}: " + "; ".join(hints) + "."
        )
    return root
