"""Every dataset of the study, declared once: what it labels, where its files lie, how many cases Shen et al.
2022's Table 1 gives it, where it is downloaded from, and how the synthetic generator imitates its scanners.

The modules that use these facts read them from here (`labels.LABEL_MAPS`, `layouts.DATASET_DIRS` and
`LAYOUTS`, `manifest.TABLE1`, `download.SOURCES`, `phantom.SCANNERS`): adding a dataset is adding one
`Dataset` to `CATALOGUE` (docs/datasets.md shows one). The bottom of the data layer: it imports nothing of
fedseg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MSD = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar"
KITS19_COMMIT = "456b293435b25303bbc7995f094f83a0afdff0eb"
_KITS19_HF = "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main"


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from without a login.

    MSD: `url` is one tar (`md5` from MONAI) whose `archive_root` folder is the dataset folder.
    KiTS19: `image_url` / `label_url` are per-case templates (`{case}` = case_XXXXX) for `cases`; no
    checksums are published for them, so each file is checked to be a complete gzip NIfTI.
    """
    url: str | None = None
    md5: str | None = None
    archive_root: str | None = None
    image_url: str | None = None
    label_url: str | None = None
    cases: tuple[str, ...] = ()
    origin: str = ""


@dataclass(frozen=True)
class Phantom:
    """How `fedseg.data.phantom` imitates a dataset.

    `scanner`: the acquisition at real scale (mm; in-plane and slice spacing are multiplied by the zooms) and
    `axcodes`, the orientation of the stored array (nibabel codes: the direction each array axis points to).
    `organs` / `tumours`: the label value each organ / tumour of the internal anatomy gets (tumour wins).
    `tumour_counts`: which tumours a patient carries, (organ, fewest, most). `msd_json`: the MSD dataset.json
    name and labels, for an MSD task.
    """
    scanner: dict[str, Any]
    organs: dict[str, int]
    tumours: dict[str, int] = field(default_factory=dict)
    tumour_counts: tuple[tuple[str, int, int], ...] = ()
    msd_json: tuple[str, dict[str, str]] | None = None


@dataclass(frozen=True)
class Dataset:
    """One dataset of the study.

    `role`: "train" (a client of the federation) or "test" (the external evaluation). `folder`: its folder under
    a data root, as it ships. `layout`: the case-relative (image, label) paths; `{case}` is the manifest's case
    id (`{label_case}`: BTCV's label file name). `label_map`: each label value and the channels it switches on
    (an organ channel covers the whole organ, tumour included). `table1`: (train, val, test) cases in Shen et al.
    2022's Table 1. `source`: its download without a login (None: BTCV needs one). `condistfl`: its folder and
    file tag in the ConDistFL datalists that give the splits.
    """
    name: str
    role: str
    folder: str
    layout: tuple[str, str]
    label_map: dict[int, tuple[str, ...]]
    table1: tuple[int, int, int]
    phantom: Phantom
    source: Source | None = None
    condistfl: tuple[str, str] | None = None


_MSD_LAYOUT = ("imagesTr/{case}.nii.gz", "labelsTr/{case}.nii.gz")

CATALOGUE: tuple[Dataset, ...] = (
    Dataset(
        name="liver", role="train", folder="Task03_Liver", layout=_MSD_LAYOUT,
        label_map={1: ("liver",), 2: ("liver", "liver_tumor")}, table1=(79, 26, 26),
        phantom=Phantom(
            scanner=dict(  # LiTS: many sites, 0.7-5 mm slices, portal venous, stored L-P-S like DICOM
                axcodes=("L", "P", "S"), phases={"portal": 1.0}, inplane=(0.70, 0.90), slices=("log", 0.8, 5.0),
                fov=(300.0, 400.0), z_extent=(170.0, 230.0), target="liver", noise=(10.0, 20.0),
                gain=1.00, offset=0.0),
            organs={"liver": 1}, tumours={"liver": 2}, tumour_counts=(("liver", 1, 3),),
            msd_json=("Liver", {"0": "background", "1": "liver", "2": "cancer"})),
        # URLs and md5 as in monai.apps.DecathlonDataset.resource / .md5 (MONAI 1.6.1, monai/apps/datasets.py).
        source=Source(url=_MSD.format(task="Task03_Liver"), md5="a90ec6c4aa7f6a3d087205e23d4e6397",
                      archive_root="Task03_Liver", origin="MSD via MONAI DecathlonDataset"),
        condistfl=("Liver", "LVR"),
    ),
    Dataset(
        name="pancreas", role="train", folder="Task07_Pancreas", layout=_MSD_LAYOUT,
        label_map={1: ("pancreas",), 2: ("pancreas", "pancreas_tumor")}, table1=(169, 56, 56),
        phantom=Phantom(
            scanner=dict(  # MSD pancreas (MSKCC): 2.5 mm, portal venous, stored R-A-S
                axcodes=("R", "A", "S"), phases={"portal": 1.0}, inplane=(0.70, 0.85), slices=("fixed", 2.5, 2.5),
                fov=(310.0, 380.0), z_extent=(140.0, 200.0), target="pancreas", noise=(10.0, 14.0),
                gain=0.98, offset=6.0),
            organs={"pancreas": 1}, tumours={"pancreas": 2}, tumour_counts=(("pancreas", 1, 2),),
            msd_json=("Pancreas", {"0": "background", "1": "pancreas", "2": "cancer"})),
        source=Source(url=_MSD.format(task="Task07_Pancreas"), md5="4f7080cfca169fa8066d17ce6eb061e4",
                      archive_root="Task07_Pancreas", origin="MSD via MONAI DecathlonDataset"),
        condistfl=("Pancreas", "PAN"),
    ),
    Dataset(
        name="kits19", role="train", folder="kits19/data",
        layout=("{case}/imaging.nii.gz", "{case}/segmentation.nii.gz"),
        label_map={1: ("kidney",), 2: ("kidney", "kidney_tumor")}, table1=(126, 42, 42),
        phantom=Phantom(
            scanner=dict(  # KiTS19: late arterial, slice axis first, affine permuted (I-P-L) like the release
                axcodes=("I", "P", "L"), phases={"arterial": 1.0}, inplane=(0.70, 0.90), slices=("log", 0.8, 3.0),
                fov=(300.0, 380.0), z_extent=(120.0, 170.0), target="kidneys", noise=(12.0, 20.0),
                gain=1.02, offset=-8.0),
            organs={"kidney_right": 1, "kidney_left": 1}, tumours={"kidney": 2}, tumour_counts=(("kidney", 1, 2),)),
        # As in the official starter code (neheller/kits19 starter_code/get_imaging.py): imaging from the Hugging
        # Face dataset neheller/KiTS-Challenge-Imaging; segmentations are repository files, pinned to a commit so
        # they cannot change under us. Neither source publishes checksums, so files are verified as complete gzip
        # NIfTIs (and by check_dataset afterwards). Only the 210 labelled training cases are fetched.
        source=Source(
            image_url=_KITS19_HF + "/images/{case}.nii.gz",
            label_url=(f"https://raw.githubusercontent.com/neheller/kits19/{KITS19_COMMIT}"
                       "/data/{case}/segmentation.nii.gz"),
            cases=tuple(f"case_{i:05d}" for i in range(210)),
            origin="KiTS19 official starter code (github.com/neheller/kits19)"),
        condistfl=("KiTS19", "KITS"),
    ),
    Dataset(
        name="spleen", role="train", folder="Task09_Spleen", layout=_MSD_LAYOUT,
        label_map={1: ("spleen",)}, table1=(25, 8, 8),
        phantom=Phantom(
            scanner=dict(  # MSD spleen: 1.5-5 mm, portal venous, stored L-P-S
                axcodes=("L", "P", "S"), phases={"portal": 1.0}, inplane=(0.75, 0.90), slices=("log", 1.5, 5.0),
                fov=(310.0, 400.0), z_extent=(180.0, 250.0), target="spleen", noise=(8.0, 12.0),
                gain=1.00, offset=4.0),
            organs={"spleen": 1}, msd_json=("Spleen", {"0": "background", "1": "spleen"})),
        source=Source(url=_MSD.format(task="Task09_Spleen"), md5="410d4a301da4e5b2f6f86ec3ddba524e",
                      archive_root="Task09_Spleen", origin="MSD via MONAI DecathlonDataset"),
        condistfl=("Spleen", "SPL"),
    ),
    Dataset(
        name="btcv", role="test", folder="BTCV", layout=("img/{case}.nii.gz", "label/{label_case}.nii.gz"),
        # values that map to no channel (gallbladder, oesophagus, stomach, vessels, adrenals) are legal but ignored
        label_map={
            1: ("spleen",),
            2: ("kidney",),  # right kidney
            3: ("kidney",),  # left kidney
            4: (),  # gallbladder
            5: (),  # esophagus
            6: ("liver",),
            7: (),  # stomach
            8: (),  # aorta
            9: (),  # inferior vena cava
            10: (),  # portal and splenic vein
            11: ("pancreas",),
            12: (),  # right adrenal gland
            13: (),  # left adrenal gland
        },
        table1=(0, 0, 30),
        phantom=Phantom(
            scanner=dict(  # BTCV: 2.5-5 mm, portal venous, whole abdomen, stored L-A-S (radiological)
                axcodes=("L", "A", "S"), phases={"portal": 1.0}, inplane=(0.70, 0.90), slices=("uniform", 2.5, 5.0),
                fov=(320.0, 420.0), z_extent=(240.0, 300.0), target="abdomen", noise=(14.0, 20.0),
                gain=0.97, offset=0.0),
            organs={"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 6,
                    "stomach": 7, "aorta": 8, "ivc": 9, "portal_vein": 10, "pancreas": 11}),
        source=None,  # a Synapse login: download.btcv_instructions says where to put the files
    ),
)

#: The datasets by name, in the study's order.
BY_NAME: dict[str, Dataset] = {d.name: d for d in CATALOGUE}
