"""FedGIN's cross-contrast experiment: the derived profile, and the in/cross-contrast arithmetic."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedseg.config import load_profile
from fedseg.data.labels import CHANNELS, TRAIN_DATASETS, owned_channels
from fedseg.experiments import contrast


def test_the_contrast_profile_makes_the_named_clients_mri_like_and_nothing_else():
    base = load_profile("smoke")
    derived = contrast.contrast_profile(base, ["spleen", "liver"])
    assert derived["name"] == "smoke-mri" and derived["data"]["phantom"]["mri_like"] == ["liver", "spleen"]
    assert base["data"]["phantom"]["mri_like"] == []  # the base profile is not changed
    assert {k: v for k, v in derived.items() if k not in ("name", "data")} == {
        k: v for k, v in base.items() if k not in ("name", "data")}
    for bad in ([], list(TRAIN_DATASETS), ["btcv"]):
        with pytest.raises(ValueError, match="one to three"):
            contrast.contrast_profile(base, bad)


def scores_for(dice_of):
    """Per-case scores of one global model: two cases per channel, Dice dice_of(channel, contrast) +- 0.1."""
    rows = []
    for contrast_name in (contrast.CT, contrast.MRI):
        for dataset in TRAIN_DATASETS:
            for channel in owned_channels(dataset):
                for k, jitter in enumerate((-0.1, 0.1)):
                    rows.append({"model": "g", "dataset": dataset, "case_id": f"{dataset}_{k}", "channel": channel,
                                 "dice": dice_of(channel, contrast_name) + jitter, "contrast": contrast_name})
    return pd.DataFrame(rows)


def test_in_and_cross_contrast_means_follow_each_channels_training_contrast():
    mri_like = ("liver", "spleen")
    mri_channels = {c for d in mri_like for c in owned_channels(d)}

    def dice(channel, tested):  # 0.8 in the contrast the owner trained in, 0.2 in the other
        trained = contrast.MRI if channel in mri_channels else contrast.CT
        return 0.8 if tested == trained else 0.2

    channels = contrast.channel_table(scores_for(dice), {"FL global": {d: "g" for d in TRAIN_DATASETS}})
    assert channels.shape == (1, 2 * (len(CHANNELS) - 1))
    assert channels.loc["FL global", "liver (MRI-like)"] == 80.0 and channels.loc["FL global", "liver (CT)"] == 20.0
    assert channels.loc["FL global", "kidney tumor (CT)"] == 80.0
    summary = contrast.contrast_summary(channels, mri_like).loc["FL global"]
    assert summary["CT clients' channels on CT"] == summary["MRI-like clients' channels on MRI-like"] == 80.0
    assert summary["CT clients' channels on MRI-like"] == summary["MRI-like clients' channels on CT"] == 20.0
    assert summary["in contrast (all channels)"] == 80.0 and summary["cross contrast (all channels)"] == 20.0


def test_test_roots_whose_labels_differ_are_refused(tmp_path):
    cases = pd.DataFrame({"dataset": ["spleen"], "case_id": ["spleen_2"], "split": ["test"],
                          "image": ["imagesTr/spleen_2.nii.gz"], "label": ["labelsTr/spleen_2.nii.gz"]})
    roots = {}
    for name, value in (("ct", 1), ("mri", 0)):
        folder = tmp_path / name / "Task09_Spleen" / "labelsTr"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.full((2, 2, 2), value, np.uint8), np.eye(4)), str(folder / "spleen_2.nii.gz"))
        roots[name] = tmp_path / name
    with pytest.raises(ValueError, match="different labels"):
        contrast.check_same_cases(cases, roots)
    with pytest.raises(FileNotFoundError, match="spleen_2"):
        contrast.check_same_cases(cases, {**roots, "other": tmp_path / "nowhere"})
