"""The generator's vocabularies: the tissue classes with their CT, enhancement, texture and MRI-like values
(`T`), and the ids of the internal organ (`ORGANS`) and tumour (`TUMOURS`) maps.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------
# Tissues: class index, CT value unenhanced (HU), enhancement over it at the reference time of the late arterial,
# portal venous and delayed phase (`PHASE_KNOTS_S`), texture SD (HU), and an MRI-like value (T1-like: fat bright,
# bone and air dark, organs reordered; arbitrary units). Organ and vessel values after the published multiphase
# measurements docs/phantom.md cites (aorta, portal vein, liver: Bae 2010, Herts et al. 1995; pancreas: Lu et al.
# 1996; kidney: Yuh & Cohan 1999; excretion: van der Molen et al. 2008); the rest are the generator's choices.
# ---------------------------------------------------------------------------------------------------
_TISSUES: dict[str, tuple[float, float, float, float, float, float]] = {
    #               HU    art    port   del    tex   MRI
    "air":       (-1000.0, 0.0, 0.0, 0.0, 0.0, 5.0),
    "fat_sc":    (-105.0, 0.0, 0.0, 0.0, 8.0, 950.0),
    "fat":       (-92.0, 0.0, 0.0, 0.0, 10.0, 880.0),
    "muscle":    (52.0, 8.0, 12.0, 10.0, 6.0, 300.0),
    "cortical":  (850.0, 0.0, 0.0, 0.0, 90.0, 25.0),
    "marrow":    (230.0, 0.0, 0.0, 0.0, 40.0, 620.0),
    "disc":      (85.0, 0.0, 0.0, 0.0, 8.0, 210.0),
    "csf":       (10.0, 0.0, 0.0, 0.0, 3.0, 110.0),
    "rib":       (400.0, 0.0, 0.0, 0.0, 70.0, 160.0),
    "lung":      (-850.0, 0.0, 0.0, 0.0, 45.0, 20.0),
    "heart":     (40.0, 210.0, 120.0, 75.0, 8.0, 260.0),
    "artery":    (40.0, 260.0, 130.0, 80.0, 6.0, 60.0),
    "vein":      (40.0, 40.0, 110.0, 75.0, 6.0, 90.0),
    "liver":     (58.0, 22.0, 50.0, 35.0, 6.0, 470.0),
    "spleen":    (48.0, 75.0, 65.0, 45.0, 6.0, 330.0),
    "pancreas":  (42.0, 75.0, 50.0, 30.0, 8.0, 560.0),
    "k_cortex":  (32.0, 170.0, 130.0, 100.0, 8.0, 420.0),
    "k_medulla": (32.0, 45.0, 110.0, 105.0, 8.0, 270.0),
    "k_sinus":   (-60.0, 0.0, 0.0, 0.0, 12.0, 800.0),
    "gastric":   (40.0, 40.0, 30.0, 20.0, 8.0, 390.0),
    "fluid":     (15.0, 0.0, 0.0, 0.0, 5.0, 130.0),
    "gas":       (-950.0, 0.0, 0.0, 0.0, 30.0, 8.0),
    "bowel":     (30.0, 30.0, 25.0, 15.0, 12.0, 360.0),
    "bile":      (8.0, 0.0, 0.0, 0.0, 3.0, 150.0),
    "table":     (150.0, 0.0, 0.0, 0.0, 10.0, 4.0),
    "oral":      (260.0, 0.0, 0.0, 0.0, 25.0, 60.0),     # positive oral contrast in stomach and bowel
    "mottled":   (15.0, 0.0, 0.0, 0.0, 45.0, 420.0),     # faeces, food: soft tissue with fine gas
    "strand":    (25.0, 15.0, 35.0, 25.0, 8.0, 420.0),   # fat septa and small vessels
    "urine":     (15.0, 0.0, 0.0, 350.0, 5.0, 130.0),    # renal pelvis: contrast excreted from ~3 min on
}
_TISSUE_NAMES = tuple(_TISSUES)
T = {name: i for i, name in enumerate(_TISSUE_NAMES)}  # tissue class indices

#: Organ ids of the internal anatomy map (not any dataset's label values).
ORGANS: dict[str, int] = {
    "liver": 1, "spleen": 2, "pancreas": 3, "kidney_right": 4, "kidney_left": 5,
    "stomach": 6, "aorta": 7, "ivc": 8, "gallbladder": 9, "portal_vein": 10,
}
#: Tumour ids of the internal tumour map.
TUMOURS: dict[str, int] = {"liver": 1, "pancreas": 2, "kidney": 3}
