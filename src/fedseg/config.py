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
from collections.abc import Iterator, Mapping
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
    """A profile by name (smoke, laptop, paper) or from a YAML file path, merged onto `base.yaml` (`merge_profile`):
    every setting present, each with the profile's value or else the default."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"Profile file {path} does not exist: pass one of {PROFILE_NAMES} or a YAML path.")
        text, source = path.read_text(), str(path)
    elif str(name_or_path) in PROFILE_NAMES:
        text, source = _packaged(str(name_or_path)), f"profile {name_or_path} (fedseg/profiles/{name_or_path}.yaml)"
    else:
        raise ValueError(f"Unknown profile {name_or_path!r}: use one of {', '.join(PROFILE_NAMES)} or a YAML path.")
    given = yaml.safe_load(text)
    if not isinstance(given, dict):
        raise ValueError(f"{source}: a profile is a YAML mapping of settings (see fedseg/profiles/base.yaml).")
    return merge_profile(given, source)


#: The profile every other is a difference from: each setting, what it means, and its default (the laptop's).
BASE_PROFILE = "base"
#: The parts of a profile merged key by key onto the base; any other entry (`model`, `train.loss_options`,
#: `preprocess.intensity_shift`, ...) is a value, replaced whole.
SECTIONS = ("data", "data.phantom", "preprocess", "train", "federated", "localiser")
#: Top-level entries a profile may hold beyond the base's: a budget point's derivation, and a resolved configuration's
#: paths (a federation's `fl/profile.yaml`). A federated method's own knobs (`federated.<knob>`) are checked by the
#: federated layer, which knows the methods (`fedseg.federated.settings.federated_settings`).
EXTRA_KEYS = {"": ("budget", "data_root", "run_dir"), "federated.": None}


def _packaged(name: str) -> str:
    return resources.files("fedseg.profiles").joinpath(f"{name}.yaml").read_text()


@functools.cache
def _base() -> dict[str, Any]:
    return yaml.safe_load(_packaged(BASE_PROFILE))


def base_profile() -> dict[str, Any]:
    """`base.yaml`: every setting with its default (a copy)."""
    return copy.deepcopy(_base())


def merge_profile(given: Mapping[str, Any], source: str = "profile",
                  base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`given` merged onto the base profile (or onto `base`, a profile already merged onto it, e.g. the smoke
    profile): its `SECTIONS` key by key, every other entry replaced whole. A key the base does not have is refused,
    naming `source`, the key and the settings of its section (except `EXTRA_KEYS`); so is a value of another type than
    its default's (`_check_type`: the base is the typed schema)."""
    return _merge(_base() if base is None else base, given, source, "")


def _merge(base: Mapping[str, Any], given: Mapping[str, Any], source: str, prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            extra = EXTRA_KEYS.get(prefix, ())
            if extra is None or key in extra:
                out[key] = copy.deepcopy(value)
                continue
            section = f"{prefix[:-1]}:" if prefix else "the top level:"
            raise ValueError(f"{source}: {dotted!r} is not a setting. Settings of {section} "
                             f"{', '.join(map(str, base))} (fedseg/profiles/base.yaml says what each means).")
        if dotted in SECTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: {dotted} is a section of settings, not {value!r} (see "
                                 "fedseg/profiles/base.yaml).")
            out[key] = _merge(base[key], value, source, dotted + ".")
        else:
            _check_type(base[key], value, source, dotted)
            out[key] = copy.deepcopy(value)
    return out


def _check_type(default: Any, value: Any, source: str, dotted: str) -> None:
    """The base profile is the settings' schema: a value has its default's type (an int where a float is expected;
    null always, a setting's "unset" or "automatic"; any value where the default is null). Refused naming the key."""
    if value is None or default is None:
        return
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}
    expected = kinds.get(type(default), (type(default),))
    if not isinstance(value, expected) or (isinstance(value, bool) and type(default) is not bool):
        names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
                 dict: "a mapping"}
        raise ValueError(f"{source}: {dotted}={value!r}: give {names.get(type(default), type(default).__name__)}, "
                         f"like the default {default!r} (fedseg/profiles/base.yaml).")


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


#: The settings a run can be given one by one, without a profile file: each knob's one name and where it lives in the
#: profile. The name is the notebook parameter (`-p local_steps=50` on the command line); the Flower run-config key is
#: the name with "-" for "_" (`run_config_key`: `flwr run --run-config 'local-steps=50'`). A federated method's own
#: knobs (e.g. `mu`) are added by the federated layer (`fedseg.federated.settings.knobs`), spelled the same way.
KNOBS: dict[str, str] = {
    "loss": "train.loss", "steps": "train.steps", "central_steps": "train.central_steps",
    "val_cases": "train.val_cases", "method": "federated.method", "rounds": "federated.rounds",
    "local_steps": "federated.local_steps", "fraction_train": "federated.fraction_train",
    "min_clients": "federated.min_clients", "keep_optimizer": "federated.keep_optimizer",
    "val_every": "federated.val_every", "wait_timeout": "federated.wait_timeout",
}


def run_config_key(name: str) -> str:
    """A knob's Flower run-config key: its name with "-" for "_" (local_steps -> local-steps)."""
    return name.replace("_", "-")


def override(cfg: Mapping[str, Any], values: Mapping[str, Any], knobs: Mapping[str, str] = KNOBS,
             unset: tuple[Any, ...] = (None,), source: str = "settings") -> dict[str, Any]:
    """`cfg` (left unchanged) with each set knob of `values` written where the profile keeps it: the one function
    that applies a knob given by a notebook parameter, the command line or a Flower run config. A value in `unset`
    (None; a run config also declares "" in pyproject) keeps the profile's; any other value is set, 0 and False
    included. A name that is not a knob is refused, naming `source` and the knobs."""
    unknown = sorted(set(values) - set(knobs))
    if unknown:
        raise ValueError(f"{source}: {', '.join(unknown)} is not a knob; the knobs are {', '.join(sorted(knobs))} "
                         "(any other setting is given in a profile YAML: fedseg/profiles/base.yaml).")
    out = copy.deepcopy(dict(cfg))
    for name, value in values.items():
        if any(value is u or (type(value) is type(u) and value == u) for u in unset):
            continue
        section, key = knobs[name].split(".")
        out[section] = {**(out.get(section) or {}), key: value}
    return out
