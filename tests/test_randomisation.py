"""The domain-randomisation proxy's profile variant and tables (`fedseg.experiments.randomisation`)."""

import numpy as np
import pandas as pd
import pytest

from fedseg.config import load_profile, synthetic_data_root
from fedseg.experiments import randomisation


def test_the_randomised_profile_changes_the_phantom_domain_and_augmentation_only():
    base = load_profile("smoke")
    variant = randomisation.randomised_profile(base)
    assert variant["name"] == "smoke-randomised"
    assert variant["data"]["phantom"]["domain"] == "randomised"
    assert variant["preprocess"]["domain_augment"] == randomisation.DEFAULT_AUGMENT
    assert base["data"]["phantom"]["domain"] == "ct" and base["preprocess"]["domain_augment"] is None
    # the randomised data gets its own folder: never the default phantom's
    assert synthetic_data_root(variant, 0) != synthetic_data_root(base, 0)
    for key in ("train", "model", "federated"):
        assert variant[key] == base[key]


def _scores():
    rows = []
    values = {("default", "CT"): 0.8, ("default", "other scanner"): 0.6, ("default", "MRI-like"): 0.2,
              ("randomised", "CT"): 0.7, ("randomised", "other scanner"): 0.7, ("randomised", "MRI-like"): 0.5}
    for (regime, test), dice in values.items():
        for dataset, organ, shift in (("liver", "liver", 0.0), ("spleen", "spleen", -0.1)):
            for case in ("a", "b"):
                rows.append(dict(regime=regime, test=test, model=dataset, dataset=dataset, case_id=case,
                                 channel=organ, dice=dice + shift + (0.02 if case == "a" else -0.02)))
            rows.append(dict(regime=regime, test=test, model=dataset, dataset=dataset, case_id="a",
                             channel=f"{organ}_tumor", dice=0.0))  # tumour channels are not in the organ table
    return pd.DataFrame(rows)


def test_organ_table_and_gaps_follow_the_scores():
    table = randomisation.organ_table(_scores())
    assert list(table.columns) == ["CT", "other scanner", "MRI-like"]
    assert table.loc[("default", "liver"), "CT"] == pytest.approx(80.0)
    assert table.loc[("default", "spleen"), "MRI-like"] == pytest.approx(10.0)
    assert table.loc[("randomised", "mean over organs"), "MRI-like"] == pytest.approx(45.0)
    assert not any("tumor" in organ for organ in table.index.get_level_values(1))
    gaps = randomisation.gaps(table)
    assert gaps.loc["default", "CT -> MRI-like"] == pytest.approx(60.0)
    assert gaps.loc["randomised", "CT -> other scanner"] == pytest.approx(0.0)
    assert np.isfinite(gaps.to_numpy()).all()
