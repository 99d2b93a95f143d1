"""What a run records besides its results: package versions, the host (CPU, threads, torch's deterministic
settings), the peak memory of a notebook's kernel, and `run.json` itself, written with this machine's paths made
portable."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedseg.config import repo_root

VERSIONED_PACKAGES = (
    "fedseg", "torch", "monai", "flwr", "numpy", "nibabel", "pandas", "papermill", "matplotlib", "ray",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_record() -> dict[str, Any]:
    """What a run's numbers depend on beyond the code and settings: the CPU, the thread counts the
    notebooks' kernels inherit (OMP/MKL variables; torch's own default is the number of cores) and
    torch's deterministic settings. Float sums in convolutions differ with the thread count, so two
    machines agree to rounding, not bit for bit (see docs/reproducibility.md)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def portable(value: Any, run_dir: Path) -> Any:
    """`value` with this machine's absolute paths replaced by placeholders (`<run_dir>`, `<repo>`,
    `<home>`), so a committed run.json names no machine's folders."""
    if isinstance(value, dict):
        return {k: portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, run_dir) for v in value]
    if isinstance(value, str):
        for path, name in ((str(run_dir), "<run_dir>"), (str(repo_root()), "<repo>"), (str(Path.home()), "<home>")):
            if path and path != "/":
                value = value.replace(path, name)
    return value


class PeakMemory:
    """Samples the resident memory of a process tree (the notebook's kernel and its children)."""
    def __init__(self, interval: float = 0.25):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._root = psutil.Process()

    def _tree_rss(self) -> int:
        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(portable(record, path.parent.resolve()), indent=2, default=str))
    os.replace(tmp, path)
