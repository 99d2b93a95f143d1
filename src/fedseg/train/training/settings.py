"""What one training reads, typed: `TrainSettings` (the profile's `train:` section), `PreprocessSettings` (its
`preprocess:` section) and `TrainingSettings`, the two with the seed, the network and the data root. The training
stage (`train_model`, `fit`, `fit_models`, validation, the batches and the checkpoints' settings) works from these,
not from the whole resolved configuration; its entry points take either and read a configuration once, through
`TrainingSettings.of`.

The fields are the keys of `fedseg/profiles/base.yaml`'s sections, checked both ways (a key the dataclass does not
have, or a field the section lacks, is refused), so a setting added to the base profile must be added here. Values
are kept as the profile gives them (a whole number stays one where a float is allowed): `as_dict` gives back the
section exactly, which is what every checkpoint records and compares (a setting left unset, absent from a
run's record, reads as None, its null default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fedseg.config import base_profile

Section = TypeVar("Section", bound="_Section")


@dataclasses.dataclass(frozen=True)
class _Section:
    """A profile section's typed, read-only view (the base of `TrainSettings` and `PreprocessSettings`)."""

    #: the section's name in the profile, for the errors
    NAME = ""

    @classmethod
    def of(cls: type[Section], section: Section | Mapping[str, Any]) -> Section:
        """The section of a resolved profile (every key of the base profile's, no other), typed. A setting whose
        default is null ("unset") may be absent, as a run's record writes it (`run.json` leaves unset keys out)."""
        if isinstance(section, cls):
            return section
        names = [f.name for f in dataclasses.fields(cls)]
        unset = {n for n, v in base_profile()[cls.NAME].items() if v is None}
        missing = [n for n in names if n not in section and n not in unset]
        unknown = sorted(set(section) - set(names))
        if missing or unknown:
            said = "; ".join(part for part in (
                f"without {', '.join(missing)}" if missing else "",
                f"with {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not a setting" if unknown
                else "") if part)
            raise ValueError(f"{cls.NAME} settings {said}: give a resolved profile's section (fedseg.config."
                             f"load_profile or resolve merges a profile onto fedseg/profiles/base.yaml).")
        return cls(**{n: section.get(n) for n in names})

    @classmethod
    def recorded(cls: type[Section], section: Section | Mapping[str, Any]) -> Section:
        """The section as a run's record keeps it (`run.json`, a checkpoint's settings), which may predate settings
        added since: each absent setting reads as the base profile's default, and a key this code no longer has is
        left out. For reading what a finished run ran with (inference, the checks of which data a checkpoint answers
        for), never for a training: `of` refuses both."""
        if isinstance(section, cls):
            return section
        defaults = base_profile()[cls.NAME]
        return cls(**{f.name: section.get(f.name, defaults[f.name]) for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        """The section as the profile gives it (a plain dict, the form checkpoints record)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: Section, **changes: Any) -> Section:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TrainSettings(_Section):
    """The `train:` section (what each setting means: fedseg/profiles/base.yaml)."""

    NAME = "train"
    loss: str
    loss_options: Mapping[str, Any]
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    cases_per_step: int
    steps: int
    central_steps: int | None
    validations: int | None
    val_every: int | None
    val_cases: int | None
    checkpoint_every: int
    parallel_models: int | None
    sw_batch_size: int
    sw_overlap: float
    amp: bool
    deterministic: bool
    cpu_bf16: bool


@dataclasses.dataclass(frozen=True)
class PreprocessSettings(_Section):
    """The `preprocess:` section (what each setting means: fedseg/profiles/base.yaml)."""

    NAME = "preprocess"
    spacing: Sequence[float]
    hu_window: Sequence[float]
    mri_percentiles: Sequence[float]
    intensity_shift: Mapping[str, Any] | None
    domain_augment: Mapping[str, Any] | None
    spatial_aug: Mapping[str, Any] | None
    gin: Mapping[str, Any] | None
    patch_size: Sequence[int]
    patch_sampling: str
    patches_per_volume: int
    num_workers: int
    in_memory: bool
    cache: str
    cache_dtype: str
    cache_workers: int | None


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """Everything one training reads: the seed, the network (`model:`, MONAI's arguments), the data root, and the
    `train` and `preprocess` sections typed."""

    seed: int
    model: Mapping[str, Any]
    data_root: str | None
    train: TrainSettings
    preprocess: PreprocessSettings

    @classmethod
    def of(cls, cfg: TrainingSettings | Mapping[str, Any]) -> TrainingSettings:
        """A resolved configuration's training settings (the object itself when given one)."""
        if isinstance(cfg, cls):
            return cfg
        missing = [k for k in ("seed", "model", "train", "preprocess") if k not in cfg]
        if missing:
            raise ValueError(f"a training's settings without {', '.join(missing)}: give a resolved configuration "
                             "(fedseg.config.resolve).")
        return cls(seed=int(cfg["seed"]), model=dict(cfg["model"]), data_root=cfg.get("data_root"),
                   train=TrainSettings.of(cfg["train"]), preprocess=PreprocessSettings.of(cfg["preprocess"]))

    @classmethod
    def recorded(cls, cfg: TrainingSettings | Mapping[str, Any]) -> TrainingSettings:
        """A run's recorded configuration read as its training settings (`_Section.recorded`: settings added since
        the record read as their defaults); for inference and checks on a finished run, not for a training."""
        if isinstance(cfg, cls):
            return cfg
        defaults = base_profile()
        return cls(seed=int(cfg.get("seed", defaults["seed"])), model=dict(cfg.get("model") or defaults["model"]),
                   data_root=cfg.get("data_root"), train=TrainSettings.recorded(cfg.get("train") or {}),
                   preprocess=PreprocessSettings.recorded(cfg.get("preprocess") or {}))

    def replace(self, *, train: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None,
                **changes: Any) -> TrainingSettings:
        """A copy with `changes` and, given, some of the train or preprocess settings changed (each a mapping)."""
        if train:
            changes["train"] = self.train.replace(**train)
        if preprocess:
            changes["preprocess"] = self.preprocess.replace(**preprocess)
        return dataclasses.replace(self, **changes)

    def data_config(self) -> dict[str, Any]:
        """What the data layer reads (`fedseg.data.transforms`: the cache and the MONAI pipelines): the data root
        and the preprocess section, in the configuration's form."""
        return {"data_root": self.data_root, "preprocess": self.preprocess.as_dict()}
