"""Where a run works and with what: the profiles (smoke, laptop, paper), their resolution into the
configuration every notebook works from (`resolve`), and the project a run reads `data/` from and writes
`results/` into (`repo_root`). The bottom layer: it imports nothing else of fedseg.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PROFILE_NAMES = ("smoke", "laptop", "paper")
#: A run's own profile, written into its folder before the chain when the run derives one (`run_contrast`).
PROFILE_FILE = "profile.yaml"


#: Environment variable naming the project folder a run reads `data/` from and writes `results/` into.
HOME_ENV = "FEDSEG_HOME"


def _is_project(folder: Path) -> bool:
    """Whether `folder` is a fedseg checkout (its pyproject.toml names the project fedseg)."""
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {}).get("name") == "fedseg"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def repo_root() -> Path:
    """The project a run works in (its `results/` and `data/`): `$FEDSEG_HOME` when set, else the fedseg
    checkout the working directory is in (it or a folder above it), else the working directory.

    Not the checkout the package was installed from: a second checkout using the first one's virtual
    environment would write its results and data into the first."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    cwd = Path.cwd().resolve()
    return next((folder for folder in (cwd, *cwd.parents) if _is_project(folder)), cwd)


def package_checkout() -> Path | None:
    """The checkout the running code comes from (an editable install), or None for an installed wheel."""
    here = Path(__file__).resolve().parents[2]
    return here if _is_project(here) else None


def git_commit() -> dict[str, Any]:
    """The commit of the checkout the code comes from (else the project's) and whether it had uncommitted
    changes (a run is only as reproducible)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=package_checkout() or repo_root(), capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    # results/ is what runs write (regenerating the committed reference rewrites tracked files there): only
    # changes to the code, notebooks and profiles make a run's commit an incomplete record of what ran
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": commit or None, "dirty": bool(changed)}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The code this process runs, as every checkpoint records it: fedseg's version and the commit (and whether
    it had uncommitted changes) at the process's first call, i.e. of the code it imported."""
    from importlib import metadata

    try:
        version = metadata.version("fedseg")
    except metadata.PackageNotFoundError:
        version = None
    return {"fedseg": version, **git_commit()}


def notebooks_dir() -> Path:
    """The chain's notebooks: the project's own, else those of the checkout the package comes from."""
    own = repo_root() / "notebooks"
    checkout = package_checkout()
    return own if own.is_dir() or checkout is None else checkout / "notebooks"


@contextmanager
def project_env() -> Iterator[Path]:
    """`$FEDSEG_HOME` set to this project while the chain's kernels run: a notebook executes in its run folder,
    which may lie outside the project (`--results`), and must still find the same data and cache."""
    root = repo_root()
    before = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(root)
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = before


def local_path(text: str, run_dir: str | Path | None = None) -> str:
    """A path a run recorded portably (`run.json`: `<run_dir>`, `<repo>`, `<home>` for this machine's folders) as a
    path on this machine: `<repo>` is the project a run works in (`repo_root`)."""
    for name, path in (("<run_dir>", run_dir), ("<repo>", repo_root()), ("<home>", Path.home())):
        if path is not None:
            text = text.replace(name, str(path))
    return text


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """A profile by name (smoke, laptop, paper) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"Profile file {path} does not exist: pass one of {PROFILE_NAMES} or a YAML path.")
        text = path.read_text()
    elif str(name_or_path) in PROFILE_NAMES:
        text = resources.files("fedseg.profiles").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise ValueError(f"Unknown profile {name_or_path!r}: use one of {', '.join(PROFILE_NAMES)} or a YAML path.")
    return yaml.safe_load(text)


def synthetic_data_root(profile: dict[str, Any], seed: int, base: str | Path | None = None) -> Path:
    """Where the synthetic data of a profile and seed lives: one folder per distinct generator setting."""
    phantom = profile["data"]["phantom"]
    key = hashlib.sha256(json.dumps({"phantom": phantom, "seed": seed}, sort_keys=True).encode()).hexdigest()[:8]
    base = Path(base) if base else Path(os.environ.get("FEDSEG_DATA", repo_root() / "data"))
    return base / "synthetic" / f"{profile['name']}-seed{seed}-{key}"


def resolve(profile: str, seed: int | None = None, data_root: str | Path | None = None) -> dict[str, Any]:
    """The profile with `seed` and `data_root` filled in: the configuration every notebook works from."""
    cfg = copy.deepcopy(load_profile(profile))
    cfg["seed"] = int(cfg.get("seed", 0) if seed is None else seed)
    if data_root is not None:
        cfg["data_root"] = str(Path(data_root).resolve())
        cfg.setdefault("data", {})["source"] = "synthetic" if (Path(data_root) / "phantom.json").exists() else "real"
    elif cfg["data"]["source"] == "synthetic":
        cfg["data_root"] = str(synthetic_data_root(cfg, cfg["seed"]).resolve())
    else:
        raise ValueError(
            f"Profile {profile!r} reads real data: pass data_root=/path/to/datasets "
            "(e.g. `-p data_root=/data/fedseg`), or use the laptop profile for the synthetic data."
        )
    return cfg
