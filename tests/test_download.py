"""Tests for fedseg.data.download against a real HTTP server on 127.0.0.1 (Range/206 support, faults injected)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.data import download as dl
from fedseg.data.download import (
    ChecksumError,
    DownloadError,
    LoginRequired,
    download,
    extract,
    fetch_dataset,
)


def _targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FILES = {
    "Task09_Spleen/dataset.json": b'{"name": "Spleen"}',
    "Task09_Spleen/imagesTr/spleen_2.nii.gz": bytes(range(256)) * 40,
    "Task09_Spleen/labelsTr/spleen_2.nii.gz": b"label" * 500,
    "Task09_Spleen/imagesTr/._spleen_2.nii.gz": b"AppleDouble",
}
ARCHIVE = _targz(FILES)
MD5 = hashlib.md5(ARCHIVE).hexdigest()
SHA256 = hashlib.sha256(ARCHIVE).hexdigest()


class Server:
    """Serves `content[path]`; `mode` injects faults: "ok", "corrupt", "cut_first" (first request sends
    half the body and drops the connection), "no_range" (ignores Range, always 200)."""

    def __init__(self):
        self.content: dict[str, bytes] = {}
        self.mode = "ok"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.content.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if server.mode == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                if server.mode == "cut_first" and len(server.requests) == 1:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                start = 0
                if rng and server.mode != "no_range":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as srv:
        srv.content["/Task09_Spleen.tar.gz"] = ARCHIVE
        yield srv


FAST = dict(progress=False, backoff=0.0, timeout=5.0)


def test_clean_download_checksum_and_extract(server, tmp_path):
    dest = tmp_path / "dl" / "Task09_Spleen.tar.gz"
    out = download(server.url + "/Task09_Spleen.tar.gz", dest, md5=MD5, sha256=SHA256, **FAST)
    assert out == dest and dest.read_bytes() == ARCHIVE
    assert not dest.with_name(dest.name + ".part").exists()
    assert server.requests == [("/Task09_Spleen.tar.gz", None)]

    target = extract(dest, tmp_path / "data" / "Task09_Spleen", subdir="Task09_Spleen")
    for name, data in FILES.items():
        path = tmp_path / "data" / name
        if Path(name).name.startswith("._"):
            assert not path.exists()  # macOS junk is skipped
        else:
            assert path.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["Task09_Spleen"]  # no temp folder left
    assert target == tmp_path / "data" / "Task09_Spleen"


def test_corrupted_transfer_raises_and_leaves_nothing(server, tmp_path):
    server.mode = "corrupt"
    dest = tmp_path / "Task09_Spleen.tar.gz"
    url = server.url + "/Task09_Spleen.tar.gz"
    with pytest.raises(ChecksumError) as info:
        download(url, dest, md5=MD5, **FAST)
    message = str(info.value)
    assert url in message and MD5 in message
    corrupt = bytearray(ARCHIVE)
    corrupt[100] ^= 0xFF
    assert hashlib.md5(bytes(corrupt)).hexdigest() in message  # the actual checksum is named
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no .part either

    server.mode = "ok"  # next call starts afresh (nothing corrupt to resume from) and succeeds
    download(url, dest, md5=MD5, **FAST)
    assert dest.read_bytes() == ARCHIVE
    assert server.requests[-1][1] is None


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.mode = "cut_first"
    dest = tmp_path / "Task09_Spleen.tar.gz"
    download(server.url + "/Task09_Spleen.tar.gz", dest, sha256=SHA256, retries=2, **FAST)
    half = len(ARCHIVE) // 2
    assert [r for _, r in server.requests] == [None, f"bytes={half}-"]
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256
    assert not dest.with_name(dest.name + ".part").exists()


def test_interrupted_call_fails_then_next_call_resumes(server, tmp_path):
    server.mode = "cut_first"
    dest = tmp_path / "Task09_Spleen.tar.gz"
    part = tmp_path / "Task09_Spleen.tar.gz.part"
    url = server.url + "/Task09_Spleen.tar.gz"
    with pytest.raises(DownloadError, match="resume"):
        download(url, dest, md5=MD5, retries=0, **FAST)
    half = len(ARCHIVE) // 2
    assert not dest.exists()  # the half file is never taken as data
    assert part.stat().st_size == half
    download(url, dest, md5=MD5, retries=0, **FAST)
    assert server.requests[-1][1] == f"bytes={half}-"
    assert dest.read_bytes() == ARCHIVE


def test_server_without_range_support_restarts(server, tmp_path):
    dest = tmp_path / "Task09_Spleen.tar.gz"
    part = tmp_path / "Task09_Spleen.tar.gz.part"
    stale = b"stale bytes that must not survive"
    part.write_bytes(stale)
    server.mode = "no_range"
    download(server.url + "/Task09_Spleen.tar.gz", dest, md5=MD5, **FAST)
    assert [r for _, r in server.requests] == [f"bytes={len(stale)}-"]  # asked to resume, got 200
    assert dest.read_bytes() == ARCHIVE


def test_existing_complete_file_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "Task09_Spleen.tar.gz"
    dest.write_bytes(ARCHIVE)
    assert download(server.url + "/Task09_Spleen.tar.gz", dest, md5=MD5, **FAST) == dest
    assert server.requests == []
    dest.write_bytes(ARCHIVE[:-1])  # a different file under the name: refuse, do not overwrite silently
    with pytest.raises(ChecksumError, match="already exists"):
        download(server.url + "/Task09_Spleen.tar.gz", dest, md5=MD5, **FAST)
    assert server.requests == []


def test_missing_url_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + "/nope.tar", tmp_path / "nope.tar", retries=3, **FAST)
    assert len(server.requests) == 1


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_extract_refuses_unsafe_members(tmp_path, name):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_targz({"ok/a.txt": b"a", name: b"evil"}))
    with pytest.raises(DownloadError, match="unsafe"):
        extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]  # nothing half-extracted left
    assert not (tmp_path.parent / "evil.txt").exists()


def test_extract_zip_and_refuse_existing(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("img/img0001.nii.gz", b"x")
        zf.writestr("__MACOSX/img/._img0001.nii.gz", b"junk")
    out = extract(archive, tmp_path / "BTCV")
    assert (out / "img" / "img0001.nii.gz").read_bytes() == b"x"
    assert not (out / "__MACOSX").exists()
    with pytest.raises(FileExistsError):
        extract(archive, tmp_path / "BTCV")


def _nifti_gz(values) -> bytes:
    img = nib.Nifti1Image(np.asarray(values, dtype=np.uint8).reshape(2, 2, 2), np.eye(4))
    return gzip.compress(img.to_bytes())


def test_fetch_msd_and_kits19_from_local_sources(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.SOURCES, "spleen", dl.Source(
        url=server.url + "/Task09_Spleen.tar.gz", md5=MD5, archive_root="Task09_Spleen"))
    root = tmp_path / "root"
    target = fetch_dataset("spleen", root, progress=False)
    assert target == root / "Task09_Spleen"
    assert (target / "dataset.json").read_bytes() == FILES["Task09_Spleen/dataset.json"]
    assert not (root / ".downloads" / "Task09_Spleen.tar.gz").exists()
    n = len(server.requests)
    fetch_dataset("spleen", root, progress=False)  # complete: nothing fetched
    assert len(server.requests) == n

    nii = _nifti_gz(range(8))
    server.content.update({"/img/case_00000.nii.gz": nii, "/seg/case_00000/s.nii.gz": nii,
                           "/img/case_00001.nii.gz": b"not gzip", "/seg/case_00001/s.nii.gz": nii})
    monkeypatch.setitem(dl.SOURCES, "kits19", dl.Source(
        image_url=server.url + "/img/{case}.nii.gz", label_url=server.url + "/seg/{case}/s.nii.gz",
        cases=("case_00000", "case_00001")))
    with pytest.raises(DownloadError, match="not a complete gzip"):
        fetch_dataset("kits19", root, progress=False)
    data = root / "kits19" / "data"
    assert (data / "case_00000" / "imaging.nii.gz").read_bytes() == nii
    assert (data / "case_00000" / "segmentation.nii.gz").read_bytes() == nii
    assert not (data / "case_00001" / "imaging.nii.gz").exists()
    assert not (data / "case_00001" / "imaging.nii.gz.part").exists()


def test_btcv_needs_login_and_says_where(tmp_path):
    with pytest.raises(LoginRequired) as info:
        fetch_dataset("btcv", tmp_path)
    message = str(info.value)
    assert "RawData.zip" in message and "RawData/Training/img" in message
    assert str(tmp_path / "BTCV" / "img" / "img0001.nii.gz") in message
    assert str(tmp_path / "BTCV" / "label" / "label0001.nii.gz") in message
    assert "btcv" not in dl.SOURCES


def test_sources_match_monai():
    # Read MONAI's DecathlonDataset source text rather than importing monai.apps (torch import is slow).
    spec = importlib.util.find_spec("monai")
    text = (Path(spec.origin).parent / "apps" / "datasets.py").read_text()
    for dataset, task in (("liver", "Task03_Liver"), ("pancreas", "Task07_Pancreas"), ("spleen", "Task09_Spleen")):
        assert f'"{task}": "{dl.SOURCES[dataset].url}"' in text
        assert f'"{task}": "{dl.SOURCES[dataset].md5}"' in text
    assert len(dl.SOURCES["kits19"].cases) == 210
