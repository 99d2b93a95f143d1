"""The playground's settings and presets, its profile (the smoke profile's 8 mm phantom with more cases) and
its data (`prepare_data`, `playground_cases`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedseg.config import load_profile, merge_profile, synthetic_data_root
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.data.phantom import generate
from fedseg.federated.sites import client_list

#: The losses a student compares: the masked Dice + BCE (unlabelled = unknown; Wang & Ma 2022) and the paper's
#: reading (unlabelled = absent; Shen et al. 2022, Eq. 2).
LOSSES = ("dice_ce", "literal_dice_ce")
#: The aggregations the playground offers (`fedseg.federated.methods`).
AGGREGATIONS = ("fedavg", "ownerfedavg", "fedprox", "segviz")
#: Most training cases a site can be given: the playground's phantom holds this many per dataset.
MAX_CASES = 6
#: torch's CPU threads during a run. The clients train one after the other on small 3D patches, where one thread
#: wastes nothing on synchronisation; on a busy 2-core machine two threads were 13x slower per step (0.66 s against
#: 0.052 s for a 2 x 32^3 batch, load average 15), and an idle one gains little from the second at this size.
THREADS = 1
#: "Fails", as the study's claims table says it: a mean Dice below 10% (`fedseg.reporting.claims`).
FAILS_BELOW = 0.10

#: Where the playground's profile differs from the smoke profile (the CI profile's 8 mm phantom, UNet 8-16-32 whose
#: last layer gives the logits): more training cases per dataset to choose from and one validation case each,
#: volumes kept in memory, one case a step, no checkpoint inside a local round (each round's end state is still
#: written), every round validated. The loss, method, budget, learning rate and seed come from `Settings`.
PLAYGROUND_PROFILE: dict[str, Any] = {
    "name": "playground",
    "data": {"phantom": {"case_scale": 0.0, "min_cases": [MAX_CASES, 1, 0]}},
    "preprocess": {"in_memory": True},
    "train": {"schedule": "constant", "cases_per_step": 1, "checkpoint_every": 10**6, "val_cases": 1},
    "federated": {"val_every": 1},
}


# --------------------------------------------------------------------------------------------------
# What a run is: its settings and presets
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """One playground federation: its sites (datasets, shards, training cases), loss, aggregation and budget."""
    sites: tuple[str, ...] = TRAIN_DATASETS  #: the datasets that take part, one site each (or shards of one)
    cases: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TRAIN_DATASETS, 3))
    shards: Mapping[str, int] = dataclasses.field(default_factory=dict)  #: virtual clients per dataset (default 1)
    loss: str = "dice_ce"  #: `LOSSES`
    method: str = "fedavg"  #: `AGGREGATIONS`
    mu: float = 0.01  #: FedProx's proximal weight (fedprox only)
    rounds: int = 10
    local_steps: int = 10
    lr: float = 1.0e-2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sites) - set(TRAIN_DATASETS))
        if unknown or not self.sites:
            raise ValueError(f"sites={self.sites}: choose one or more of {', '.join(TRAIN_DATASETS)}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}.")
        if self.method not in AGGREGATIONS:
            raise ValueError(f"method={self.method!r}: use one of {', '.join(AGGREGATIONS)}.")
        for dataset in self.sites:
            n = self.training_cases(dataset)
            if not 1 <= n <= MAX_CASES:
                raise ValueError(f"cases[{dataset!r}]={n}: give 1 to {MAX_CASES} training cases.")
            if not 1 <= self.shards.get(dataset, 1) <= n:
                raise ValueError(f"shards[{dataset!r}]={self.shards.get(dataset)}: a shard needs a training case; "
                                 f"give 1 to {n} shards (it has {n} cases).")
        if self.rounds < 1 or self.local_steps < 1 or not self.lr > 0:
            raise ValueError(f"rounds={self.rounds}, local_steps={self.local_steps}, lr={self.lr}: rounds and local "
                             "steps must be >= 1 and the learning rate positive.")

    def training_cases(self, dataset: str) -> int:
        return int(self.cases.get(dataset, 3))

    def clients(self) -> tuple[str, ...]:
        """The federation's clients (`federated.sites.client_list`): a dataset, or its shards."""
        return client_list({"clients": ",".join(self.sites), "shards": self.shards_text()})

    def shards_text(self) -> str:
        """The run config's `shards`: "liver=2,spleen=1" (every site listed)."""
        return ",".join(f"{d}={int(self.shards.get(d, 1))}" for d in self.sites)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A finding of the study as a playground run: the question it asks, the settings that ask it, and how its
    outcome is judged from the run's numbers (`outcome`)."""
    name: str
    question: str
    settings: Settings
    judge: str  #: the key of `JUDGES`


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("label_conflict",
           "Under the paper's loss (unlabelled = negative), does the global model keep the liver? The pancreas, "
           "kidney and spleen sites see a liver in every scan and are told it is absent.",
           Settings(loss="literal_dice_ce", method="fedavg"), "label_conflict"),
    Preset("dilution",
           "With the masked loss nobody contradicts the liver site. How much of its update of the liver head (its "
           "output-layer row) does FedAvg keep?",
           Settings(loss="dice_ce", method="fedavg"), "dilution"),
    Preset("ownerfedavg",
           "ownerfedavg averages each output channel over its owners only. Does that remove the dilution?",
           Settings(loss="dice_ce", method="ownerfedavg"), "ownerfedavg"),
    Preset("data_poor",
           "The liver site holds a single training case, the other sites five each. How much of its liver-head "
           "update survives FedAvg, and does the global model still find the liver its own model finds?",
           Settings(loss="dice_ce", method="fedavg", cases={"liver": 1, "pancreas": 5, "kits19": 5, "spleen": 5}),
           "data_poor"),
)}


def matching_preset(settings: Settings) -> str | None:
    """The preset whose settings these are (numbers compared to 1e-9), else None."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        return a == b

    for name, preset in PRESETS.items():
        mine, theirs = dataclasses.asdict(settings), dataclasses.asdict(preset.settings)
        mine["cases"] = {d: settings.training_cases(d) for d in settings.sites}
        theirs["cases"] = {d: preset.settings.training_cases(d) for d in preset.settings.sites}
        for values in (mine, theirs):
            values["shards"] = {d: n for d, n in values["shards"].items() if n > 1}
        if all(same(mine[k], theirs[k]) for k in mine):
            return name
    return None


def with_overrides(settings: Settings, **values: Any) -> Settings:
    """`settings` with the given fields replaced; None leaves a field as it is. `sites` may be "liver,spleen" and
    `cases` one number for every site (a notebook's parameters)."""
    given = {k: v for k, v in values.items() if v is not None}
    if isinstance(given.get("sites"), str):
        given["sites"] = tuple(d for d in TRAIN_DATASETS if d in {x.strip() for x in given["sites"].split(",")})
    if isinstance(given.get("cases"), int):
        given["cases"] = dict.fromkeys(given.get("sites", settings.sites), given["cases"])
    return dataclasses.replace(settings, **given)


# --------------------------------------------------------------------------------------------------
# Data and profile
# --------------------------------------------------------------------------------------------------

def playground_profile(settings: Settings | None = None) -> dict[str, Any]:
    """The profile a playground federation runs with: the smoke profile with `PLAYGROUND_PROFILE`'s differences and
    the run's seed and learning rate, merged and checked as every profile's differences are (`config.merge_profile`
    onto the smoke profile)."""
    settings = settings or Settings()
    differences = {**PLAYGROUND_PROFILE, "seed": int(settings.seed),
                   "train": {**PLAYGROUND_PROFILE["train"], "lr": float(settings.lr)}}
    return merge_profile(differences, "fedseg.experiments.playground.PLAYGROUND_PROFILE", base=load_profile("smoke"))


def prepare_data(seed: int = 0, data_root: str | Path | None = None, datasets: Sequence[str] = TRAIN_DATASETS,
                 max_cases: int = MAX_CASES) -> tuple[Path, pd.DataFrame]:
    """The playground's phantom and its cases table (training and validation splits): the smoke profile's 8 mm
    phantom (`fedseg.data.phantom.generate`) with `max_cases` training cases and one validation case of each of
    `datasets`, generated once (about 10 s on 2 cores for all four datasets) and reused while its parameters hold.
    Default root: `data/synthetic/playground-seed<seed>-<hash>` (one per phantom setting, as every profile's)."""
    datasets = tuple(d for d in TRAIN_DATASETS if d in set(datasets))
    profile = playground_profile(Settings(seed=seed))
    phantom = {**profile["data"]["phantom"], "min_cases": [int(max_cases), 1, 0]}
    if data_root is None:
        keyed = {**profile, "data": {**profile["data"], "phantom": phantom}}
        root = synthetic_data_root(keyed, seed)
        if datasets != TRAIN_DATASETS:
            root = root.with_name(f"{root.name}-{'-'.join(datasets)}")
    else:
        root = Path(data_root)
    generate(root, seed=seed, case_scale=phantom["case_scale"], min_cases=tuple(phantom["min_cases"]),
             inplane_zoom=phantom["inplane_zoom"], slice_zoom=phantom["slice_zoom"], datasets=datasets,
             phases=phantom["phases"], progress=False)
    cases = pd.read_csv(root / "manifest.csv")
    return root.resolve(), cases[cases["split"].isin(["train", "val"])].reset_index(drop=True)


def phantom_needs(settings: Sequence[Settings]) -> tuple[tuple[str, ...], int]:
    """The datasets and training cases per dataset a phantom must hold for these federations."""
    datasets = tuple(d for d in TRAIN_DATASETS if any(d in s.sites for s in settings))
    return datasets, max(s.training_cases(d) for s in settings for d in s.sites)


def playground_cases(cases: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """The cases table of a federation: each site's first `settings.cases[dataset]` training cases (by case id) and
    its validation cases; the other datasets left out."""
    parts = []
    for dataset in settings.sites:
        own = cases[cases["dataset"] == dataset].sort_values("case_id")
        train = own[own["split"] == "train"]
        if len(train) < settings.training_cases(dataset):
            raise ValueError(f"{dataset} has {len(train)} training cases in the cases table, fewer than the "
                             f"{settings.training_cases(dataset)} asked for: lower cases[{dataset!r}].")
        parts += [train.head(settings.training_cases(dataset)), own[own["split"] == "val"]]
    return pd.concat(parts, ignore_index=True)
