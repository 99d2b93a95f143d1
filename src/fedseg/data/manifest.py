"""The study's data manifest: one row per real case with its file paths and train/val/test split.

The splits reproduce Table 1 of the paper; see docs/data_manifest.md for where each one comes from.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedseg.data.catalogue import CATALOGUE
from fedseg.data.labels import DATASETS
from fedseg.data.layouts import relative_paths

TABLE1: dict[str, tuple[int, int, int]] = {d.name: d.table1 for d in CATALOGUE}
"""Cases per (train, val, test) split of each dataset, as in Table 1 of the paper."""

SPLITS: tuple[str, str, str] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("dataset", "case_id", "image", "label", "split", "split_source")
SPLIT_SOURCES: tuple[str, ...] = ("condistfl", "seeded", "paper")
"""`condistfl`: ConDistFL's published datalist; `seeded`: the `seeded_split` fallback;
`paper`: fixed by the study design (BTCV is test only)."""

FALLBACK_SEED = 0
"""Seed of the `seeded_split` fallback, used only for a dataset whose ConDistFL split is missing or off Table 1."""

MANIFEST_PATH = Path(__file__).resolve().parents[3] / "data_manifest.csv"

CONDISTFL_FOLDERS: dict[str, str] = {d.name: d.condistfl[0] for d in CATALOGUE if d.condistfl}
"""Folder of each dataset's datalist.json under NVFlare's research/condist-fl/data/."""

_CONDISTFL_LISTS = {"training": "train", "validation": "val", "testing": "test"}
_CONDISTFL_NAME = re.compile(r"IM_(LVR|PAN|SPL|KITS)_(\d+)\.nii\.gz")
_CONDISTFL_TAG = {d.name: d.condistfl[1] for d in CATALOGUE if d.condistfl}

BTCV_IDS: tuple[str, ...] = tuple(f"img{i:04d}" for i in [*range(1, 11), *range(21, 41)])
"""The 30 labelled BTCV cases (its Training folder); img0011-img0020 are not part of the release."""


def condistfl_case_id(dataset: str, file_name: str) -> str:
    """Original case id of a ConDistFL file name (its prepare_data.py renaming), e.g. IM_LVR_13.nii.gz -> liver_13."""
    m = _CONDISTFL_NAME.fullmatch(file_name)
    if m is None or m.group(1) != _CONDISTFL_TAG[dataset]:
        expected = f"IM_{_CONDISTFL_TAG[dataset]}_<n>.nii.gz"
        raise ValueError(f"{file_name!r} is not a ConDistFL {dataset} image name like {expected}.")
    n = m.group(2)
    return f"case_00{n}" if dataset == "kits19" else f"{dataset}_{n}"


def _number(case_id: str) -> int:
    return int(re.findall(r"\d+", case_id)[-1])


def seeded_split(case_ids: Iterable[str], counts: Sequence[int], seed: int = FALLBACK_SEED) -> dict[str, str]:
    """Fallback split: a `default_rng(seed)` permutation of the sorted ids, cut into exactly `counts`.

    `counts` is (train, val, test); the result maps each case id to its split, in sorted-id order.
    """
    ids = sorted(set(case_ids))
    if len(counts) != 3 or sum(counts) != len(ids) or min(counts) < 0:
        raise ValueError(f"counts {tuple(counts)} must be three non-negative numbers summing to {len(ids)} case ids.")
    order = np.random.default_rng(seed).permutation(len(ids))
    labels = np.repeat(np.array(SPLITS), counts)
    out = {ids[i]: str(split) for i, split in zip(order, labels)}
    return {cid: out[cid] for cid in ids}


def _read_condistfl(path: Path, dataset: str) -> dict[str, str]:
    lists = json.loads(path.read_text())
    return {
        condistfl_case_id(dataset, entry["image"]): split
        for key, split in _CONDISTFL_LISTS.items()
        for entry in lists.get(key, [])
    }


def build_manifest(
    condistfl_dir: Path | None, base: pd.DataFrame | None = None, seed: int = FALLBACK_SEED
) -> pd.DataFrame:
    """Rebuild the manifest from ConDistFL's datalists (NVFlare research/condist-fl/data).

    A dataset whose datalist is missing, or whose counts differ from TABLE1, gets `seeded_split`
    over its case ids (from the datalist, else from `base`, e.g. the current manifest).
    """
    rows: list[dict[str, str]] = []
    for dataset in DATASETS:
        if dataset == "btcv":
            assignment, source = dict.fromkeys(BTCV_IDS, "test"), "paper"
        else:
            path = Path(condistfl_dir or "") / CONDISTFL_FOLDERS[dataset] / "datalist.json"
            assignment = _read_condistfl(path, dataset) if condistfl_dir and path.is_file() else {}
            counts = tuple(list(assignment.values()).count(s) for s in SPLITS)
            source = "condistfl"
            if counts != TABLE1[dataset]:
                ids = list(assignment)
                if not ids and base is not None:
                    ids = base.loc[base["dataset"] == dataset, "case_id"].tolist()
                if not ids:
                    raise ValueError(f"no ConDistFL datalist and no base rows for {dataset}; "
                                     "pass condistfl_dir or base.")
                assignment, source = seeded_split(ids, TABLE1[dataset], seed), "seeded"
        for case_id in sorted(assignment, key=_number):
            image, label = relative_paths(dataset, case_id)
            rows.append(dict(dataset=dataset, case_id=case_id, image=image, label=label,
                             split=assignment[case_id], split_source=source))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def load_manifest(path: str | Path = MANIFEST_PATH) -> pd.DataFrame:
    """Read and validate a manifest CSV (columns, dataset names, split values, unique case ids)."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fix = "fix the file or regenerate it with `python -m fedseg.data.manifest --condistfl-dir DIR`"
    if tuple(df.columns) != COLUMNS:
        raise ValueError(f"{path} has columns {list(df.columns)} instead of {list(COLUMNS)}; {fix}.")
    for column, allowed in (("dataset", DATASETS), ("split", SPLITS), ("split_source", SPLIT_SOURCES)):
        bad = sorted(set(df[column]) - set(allowed))
        if bad:
            raise ValueError(f"{path} has {column} values {bad} outside {list(allowed)}; {fix}.")
    if (df[["case_id", "image", "label"]] == "").any().any():
        raise ValueError(f"{path} has empty case_id, image or label cells; {fix}.")
    dup = df[df.duplicated(["dataset", "case_id"], keep=False)]
    if not dup.empty:
        pairs = sorted(set(zip(dup["dataset"], dup["case_id"])))[:5]
        raise ValueError(f"{path} lists (dataset, case_id) {pairs} more than once; {fix}.")
    return df


def split_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Cases per dataset (rows, study order) and split (columns train/val/test/total): Table 1."""
    table = pd.crosstab(df["dataset"], df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    order = [d for d in DATASETS if d in table.index] + sorted(set(table.index) - set(DATASETS))
    table = table.reindex(order).astype(int)
    table["total"] = table.sum(axis=1)
    table.columns.name = None
    return table


def subset_manifest(df: pd.DataFrame, scale: float, minimum: Sequence[int] = (2, 1, 1)) -> pd.DataFrame:
    """First n cases of each (dataset, split) in manifest order, n = min(count, max(minimum, round(count * scale))).

    Used for small synthetic datasets whose case ids and splits are a subset of the real ones.
    `minimum` is (train, val, test) or (train, val, test, external): a test-only dataset (BTCV) keeps at
    least `external` cases, else max(2, test). Empty splits stay empty.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")
    if len(minimum) not in (3, 4):
        raise ValueError(f"minimum cases {list(minimum)}: give (train, val, test) or (train, val, test, external).")
    test_only = {d for d, s in df.groupby("dataset")["split"] if set(s) == {"test"}}
    limits: dict[tuple[str, str], int] = {}
    for (dataset, split), count in df.groupby(["dataset", "split"]).size().items():
        low = minimum[SPLITS.index(split)]
        if dataset in test_only:
            low = int(minimum[3]) if len(minimum) == 4 else max(2, low)
        limits[(dataset, split)] = min(int(count), max(low, round(count * scale)))
    rank = df.groupby(["dataset", "split"], sort=False).cumcount()
    keep = [r < limits[(d, s)] for r, d, s in zip(rank, df["dataset"], df["split"])]
    return df[keep].reset_index(drop=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Print Table 1 from the manifest, or rebuild it from ConDistFL's datalists with --condistfl-dir."""
    parser = argparse.ArgumentParser(prog="python -m fedseg.data.manifest", description=main.__doc__)
    parser.add_argument("--condistfl-dir", type=Path, help="NVFlare's research/condist-fl/data folder")
    parser.add_argument("--out", type=Path, default=MANIFEST_PATH, help="manifest CSV to read or write")
    parser.add_argument("--check", action="store_true", help="with --condistfl-dir: compare instead of writing")
    args = parser.parse_args(argv)
    if args.condistfl_dir is None:
        df = load_manifest(args.out)
    else:
        base = load_manifest(args.out) if args.out.is_file() else None
        df = build_manifest(args.condistfl_dir, base)
        if args.check:
            same = base is not None and base.equals(df)
            print(f"{args.out}: {'matches' if same else 'DIFFERS FROM'} the rebuilt manifest")
            if not same:
                return 1
        else:
            df.to_csv(args.out, index=False)
            print(f"wrote {len(df)} rows to {args.out}")
    print(split_counts(df).to_string())
    print(df.groupby("dataset", sort=False)["split_source"].first().to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
