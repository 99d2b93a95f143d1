"""One synthetic case (`simulate_case`): its RNG streams, anatomy, scan grid, maps, contrast phase and image,
and its dataset's own label map (`dataset_label`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fedseg.data.catalogue import CATALOGUE
from fedseg.data.labels import DATASETS
from fedseg.data.phantom.acquisition import SCANNERS, sample_grid
from fedseg.data.phantom.anatomy import sample_anatomy
from fedseg.data.phantom.build import build_anatomy
from fedseg.data.phantom.intensity import DOMAINS, _intensities, case_phase
from fedseg.data.phantom.painting import _Canvas
from fedseg.data.phantom.tissues import ORGANS, TUMOURS

#: Each dataset's label values from the internal organ / tumour maps (tumour wins over organ).
_LABEL_RULES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    d.name: (d.phantom.organs, d.phantom.tumours) for d in CATALOGUE}
#: Which tumours each dataset's patients carry: (organ, fewest, most per patient).
_TUMOUR_TASKS: dict[str, tuple[tuple[str, int, int], ...]] = {d.name: d.phantom.tumour_counts for d in CATALOGUE}


def dataset_label(dataset: str, canvas: _Canvas) -> np.ndarray:
    """The dataset's own label map: only its organs, with its own values (the rest stays 0)."""
    organ_values, tumour_values = _LABEL_RULES[dataset]
    lut = np.zeros(256, np.uint8)
    for name, value in organ_values.items():
        lut[ORGANS[name]] = value
    label = lut[canvas.organ]
    for name, value in tumour_values.items():
        label[canvas.tumour == TUMOURS[name]] = value
    return label


def case_number(case_id: str) -> int:
    """The number in a case id (liver_13 -> 13, case_00042 -> 42, img0021 -> 21): the case's RNG key."""
    digits = re.findall(r"\d+", case_id)
    if not digits:
        raise ValueError(f"Case id {case_id!r} has no number; the phantom keys each case's RNG on it.")
    return int(digits[-1])


def simulate_case(dataset: str, case_id: str, *, seed: int = 0, inplane_zoom: float = 4.0,
                  slice_zoom: float = 1.5, mri_like: bool = False, domain: str = "ct",
                  phases: str = "published") -> dict[str, Any]:
    """One synthetic case on its canonical RAS grid (before the dataset's storage orientation).

    `domain` (`DOMAINS`) and `phases` (`PHASE_CHOICES`: the dataset's published mix, every phase, or one) change
    only the image: the same case has the same anatomy and labels in every domain, phase and contrast.

    Returns image (int16), label (uint8, the dataset's own values), organs, tumour_map and tissue
    (the full anatomy: internal ids `ORGANS`, `TUMOURS`, tissue classes `T`), affine (RAS), tumours
    (organ and radius of each), acquisition (contrast phase and seconds after the injection), grid.
    """
    if dataset not in SCANNERS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(SCANNERS)}.")
    if domain not in DOMAINS:
        raise ValueError(f"Unknown phantom domain {domain!r}: use one of {', '.join(DOMAINS)}.")
    rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id)])
    anatomy = sample_anatomy(rng)
    grid = sample_grid(rng, dataset, anatomy, inplane_zoom, slice_zoom)
    canvas, tumours = build_anatomy(anatomy, grid, rng, _TUMOUR_TASKS[dataset])
    field_rng = np.random.default_rng([int(seed), DATASETS.index(dataset), case_number(case_id), 1])
    phase = case_phase(dataset, phases, np.random.default_rng([int(seed), DATASETS.index(dataset),
                                                               case_number(case_id), 2]))
    image, acquisition = _intensities(rng, grid, canvas, tumours, dataset, mri_like, field_rng, domain, phase)
    return dict(image=image, label=dataset_label(dataset, canvas), organs=canvas.organ,
                tumour_map=canvas.tumour, tissue=canvas.tissue, affine=grid.affine(), grid=grid,
                tumours=[{k: t[k] for k in ("organ", "radius_mm")} for t in tumours], acquisition=acquisition)
