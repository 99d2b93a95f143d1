"""Where each dataset lives on disk, in its own real layout, and how a case's files are found.

One place defines each dataset's layout (MSD `imagesTr/`+`labelsTr/`, KiTS19 `case_XXXXX/`, BTCV
`img/`+`label/`); the synthetic generator writes the same layouts, so every reader works on both.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedseg.data.catalogue import CATALOGUE
from fedseg.data.labels import DATASETS

#: Folder of each dataset under a data root, as the dataset ships (MSD tar, KiTS19 repo, BTCV zip).
DATASET_DIRS: dict[str, str] = {d.name: d.folder for d in CATALOGUE}

#: Case-relative paths (image, label) of each layout; `{case}` is the manifest's case id.
LAYOUTS: dict[str, tuple[str, str]] = {d.name: d.layout for d in CATALOGUE}

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
