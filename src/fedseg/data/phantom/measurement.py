"""The phantom measured against published statistics: its anatomy (organ volumes, vertebral levels, contacts;
`anatomy_table`) and each tissue's value in each contrast phase (`enhancement_table`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from fedseg.data.phantom.anatomy import ORGAN_VOLUMES_ML, sample_anatomy
from fedseg.data.phantom.build import build_anatomy
from fedseg.data.phantom.case import simulate_case
from fedseg.data.phantom.geometry import Grid
from fedseg.data.phantom.intensity import PHASES, enhancement
from fedseg.data.phantom.tissues import _TISSUES, ORGANS, T

#: Published statistics the phantom's anatomy is compared with (docs/phantom.md gives the sources).
PUBLISHED_ANATOMY: dict[str, tuple[str, str]] = {
    "liver volume (mL)": ("1200-1900", "Heinemann et al. 1999: 1072.8 x BSA - 345.7 at BSA 1.5-2.1 m2"),
    "spleen volume (mL)": ("107-315, mean 215", "Prassopoulos et al. 1997 (CT, 140 adults)"),
    "kidney volume, each (mL)": ("100-200", "adult reference range (Cheong et al. 2007: MRI)"),
    "pancreas volume (mL)": ("72 +/- 26 (ages 20-60)", "Saisho et al. 2007 (CT, 1,721 adults)"),
    "liver dome (vertebra)": ("T9-T10", "Standring 2016 (Gray's Anatomy)"),
    "right kidney centre (vertebra)": ("L1-L2, hila mostly L2", "Mirjalili et al. 2012"),
    "left kidney higher than right (mm)": ("10-20", "Standring 2016 (Gray's Anatomy)"),
    "spleen centre (vertebra)": ("T10-T12", "Standring 2016 (Gray's Anatomy)"),
    "pancreas centre (vertebra)": ("L1-L2 (transpyloric plane)", "Mirjalili et al. 2012"),
    "subcutaneous fat, flank (mm)": ("thin to obese", "body habitus"),
    "liver touches right kidney (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
    "spleen touches left kidney (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
    "spleen touches stomach (%)": ("most adults", "Standring 2016 (Gray's Anatomy)"),
}
#: The published ranges the anatomy figure shades, in each quantity's own unit: the adult volumes the generator
#: draws between (`ORGAN_VOLUMES_ML`) and the vertebral levels quoted above (vertebrae above L1's centre).
PUBLISHED_RANGES: dict[str, tuple[float, float]] = {
    "liver volume (mL)": ORGAN_VOLUMES_ML["liver"], "spleen volume (mL)": ORGAN_VOLUMES_ML["spleen"],
    "kidney volume, each (mL)": ORGAN_VOLUMES_ML["kidney"], "pancreas volume (mL)": ORGAN_VOLUMES_ML["pancreas"],
    "liver dome (vertebra)": (3, 4), "right kidney centre (vertebra)": (-1, 0),  # T10-T9, L2-L1
    "spleen centre (vertebra)": (1, 3), "pancreas centre (vertebra)": (-1, 0)}  # T12-T10, L2-L1
_VERTEBRAE = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")


def vertebra(level: float) -> str:
    """The vertebra at `level` (vertebrae above L1's centre): 0 -> L1, 1.4 -> T12, -0.6 -> L2."""
    index = int(np.clip(round(level), -4, 6)) + 4
    return _VERTEBRAE[index]


def patient_anatomy(seed: int, patient: int, spacing: float = 3.0) -> dict[str, float]:
    """One synthetic patient's anatomy measured on a whole-abdomen grid: painted organ volumes (mL),
    vertebral levels (vertebrae above L1's centre), left-right kidney offset, contacts, flank fat."""
    rng = np.random.default_rng([int(seed), 99, int(patient)])
    an = sample_anatomy(rng)
    bd, sp = an["body"], an["spine"]

    def axis(lo, hi):
        return np.arange(lo, hi + spacing, spacing, dtype=np.float64)

    grid = Grid(axis(-bd["a"] - 10, bd["a"] + 10), axis(bd["y0"] - bd["b"] - 10, bd["y0"] + bd["b"] + 10),
                axis(sp["iliac"] - 40.0, an["dome"] + 30.0))
    canvas, _ = build_anatomy(an, grid, None)
    voxel = spacing**3 / 1000.0
    organs = {n: canvas.organ == i for n, i in ORGANS.items()}
    z = grid.z[None, None, :]

    def level(mask) -> float:
        return float(((z * mask).sum() / max(mask.sum(), 1) - an["z_l1"]) / sp["period"])

    def touches(a, b) -> float:
        return 100.0 * float((ndimage.binary_dilation(organs[a], iterations=2) & organs[b]).any())

    liver_top = grid.z[np.flatnonzero(organs["liver"].any((0, 1)))[-1]] if organs["liver"].any() else np.nan
    return {
        "liver volume (mL)": organs["liver"].sum() * voxel,
        "spleen volume (mL)": organs["spleen"].sum() * voxel,
        "kidney volume, each (mL)": (organs["kidney_right"].sum() + organs["kidney_left"].sum()) * voxel / 2,
        "pancreas volume (mL)": organs["pancreas"].sum() * voxel,
        "liver dome (vertebra)": (liver_top - an["z_l1"]) / sp["period"],
        "right kidney centre (vertebra)": level(organs["kidney_right"]),
        "left kidney higher than right (mm)": (level(organs["kidney_left"]) - level(organs["kidney_right"]))
        * sp["period"],
        "spleen centre (vertebra)": level(organs["spleen"]),
        "pancreas centre (vertebra)": level(organs["pancreas"]),
        "subcutaneous fat, flank (mm)": bd["fat"],
        "liver touches right kidney (%)": touches("liver", "kidney_right"),
        "spleen touches left kidney (%)": touches("spleen", "kidney_left"),
        "spleen touches stomach (%)": touches("spleen", "stomach"),
    }


def anatomy_table(seed: int = 0, patients: int = 40, spacing: float = 3.0, progress: bool = True) -> pd.DataFrame:
    """The phantom's anatomy against published adult statistics: per quantity, the phantom's median and
    5th-95th percentiles over `patients` synthetic patients (contacts: % of patients) and the published range."""
    rows = [patient_anatomy(seed, k, spacing) for k in tqdm(range(patients), desc="anatomy", disable=not progress)]
    frame = pd.DataFrame(rows)
    out = []
    for quantity, (published, source) in PUBLISHED_ANATOMY.items():
        values = frame[quantity].astype(float)
        if quantity.endswith("(%)"):
            phantom = f"{values.mean():.0f} %"
        elif quantity.endswith("(vertebra)"):
            lo, mid, hi = values.quantile([0.05, 0.5, 0.95])
            phantom = f"{vertebra(mid)} ({vertebra(hi)} to {vertebra(lo)})"  # superior to inferior
        else:
            lo, mid, hi = values.quantile([0.05, 0.5, 0.95])
            phantom = f"{round(mid)} ({round(lo)} to {round(hi)})"
        out.append(dict(quantity=quantity, phantom=phantom, published=published, source=source))
    table = pd.DataFrame(out).set_index("quantity")
    table.attrs["patients"] = frame
    return table


#: The tissues whose values the enhancement table compares with the published ones (`enhancement_table`), named.
ENHANCEMENT_TISSUES = {"aorta": "artery", "portal vein, IVC": "vein", "liver": "liver", "spleen": "spleen",
                       "pancreas": "pancreas", "kidney cortex": "k_cortex", "kidney medulla": "k_medulla",
                       "renal pelvis (urine)": "urine"}


def enhancement_table(seed: int = 0, patients: int = 10, dataset: str = "btcv", progress: bool = True) -> pd.DataFrame:
    """Each tissue's value in each phase as the images show it (HU; median and 5th-95th percentile over `patients`
    cases of `dataset`, each case's median over the tissue's voxels: blur, noise, bolus timing and the scanner's
    calibration included) beside the published value the generator aims at (unenhanced + enhancement at the
    phase's reference time, `PHASE_KNOTS_S`)."""
    values: dict[tuple[str, str], list[float]] = {}
    for k in tqdm(range(patients), desc="enhancement", disable=not progress):
        for phase in PHASES:
            case = simulate_case(dataset, f"case{k:04d}", seed=seed, phases=phase)
            image, tissue = case["image"].astype(np.float32), case["tissue"]
            for name, t in ENHANCEMENT_TISSUES.items():
                inside = tissue == T[t]
                if inside.any():
                    values.setdefault((name, phase), []).append(float(np.median(image[inside])))
    rows = []
    for name, t in ENHANCEMENT_TISSUES.items():
        row = {"tissue": name}
        for phase in PHASES:
            found = np.asarray(values.get((name, phase), []))
            target = _TISSUES[t][0] + float(enhancement(phase)[T[t]])
            lo, mid, hi = np.percentile(found, [5, 50, 95]) if len(found) else (np.nan,) * 3
            row[phase] = f"{mid:.0f} ({lo:.0f} to {hi:.0f}) / {target:.0f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("tissue")
