"""The synthetic abdominal-CT generator: the study's embedded default data (docs/study.md, "Data").

`generate` writes the five datasets in their real layouts (MSD `imagesTr/`+`labelsTr/`, KiTS19
`case_XXXXX/`, BTCV `img/`+`label/`) for a subset of the real manifest's cases, so every reader and
notebook runs unchanged on it. Each case is one synthetic patient, built in millimetres in the patient's
RAS frame (+x patient right, +y anterior, +z superior) and sampled onto its dataset's voxel grid:

* anatomy (docs/phantom.md): body from thin to obese with subcutaneous fat and muscle wall, spine with
  vertebral levels, ribs, pelvis, lungs and heart above the diaphragm, aorta, IVC, liver, spleen, pancreas,
  kidneys, stomach, gallbladder, colon and small bowel. Organ volumes and vertebral levels are drawn from
  published adult statistics (`ORGAN_VOLUMES_ML`, `ORGAN_LEVELS`), positions spread by centimetres, each
  organ's shape bent by smooth random waves and fitted to the room the body cavity leaves it, and the
  whole body finally bent by a smooth random deformation; organs touch where they do in real abdomens
  (liver and right kidney, spleen and left kidney, spleen and stomach), overlaps resolved by painting order;
* structure inside and between organs: portal and hepatic veins in the liver, the splenic and portal vein
  behind the pancreas, renal vessels and pelvis at the hila, colon with faeces-like contents and gas,
  small-bowel loops with gas, fluid or oral contrast, stomach contents, strands in the fat;
* tumours (liver 1-3, pancreas 1-2, kidney 1-2; radius 3-25 mm at real scale and never under two
  in-plane voxels; 70 % hypodense by 15-55 HU, else hyperdense by 15-35 HU, large ones with a necrotic
  core) strictly inside the liver, the pancreas or a kidney (a large one widens its organ, as a mass
  does), and only in the images of the dataset whose task includes them;
* labels: each dataset annotates only its own organs with its own values (`fedseg.data.labels`); the other
  organs are in its images but unlabelled;
* per-dataset heterogeneity: voxel size, field of view, scan range, contrast phase, HU offset and gain,
  noise, and the orientation of the stored array (`SCANNERS`); every affine maps voxels to RAS mm, so
  MONAI's `Orientationd("RAS")` + `Spacingd` recover the same anatomy;
* CT realism: tissue texture, partial-volume blur of the image (labels stay sharp), Gaussian noise,
  int16 HU; `mri_like` datasets get an MRI-like non-monotonic contrast instead (FedGIN); `domain`
  "randomised" gives the training datasets SynthSeg-style random tissue intensities, bias, blur and
  noise, "other_scanner" another CT scanner and protocol (`DOMAINS`).

Deterministic: case k of dataset d draws from `default_rng([seed, d, k])`, files are gzipped with
mtime 0 and no file name, so the same parameters give the same bytes whatever the worker count.

The package's modules, each importing only those listed after it (pyproject.toml's import-linter contract;
`|` marks modules that do not import each other):

* `files` | `measurement`: writing the datasets (`generate`, `nifti_bytes`, `to_storage`, the MSD dataset.json,
  manifest.csv and phantom.json, `generation`, `clear`; `PHANTOM_VERSION`, `PHANTOM_FILE`) | the phantom against
  published statistics (`anatomy_table`, `patient_anatomy`, `vertebra`, `PUBLISHED_ANATOMY`, `PUBLISHED_RANGES`,
  `enhancement_table`, `ENHANCEMENT_TISSUES`);
* `case`: one synthetic case (`simulate_case`: its RNG streams, anatomy, grid, maps, phase and image), its
  dataset's own label map (`dataset_label`) and RNG key (`case_number`);
* `build` | `intensity`: one patient on one grid in painting order (`build_anatomy`) with its tumours' plan and
  placement | the image of an anatomy in each domain (`DOMAINS`), the contrast phases (`PHASES`, `PHASE_CHOICES`,
  `PHASE_KNOTS_S`, `TUMOUR_CONTRAST`), the enhancement curves (`enhancement`) and a case's phase (`case_phase`);
* `structure`: vessels inside and between organs, renal pelvis, colon, bowel, fat strands, the body's deformation;
* `painting` | `acquisition`: the canvas of maps and painting the body wall, skeleton, great vessels, kidneys,
  pancreas, stomach, heart and lungs | each dataset's scanner profile (`SCANNERS`) and scan grid (`sample_grid`);
* `anatomy`: one patient's body and organ parameters from published statistics (`sample_anatomy`,
  `ORGAN_VOLUMES_ML`, `ORGAN_LEVELS`, `LEFT_KIDNEY_HIGHER_MM`);
* `geometry` | `tissues`: the world grid (`Grid`), blobs, tubes and smooth random fields | the tissue classes
  and their values (`T`) and the internal organ and tumour ids (`ORGANS`, `TUMOURS`).

This package re-exports the public names (and `_IN_PROGRESS`, which the tests read). Each name is defined in one
module and imported from there by the modules that use it, so `monkeypatch.setattr` must target the module whose
code looks the name up (`phantom.files.PHANTOM_VERSION` for `generate`), not this package.
"""

from __future__ import annotations

from fedseg.data.phantom.acquisition import PROFILES, SCANNERS, sample_grid
from fedseg.data.phantom.anatomy import LEFT_KIDNEY_HIGHER_MM, ORGAN_LEVELS, ORGAN_VOLUMES_ML, sample_anatomy
from fedseg.data.phantom.build import build_anatomy
from fedseg.data.phantom.case import case_number, dataset_label, simulate_case
from fedseg.data.phantom.files import (
    _IN_PROGRESS,
    PHANTOM_FILE,
    PHANTOM_VERSION,
    clear,
    generate,
    generation,
    nifti_bytes,
    to_storage,
)
from fedseg.data.phantom.geometry import Grid
from fedseg.data.phantom.intensity import (
    DOMAINS,
    PHASE_CHOICES,
    PHASE_KNOTS_S,
    PHASES,
    TUMOUR_CONTRAST,
    case_phase,
    enhancement,
)
from fedseg.data.phantom.measurement import (
    ENHANCEMENT_TISSUES,
    PUBLISHED_ANATOMY,
    PUBLISHED_RANGES,
    anatomy_table,
    enhancement_table,
    patient_anatomy,
    vertebra,
)
from fedseg.data.phantom.tissues import ORGANS, TUMOURS, T

__all__ = [
    "DOMAINS",
    "ENHANCEMENT_TISSUES",
    "Grid",
    "LEFT_KIDNEY_HIGHER_MM",
    "ORGANS",
    "ORGAN_LEVELS",
    "ORGAN_VOLUMES_ML",
    "PHANTOM_FILE",
    "PHANTOM_VERSION",
    "PHASES",
    "PHASE_CHOICES",
    "PHASE_KNOTS_S",
    "PROFILES",
    "SCANNERS",
    "PUBLISHED_ANATOMY",
    "PUBLISHED_RANGES",
    "T",
    "TUMOURS",
    "TUMOUR_CONTRAST",
    "_IN_PROGRESS",
    "anatomy_table",
    "build_anatomy",
    "case_number",
    "case_phase",
    "clear",
    "dataset_label",
    "enhancement",
    "enhancement_table",
    "generate",
    "generation",
    "nifti_bytes",
    "patient_anatomy",
    "sample_anatomy",
    "sample_grid",
    "simulate_case",
    "to_storage",
    "vertebra",
]
