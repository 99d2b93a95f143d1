"""Writing the datasets: storage orientation, reproducible .nii.gz bytes, each case's files, MSD dataset.json,
the local manifest and phantom.json, reuse of a finished generation (`generate`), `generation` and `clear`.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    ornt_transform,
)
from tqdm.auto import tqdm

from fedseg.data.catalogue import BY_NAME, CATALOGUE
from fedseg.data.layouts import DATASET_DIRS, LOCAL_MANIFEST
from fedseg.data.manifest import load_manifest, subset_manifest
from fedseg.data.phantom.acquisition import SCANNERS
from fedseg.data.phantom.case import simulate_case
from fedseg.data.phantom.intensity import DOMAINS, PHASE_CHOICES

#: Bump when the generator's output changes for the same parameters (phantom.json records it).
PHANTOM_VERSION = "3.0.0"
PHANTOM_FILE = "phantom.json"
_IN_PROGRESS = ".phantom-in-progress"


#: MSD dataset.json fields of the three MSD tasks.
_MSD_JSON = {d.name: d.phantom.msd_json for d in CATALOGUE if d.phantom.msd_json}


def to_storage(array: np.ndarray, affine: np.ndarray, axcodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a canonical RAS array to the dataset's storage axis codes; the affine follows."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    """A .nii.gz as bytes, reproducibly: gzip with mtime 0 and no file name in its header."""
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_case(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: simulate one case and write its image and label (each atomically)."""
    start = time.perf_counter()
    case = simulate_case(job["dataset"], job["case_id"], seed=job["seed"], inplane_zoom=job["inplane_zoom"],
                         slice_zoom=job["slice_zoom"], mri_like=job["mri"], domain=job["domain"],
                         phases=job["phases"])
    axcodes = SCANNERS[job["dataset"]]["axcodes"]
    image, affine = to_storage(case["image"], case["affine"], axcodes)
    label, _ = to_storage(case["label"], case["affine"], axcodes)
    tag = f"fedseg phantom {PHANTOM_VERSION} {job['dataset']}"
    root = Path(job["root"])
    kind = " MRI-like" if job["mri"] else {"ct": " CT", "randomised": " randomised", "other_scanner": " CT scanner B"}[
        job["domain"]]
    _atomic_write(root / job["image"], nifti_bytes(image, affine, tag + kind))
    _atomic_write(root / job["label"], nifti_bytes(label, affine, tag + " label"))
    return dict(dataset=job["dataset"], case_id=job["case_id"], shape=list(image.shape),
                spacing=[round(float(s), 3) for s in voxel_sizes(affine)],
                axcodes="".join(axcodes), labels=np.flatnonzero(np.bincount(label.ravel(), minlength=1)).tolist(),
                tumours=case["tumours"], acquisition=case["acquisition"], seconds=time.perf_counter() - start)


def _msd_json(dataset: str, rows: pd.DataFrame, mri: bool) -> bytes:
    name, labels = _MSD_JSON[dataset]
    doc = {
        "name": name,
        "description": f"fedseg synthetic {name} (phantom {PHANTOM_VERSION}), in the layout of MSD "
                       f"{DATASET_DIRS[dataset]}",
        "reference": "fedseg.data.phantom (synthetic; not the Medical Segmentation Decathlon data)",
        "licence": "CC-BY-SA 4.0",
        "release": PHANTOM_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI-like (synthetic)" if mri else "CT"},
        "labels": labels,
        "numTraining": int(len(rows)),
        "numTest": 0,
        "training": [{"image": f"./{r.image}", "label": f"./{r.label}"} for r in rows.itertuples()],
        "test": [],
    }
    return (json.dumps(doc, indent=4) + "\n").encode()


def _parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets, domain,
                phases) -> dict[str, Any]:
    return dict(seed=int(seed), case_scale=float(case_scale), min_cases=[int(m) for m in min_cases],
                inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom),
                mri_like=sorted(mri_like), datasets=None if datasets is None else sorted(datasets), domain=str(domain),
                phases=str(phases))


def _is_current(root: Path, record: dict[str, Any]) -> bool:
    """True when `root` holds a finished generation with the same version and parameters."""
    marker, manifest = root / PHANTOM_FILE, root / LOCAL_MANIFEST
    if not (marker.is_file() and manifest.is_file()) or (root / _IN_PROGRESS).exists():
        return False
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if old.get("version") != record["version"] or old.get("parameters") != record["parameters"]:
        return False
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    return all((root / DATASET_DIRS[r.dataset] / p).is_file() for r in rows.itertuples() for p in (r.image, r.label))


def _refuse_real_data(root: Path) -> None:
    """Never write the phantom over a folder that holds data it did not write."""
    if (root / PHANTOM_FILE).exists() or (root / _IN_PROGRESS).exists():
        return
    for folder in DATASET_DIRS.values():
        if (root / folder).is_dir() and any((root / folder).rglob("*.nii*")):
            raise FileExistsError(f"{root / folder} holds NIfTI files the phantom did not write (real data?); "
                                  f"choose another data_root for the synthetic data.")


def generate(data_root: str | Path, *, seed: int = 0, case_scale: float = 0.1,
             min_cases: Sequence[int] = (2, 1, 1), inplane_zoom: float = 4.0, slice_zoom: float = 1.5,
             mri_like: Sequence[str] = (), datasets: Sequence[str] | None = None, domain: str = "ct",
             phases: str = "published", workers: int | None = None, progress: bool = True) -> Path:
    """Write the synthetic datasets under `data_root` in the real layouts; returns `data_root`.

    Cases are `subset_manifest(load_manifest(), case_scale, min_cases)` (optionally only `datasets`);
    voxel sizes are the real ones times `inplane_zoom` / `slice_zoom`; `mri_like` datasets get an
    MRI-like contrast; `domain` (`DOMAINS`) the image domain ("randomised" applies to the training
    datasets only: the external test set stays realistic CT); `phases` (`PHASE_CHOICES`) each case's contrast
    phase: the dataset's published mix, every phase for the training datasets ("all"), or one phase for all.
    Files: each case's image (int16) and label (uint8) .nii.gz, an MSD `dataset.json` per MSD task,
    `manifest.csv` (the subset, written last) and `phantom.json` (the parameters and each case's acquisition,
    written at the very end). A finished generation with the
    same parameters is reused as it is; the same parameters always give the same bytes.
    """
    root = Path(data_root)
    unknown = sorted(set(mri_like).union(datasets or ()) - set(SCANNERS))
    if unknown:
        raise ValueError(f"Unknown dataset(s) {unknown} in mri_like/datasets: use names from {list(SCANNERS)}.")
    if domain not in DOMAINS:
        raise ValueError(f"Unknown phantom domain {domain!r} (data.phantom.domain): use one of {', '.join(DOMAINS)}.")
    if phases not in PHASE_CHOICES:
        raise ValueError(f"Unknown data.phantom.phases {phases!r}: use one of {', '.join(PHASE_CHOICES)}.")
    if min(inplane_zoom, slice_zoom) <= 0:
        raise ValueError(f"inplane_zoom and slice_zoom must be positive, got {inplane_zoom}, {slice_zoom}.")
    record = dict(generator="fedseg.data.phantom", version=PHANTOM_VERSION,
                  parameters=_parameters(seed, case_scale, min_cases, inplane_zoom, slice_zoom, mri_like, datasets,
                                         domain, phases))
    if _is_current(root, record):
        if progress:
            print(f"phantom: {root} already holds this generation (same parameters, version "
                  f"{PHANTOM_VERSION}); reusing it.")
        return root
    _refuse_real_data(root)
    manifest = subset_manifest(load_manifest(), case_scale, tuple(min_cases))
    if datasets is not None:
        manifest = manifest[manifest["dataset"].isin(list(datasets))].reset_index(drop=True)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / _IN_PROGRESS, json.dumps(record).encode())
    for stale in (PHANTOM_FILE, LOCAL_MANIFEST):  # an interrupted run must never look finished
        (root / stale).unlink(missing_ok=True)
    jobs = [dict(dataset=r.dataset, case_id=r.case_id, image=f"{DATASET_DIRS[r.dataset]}/{r.image}",
                 label=f"{DATASET_DIRS[r.dataset]}/{r.label}", root=str(root), seed=int(seed),
                 inplane_zoom=float(inplane_zoom), slice_zoom=float(slice_zoom), mri=r.dataset in set(mri_like),
                 domain="ct" if domain == "randomised" and BY_NAME[r.dataset].role != "train" else domain,
                 phases=phases)
            for r in manifest.itertuples()]
    start = time.perf_counter()
    results = _run_jobs(jobs, workers, progress)
    for dataset in _MSD_JSON:
        rows = manifest[manifest["dataset"] == dataset]
        if len(rows):
            _atomic_write(root / DATASET_DIRS[dataset] / "dataset.json", _msd_json(dataset, rows, dataset in mri_like))
    _atomic_write(root / LOCAL_MANIFEST, manifest.to_csv(index=False).encode())
    order = {(j["dataset"], j["case_id"]): i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: order[(r["dataset"], r["case_id"])])
    record["cases"] = [{k: v for k, v in r.items() if k != "seconds"} for r in results]
    _atomic_write(root / PHANTOM_FILE, (json.dumps(record, indent=1) + "\n").encode())
    (root / _IN_PROGRESS).unlink(missing_ok=True)
    if progress:
        print(f"phantom: wrote {len(jobs)} cases to {root} in {time.perf_counter() - start:.1f} s")
    return root


def _run_jobs(jobs: list[dict[str, Any]], workers: int | None, progress: bool) -> list[dict[str, Any]]:

    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    bar = tqdm(total=len(jobs), desc="phantom", unit="case", disable=not progress)
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_write_case(job))
                bar.update()
        else:
            # fork on Linux (fast, and scripts need no __main__ guard), spawn elsewhere; the cases do
            # not depend on the scheduling
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                for result in pool.map(_write_case, jobs, chunksize=1):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


def generation(data_root: str | Path) -> dict[str, Any] | None:
    """The generator version and parameters a synthetic data root was written with (its phantom.json), or None
    for a root the phantom did not write (real data)."""
    try:
        record = json.loads((Path(data_root) / PHANTOM_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"version": record.get("version"), "parameters": record.get("parameters")}


def clear(data_root: str | Path) -> None:
    """Delete a synthetic data root the phantom wrote (refuses folders without its phantom.json)."""
    root = Path(data_root)
    if not ((root / PHANTOM_FILE).exists() or (root / _IN_PROGRESS).exists()):
        raise FileNotFoundError(f"{root} has no {PHANTOM_FILE}: not a phantom data root, not deleting it.")
    shutil.rmtree(root)
