"""The budget-response study (issue 26): the same study at several training budgets, to tell a claim that fails on
this data from one that fails only at the laptop's budget.

Each budget point is the base profile with every training budget multiplied by a scale k (`budget_profile`), and
optionally a finer voxel (`preprocess.spacing`), written as its own run folder's `profile.yaml` with a `budget:`
entry saying how it was derived. The data stay the base profile's (same phantom settings and name, so the same
synthetic data root: only the budget, or the voxel, differs between points).

**The rule** (`BUDGET_RULE`): at scale k, each SL model trains k x `train.steps`; the central model k x
`train.central_steps` (when unset, the SL models' steps together, as at 1x); the coarse-to-fine localiser k x
`localiser.steps`; warm-up k x `train.warmup_steps`. The federation keeps its rounds and each client trains
`train.steps // rounds` local steps per round (an explicit `federated.local_steps` is multiplied by k), so a
client's budget, rounds x local steps, equals its SL model's at every scale (the study's equal-budget rule;
`check_equal_budget` refuses a profile where it does not hold). With `scale_rounds` the rounds are multiplied
by k instead and the local steps kept (then `federated.val_every` too, so a federation validates as often as at 1x).
Validation is not training budget: a count (`train.validations`) is kept, a step interval (`train.val_every`,
where a profile gives no count) multiplied by k, so every model validates as often as at 1x; checkpoint intervals
are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fedseg.config import PROFILE_FILE
from fedseg.federated.settings import FL_DEFAULTS

#: The federations of every budget point besides the chain's own (FedAvg with the profile's loss, 03 in the
#: point's folder): (method, loss) run by the sweep into `<point>/<method>-<loss>/`.
SWEEP: tuple[tuple[str, str], ...] = (("fedavg", "literal_dice_ce"), ("ownerfedavg", "dice_ce"))
#: The sub-folder of a point that FedGIN's contrast study runs into (its own profile: some clients MRI-like).
CONTRAST = "contrast"
#: The entry of a derived profile that says it is a budget point (and of which base, scale and voxel).
KEY = "budget"
BUDGET_RULE = ("Budget rule: at scale k each SL model trains k x the base profile's steps, the central model k x its "
               "steps (the SL models' steps together) and the localiser k x its steps; a federation keeps its rounds "
               "and each client trains steps // rounds local steps per round, so every FL client's budget "
               "(rounds x local steps) equals its SL model's at every scale (the equal-budget rule).")


def check_scales(scales: Iterable[int | str]) -> tuple[int, ...]:
    """Scales as sorted distinct positive integers; refused otherwise."""
    try:
        out = tuple(sorted({int(s) for s in scales}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scales {list(scales)}: give positive whole numbers, e.g. 1,3,10.") from exc
    if not out or out[0] < 1:
        raise ValueError(f"scales {list(out)}: give positive whole numbers, e.g. 1,3,10.")
    return out


def point_name(scale: int, spacing: float | None = None) -> str:
    """The folder of a budget point: `scale-<k>`, or `scale-<k>-<spacing>mm` at another voxel."""
    return f"scale-{scale}" + (f"-{spacing:g}mm" if spacing else "")


def point_label(scale: int, spacing: float | None = None) -> str:
    """How tables name a point: "3x", or "3x (3 mm)" at another voxel."""
    return f"{scale}x" + (f" ({spacing:g} mm)" if spacing else "")


def find_points(study: str | Path) -> list[dict[str, Any]]:
    """The budget points a study folder holds: each sub-folder whose `profile.yaml` has a `budget:` entry, with
    its scale, voxel, label and budgets (from that profile), base-voxel points by scale first, then the others."""
    points = []
    for folder in sorted(Path(study).iterdir()) if Path(study).is_dir() else []:
        path = folder / PROFILE_FILE
        if not path.is_file():
            continue
        profile = yaml.safe_load(path.read_text()) or {}
        entry = profile.get(KEY)
        if not isinstance(entry, Mapping):
            continue
        rounds, local = rounds_and_local_steps(profile)
        points.append({"folder": folder, "scale": int(entry["scale"]), "spacing_mm": entry.get("spacing_mm"),
                       "label": point_label(int(entry["scale"]), entry.get("spacing_mm")),
                       "voxel_mm": profile["preprocess"]["spacing"], "steps": int(profile["train"]["steps"]),
                       "rounds": rounds, "local_steps": local, "contrast": folder / CONTRAST})
    return sorted(points, key=lambda p: (p["spacing_mm"] is not None, p["spacing_mm"] or 0, p["scale"]))


def rounds_and_local_steps(profile: Mapping[str, Any]) -> tuple[int, int]:
    """A profile's FL rounds and local steps per round, as the federation resolves them (`federated.settings`)."""
    fl = profile.get("federated") or {}
    rounds = int(fl.get("rounds") or FL_DEFAULTS["rounds"])
    local = fl.get("local_steps")
    return rounds, int(local) if local else max(1, int(profile["train"]["steps"]) // rounds)


def client_budget(profile: Mapping[str, Any]) -> int:
    """Training steps of one FL client: rounds x local steps."""
    rounds, local = rounds_and_local_steps(profile)
    return rounds * local


def check_equal_budget(profile: Mapping[str, Any]) -> None:
    """Refuse a profile whose FL client budget differs from its SL model's (`train.steps`)."""
    rounds, local = rounds_and_local_steps(profile)
    steps = int(profile["train"]["steps"])
    if rounds * local != steps:
        raise ValueError(f"profile {profile.get('name')!r}: an FL client trains {rounds} rounds x {local} local steps "
                         f"= {rounds * local}, its SL model {steps} steps; the budget study keeps them equal (make "
                         "train.steps a multiple of federated.rounds, or federated.local_steps = steps // rounds).")


def budget_profile(base: Mapping[str, Any], scale: int, spacing: float | None = None,
                   scale_rounds: bool = False) -> dict[str, Any]:
    """`base` with its training budgets multiplied by `scale` (`BUDGET_RULE`) and, with `spacing`, voxels of
    `spacing` mm; its `budget:` entry records the base, the scale and the voxel. Same name and phantom as `base`,
    so the same synthetic data."""
    scale = check_scales([scale])[0]
    check_equal_budget(base)
    out = copy.deepcopy(dict(base))
    train = out["train"]
    train["steps"] = int(base["train"]["steps"]) * scale
    if train.get("central_steps"):
        train["central_steps"] = int(train["central_steps"]) * scale
    if not train.get("validations") and train.get("val_every"):
        train["val_every"] = int(train["val_every"]) * scale  # a step interval: as many validations as at 1x
    if train.get("warmup_steps"):
        train["warmup_steps"] = int(train["warmup_steps"]) * scale
    if (out.get("localiser") or {}).get("steps"):
        out["localiser"]["steps"] = int(out["localiser"]["steps"]) * scale
    fl = out.setdefault("federated", {})
    rounds, local = rounds_and_local_steps(base)
    if scale_rounds:
        fl["rounds"] = rounds * scale
        if fl.get("local_steps"):
            fl["local_steps"] = local  # kept; None already means steps // rounds = the same local steps
        fl["val_every"] = int(fl.get("val_every") or 1) * scale
    elif fl.get("local_steps"):
        fl["local_steps"] = int(fl["local_steps"]) * scale
    if spacing:
        out["preprocess"]["spacing"] = [float(spacing)] * 3
    out[KEY] = {"base": base.get("name"), "scale": scale, "base_steps": int(base["train"]["steps"]),
                "spacing_mm": float(spacing) if spacing else None, "rounds": "scaled" if scale_rounds else "kept"}
    check_equal_budget(out)
    return out


def profile_difference(found: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys where two profiles differ (to say why a folder's profile is refused)."""
    keys = sorted(set(found) | set(wanted), key=str)
    out = []
    for key in keys:
        a, b = found.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += profile_difference(a, b, f"{prefix}{key}.")
        elif a != b and not (a in (None, "") and b in (None, "")):  # "" and None both say unset
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out
