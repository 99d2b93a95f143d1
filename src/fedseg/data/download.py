"""Downloading and unpacking the study's public datasets, resumable and atomic.

`download` fetches one file: it writes `<dest>.part`, resumes an interrupted transfer with an HTTP
`Range` request, verifies the checksum of the complete file and only then renames it to `dest`
(`os.replace`, same folder, atomic). `extract` unpacks an archive into a hidden sibling folder and
renames that into place. So a file or dataset folder under its real name is always complete: a
half-downloaded or half-extracted one is never taken as data.

Why hand-written and not `monai.apps.download_url` / `monai.apps.extractall` (checked against the
installed MONAI 1.6.1, monai/apps/utils.py): MONAI verifies the hash before moving the file into
place and downloads into a temporary folder, so a failed transfer never leaves a file under the
final name; but it cannot resume (an interrupted multi-GB MSD tar restarts from byte 0), its temporary
folder is in the system temp dir so the final `shutil.move` is a copy, not an atomic rename, whenever
/tmp is another filesystem (and /tmp must hold the whole archive), and it silently ignores a
PermissionError / NotADirectoryError raised anywhere in the download or the move. Its `extractall` extracts
straight into the target folder and skips extraction when that folder is non-empty, so a half-extracted folder
would be taken as done.

Sources: MSD URLs and md5 checksums are the ones MONAI's `DecathlonDataset.resource` / `.md5` use.
KiTS19 follows the official starter code (github.com/neheller/kits19, commit 456b293, 2026-05-13):
`starter_code/get_imaging.py` downloads each case's imaging from the Hugging Face dataset
`neheller/KiTS-Challenge-Imaging` (`images/case_XXXXX.nii.gz`; it used a DigitalOcean bucket before),
and the segmentations are files of the repository itself (`data/case_XXXXX/segmentation.nii.gz`).
BTCV needs a Synapse login, so it has no URL here: see `btcv_instructions`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from fedseg.data.catalogue import CATALOGUE, Source
from fedseg.data.layouts import DATASET_DIRS, dataset_dir

USER_AGENT = "fedseg-download/0.1"

#: HTTP statuses that will not get better by retrying.
_FATAL_HTTP = {400, 401, 403, 404, 405, 410, 451}


class DownloadError(RuntimeError):
    """A download or extraction failed; the message names the URL or file and what to do."""

class ChecksumError(DownloadError):
    """The complete downloaded file does not have the expected checksum."""

class LoginRequired(DownloadError):
    """The dataset cannot be downloaded without an account; the message says where to put the files."""

# --------------------------------------------------------------------------------------------------
# Checksums and file checks
# --------------------------------------------------------------------------------------------------


def file_hashes(path: str | Path, chunk: int = 1 << 20) -> dict[str, str]:
    """md5 and sha256 hex digests of a file, computed in one pass."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _expected(md5: str | None, sha256: str | None) -> dict[str, str]:
    return {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}


def _mismatch(path: Path, expected: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{algorithm: (expected, actual)} for every expected checksum the file does not have."""
    if not expected:
        return {}
    actual = file_hashes(path)
    return {k: (v, actual[k]) for k, v in expected.items() if actual[k] != v}


def check_gzip_nifti(path: str | Path) -> None:
    """Raise `DownloadError` unless `path` is a complete gzip stream holding a NIfTI-1/2 header.

    Used for files without a published checksum (KiTS19): decompressing to the end checks the gzip
    CRC and length, so a truncated or altered file fails here.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(544)
            while f.read(1 << 20):
                pass
    except (OSError, EOFError) as err:
        raise DownloadError(f"{path} is not a complete gzip file ({err}): delete it and download it again.") from err
    nifti1 = len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0")
    nifti2 = len(head) >= 540 and head[4:8] in (b"n+2\0", b"ni2\0")
    if not (nifti1 or nifti2):
        raise DownloadError(f"{path} is gzip but not a NIfTI image: delete it and check the source URL.")


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, chunk: int, timeout: float, progress: bool) -> None:
    """One attempt: append the rest of `url` to `part` (or rewrite it); raise if the body ends early."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left after `offset`: the .part is complete (or too long)
            return
        raise
    with response:
        status = response.status
        content_range = response.headers.get("Content-Range", "")
        if offset and status == 206 and content_range.startswith(f"bytes {offset}-"):
            mode = "ab"
        else:  # 200 (server ignores Range) or a range we did not ask for: start again
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        written = offset
        with open(part, mode) as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=Path(part.name).stem, disable=not progress, leave=False,
        ) as bar:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                f.write(block)
                written += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and written < total:
        raise http.client.IncompleteRead(b"", total - written)


def download(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    chunk: int = 1 << 20,
    retries: int = 3,
    progress: bool = True,
    backoff: float = 2.0,
    timeout: float = 60.0,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Download `url` to `dest`, resumable and atomic; returns `dest`.

    Bytes go to `dest + ".part"`; a failed attempt is retried `retries` times (sleeping `backoff`,
    doubled each time) and resumes from the .part's size with `Range: bytes=N-` when the server answers
    206 (a 200 answer restarts from 0). A .part left by an earlier call is resumed the same way. The
    complete file's `md5`/`sha256` (and `check(path)`, e.g. `check_gzip_nifti`) are verified BEFORE the
    atomic `os.replace` to `dest`; a mismatch deletes the .part and raises `ChecksumError` naming the
    URL and the expected and actual checksums. An existing `dest` with the expected checksum is not
    downloaded again; one with another checksum raises (delete it to download again). Without any
    checksum, an existing `dest` is trusted: only this function's final rename creates it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    expected = _expected(md5, sha256)

    if dest.exists():
        bad = _mismatch(dest, expected)
        if bad:
            detail = "; ".join(f"expected {k} {e}, actual {a}" for k, (e, a) in bad.items())
            raise ChecksumError(
                f"{dest} already exists but does not match {url} ({detail}): delete it to download it again."
            )
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    attempts = max(0, int(retries)) + 1
    for attempt in range(attempts):
        try:
            _transfer(url, part, chunk, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code in _FATAL_HTTP or attempt == attempts - 1:
                kept = f"; the partial file {part} is kept for resuming" if part.exists() else ""
                raise DownloadError(
                    f"Download of {url} failed with HTTP {err.code} {err.reason}: check the URL or your access{kept}."
                ) from err
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, IncompleteRead
            if attempt == attempts - 1:
                raise DownloadError(
                    f"Download of {url} failed after {attempts} attempt(s) ({type(err).__name__}: {err}); "
                    f"call download again to resume from {part}."
                ) from err
        time.sleep(backoff * (2**attempt))

    bad = _mismatch(part, expected)
    if bad:
        part.unlink(missing_ok=True)
        detail = "; ".join(f"expected {k} {e}, actual {a}" for k, (e, a) in bad.items())
        raise ChecksumError(
            f"Checksum mismatch for {url} ({detail}): the corrupt download was deleted; try again, and if it "
            "persists the source has changed."
        )
    if check is not None:
        try:
            check(part)
        except Exception:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------------


def _unsafe(name: str) -> bool:
    pure = PurePosixPath(name.replace("\\", "/"))
    return name.startswith(("/", "\\")) or pure.is_absolute() or ".." in pure.parts or (
        len(name) > 1 and name[1] == ":"  # Windows drive letter
    )


def _skip(name: str) -> bool:
    """macOS AppleDouble `._*` files and `__MACOSX/` folders that some archives (MSD) carry."""
    parts = PurePosixPath(name).parts
    return any(p.startswith("._") or p == "__MACOSX" for p in parts)


def extract(archive: str | Path, dest_dir: str | Path, *, subdir: str | None = None) -> Path:
    """Unpack a .tar / .tar.gz / .tgz / .zip into `dest_dir`, atomically; returns `dest_dir`.

    Everything is extracted into a hidden temporary sibling of `dest_dir`, which is renamed into place
    only when complete; on any error it is removed, so a half-extracted dataset never appears. Members
    with absolute paths or `..` are refused (and tar members go through `filter="data"`); macOS `._*`
    files are skipped. With `subdir`, that folder of the archive becomes `dest_dir` (MSD tars hold
    `Task03_Liver/...`). Raises `FileExistsError` if `dest_dir` exists.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if dest_dir.exists():
        raise FileExistsError(f"{dest_dir} already exists: delete it to extract {archive} again.")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.extracting-", dir=dest_dir.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if not _skip(n)]
                for name in names:
                    if _unsafe(name):
                        raise DownloadError(f"{archive} has an unsafe member path {name!r}: refusing to extract it.")
                zf.extractall(tmp, members=names)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = [m for m in tf.getmembers() if not _skip(m.name)]
                for m in members:
                    if _unsafe(m.name):
                        raise DownloadError(f"{archive} has an unsafe member path {m.name!r}: refusing to extract it.")
                tf.extractall(tmp, members=members, filter="data")
        else:
            raise DownloadError(f"{archive} is neither a tar nor a zip archive: delete it and download it again.")
        source = tmp / subdir if subdir else tmp
        if not source.is_dir():
            raise DownloadError(f"{archive} has no folder {subdir!r}: check that it is the right archive.")
        os.replace(source, dest_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, tarfile.FilterError):
            raise DownloadError(f"{archive} has an unsafe member ({err}): refusing to extract it.") from err
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------

#: Each dataset's download without a login (`catalogue.Dataset.source`); BTCV needs a Synapse login.
SOURCES: dict[str, Source] = {d.name: d.source for d in CATALOGUE if d.source is not None}


def btcv_instructions(data_root: str | Path) -> str:
    """Where to put the BTCV files, which need a Synapse login to download."""
    root = dataset_dir(data_root, "btcv")
    return (
        "BTCV needs a Synapse account, so fedseg cannot download it. Log in at "
        "https://www.synapse.org/#!Synapse:syn3193805/wiki/217789 (Multi-Atlas Labeling Beyond the Cranial "
        "Vault), download \"RawData.zip\" from its Files, and copy the 30 labelled training cases out of it:\n"
        f"  RawData/Training/img/img0001.nii.gz ...   -> {root / 'img' / 'img0001.nii.gz'} ...\n"
        f"  RawData/Training/label/label0001.nii.gz ... -> {root / 'label' / 'label0001.nii.gz'} ...\n"
        "(for example: unzip RawData.zip, then move RawData/Training/img and RawData/Training/label to "
        f"{root}/img and {root}/label). Then check them with fedseg.data.datasets.check_dataset(data_root, 'btcv')."
    )


def fetch_dataset(dataset: str, data_root: str | Path, progress: bool = True, keep_archive: bool = False) -> Path:
    """Download and extract one dataset into `dataset_dir(data_root, dataset)`; returns that folder.

    What is already complete is skipped: an MSD folder exists only once fully extracted (atomic rename),
    a KiTS19 file only once fully downloaded. The MSD tar goes to `<data_root>/.downloads/` (resumable)
    and is deleted after extraction unless `keep_archive`. BTCV raises `LoginRequired` with
    `btcv_instructions`. Run `fedseg.data.datasets.check_dataset` afterwards to validate every case.
    """
    if dataset == "btcv":
        raise LoginRequired(btcv_instructions(data_root))
    if dataset not in SOURCES:
        known = ", ".join([*SOURCES, "btcv"]) if dataset not in DATASET_DIRS else ", ".join(SOURCES)
        raise ValueError(f"No download source for {dataset!r}: use one of {known}.")
    source = SOURCES[dataset]
    target = dataset_dir(data_root, dataset)

    if source.url is not None:
        if target.is_dir():
            return target
        archive = Path(data_root) / ".downloads" / Path(source.url).name
        download(source.url, archive, md5=source.md5, progress=progress)
        extract(archive, target, subdir=source.archive_root)
        if not keep_archive:
            archive.unlink(missing_ok=True)
        return target


    for case in tqdm(source.cases, desc=f"fetch {dataset}", unit="case", disable=not progress):
        for template, name in ((source.image_url, "imaging.nii.gz"), (source.label_url, "segmentation.nii.gz")):
            download(
                template.format(case=case), target / case / name,
                progress=False, check=check_gzip_nifti,
            )
    return target
