"""The training-options proxy's profiles, tables, selection rule and localiser table
(`fedseg.experiments.randomisation`); no training."""

import numpy as np
import pandas as pd
import pytest

from fedseg.config import load_profile, synthetic_data_root
from fedseg.experiments import randomisation as rnd


def test_the_randomised_profile_changes_the_phantom_domain_and_augmentation_only():
    base = load_profile("smoke")
    variant = rnd.randomised_profile(base)
    assert variant["name"] == "smoke-randomised"
    assert variant["data"]["phantom"]["domain"] == "randomised"
    assert variant["preprocess"]["domain_augment"] == rnd.DEFAULT_AUGMENT
    assert base["data"]["phantom"]["domain"] == "ct" and base["preprocess"]["domain_augment"] is None
    # the randomised data gets its own folder: never the default phantom's
    assert synthetic_data_root(variant, 0) != synthetic_data_root(base, 0)
    for key in ("train", "model", "federated"):
        assert variant[key] == base[key]


def test_options_override_only_the_phantom_and_preprocessing_and_share_data_where_the_phantom_is_the_same():
    base = load_profile("smoke")
    profiles = {name: rnd.option_profile(base, name) for name in rnd.OPTIONS}
    assert profiles[rnd.BASELINE] == base
    assert profiles["phase_mix"]["data"]["phantom"]["phases"] == "all"
    assert profiles["phase_mix_augment"]["preprocess"]["domain_augment"] == rnd.DEFAULT_AUGMENT
    assert base["data"]["phantom"]["phases"] == "published" and base["preprocess"]["domain_augment"] is None
    root = {name: synthetic_data_root(p, 0) for name, p in profiles.items()}
    assert root["augment"] == root[rnd.BASELINE]  # only the training changes: the same phantoms
    assert root["phase_mix_augment"] == root["phase_mix"] != root[rnd.BASELINE]
    assert len(set(root.values())) == 3
    for profile in profiles.values():
        for key in ("train", "model", "federated"):
            assert profile[key] == base[key]


def test_the_ct_test_images_are_the_default_training_phantoms_and_each_phase_its_own():
    base = load_profile("smoke")
    roots = {test: synthetic_data_root(rnd._with_phantom(base, **phantom), 0)
             for test, phantom in rnd.TEST_DOMAINS.items()}
    assert roots["CT"] == synthetic_data_root(base, 0)
    assert len(set(roots.values())) == len(roots)
    assert set(rnd.VALIDATION_TESTS) <= set(rnd.TEST_DOMAINS) and set(rnd.GAIN_TESTS) < set(rnd.VALIDATION_TESTS)


def _scores(means: dict[tuple[str, str, str], float]) -> pd.DataFrame:
    """Long-form scores whose mean over organs is `means[(option, split, test)]` (Dice as a fraction)."""
    rows = []
    for (option, split, test), dice in means.items():
        for dataset, organ, shift in (("liver", "liver", 0.05), ("spleen", "spleen", -0.05)):
            for case, noise in (("a", 0.02), ("b", -0.02)):
                rows.append(dict(option=option, split=split, test=test, model=dataset, dataset=dataset,
                                 case_id=case, channel=organ, dice=dice + shift + noise))
            rows.append(dict(option=option, split=split, test=test, model=dataset, dataset=dataset, case_id="a",
                             channel=f"{organ}_tumor", dice=0.0))  # tumour channels are not in the organ table
    return pd.DataFrame(rows)


def _grid(values: dict[str, dict[str, float]], split: str) -> dict[tuple[str, str, str], float]:
    return {(option, split, test): v for option, by_test in values.items() for test, v in by_test.items()}


#: Validation means per option: "costly" gains most but loses 3 points on CT; "cheap" loses 1.5 and gains 5 and 3;
#: "flat" loses nothing and gains 1; "worse" gains nowhere.
VAL = {"default": {"CT": 0.70, "unenhanced": 0.30, "other scanner": 0.60},
       "costly": {"CT": 0.67, "unenhanced": 0.60, "other scanner": 0.70},
       "cheap": {"CT": 0.685, "unenhanced": 0.35, "other scanner": 0.63},
       "flat": {"CT": 0.70, "unenhanced": 0.31, "other scanner": 0.61},
       "worse": {"CT": 0.69, "unenhanced": 0.20, "other scanner": 0.50}}


def _test_means(option: str) -> dict[str, float]:
    shift = {"default": 0.0, "costly": -0.03, "cheap": -0.01, "flat": 0.0, "worse": -0.01}[option]
    gain = {"default": 0.0, "costly": 0.2, "cheap": 0.04, "flat": -0.01, "worse": -0.05}[option]
    return {"CT": 0.8 + shift, "portal venous": 0.8 + shift, "arterial": 0.75 + shift, "delayed": 0.7,
            "unenhanced": 0.4 + gain, "other scanner": 0.75 + gain, "MRI-like": 0.05}


def _all_scores(val=VAL) -> pd.DataFrame:
    return _scores({**_grid(val, "val"), **_grid({o: _test_means(o) for o in val}, "test")})


def test_organ_table_and_gaps_follow_the_scores():
    scores = _all_scores()
    table = rnd.organ_table(scores, "test")
    assert list(table.columns) == list(rnd.TEST_DOMAINS)
    assert list(table.index.get_level_values(0).unique()) == list(VAL)  # in the order of the scores' options
    assert table.loc[("default", "liver"), "CT"] == pytest.approx(85.0)
    assert table.loc[("default", "spleen"), "unenhanced"] == pytest.approx(35.0)
    assert table.loc[("cheap", rnd.MEAN), "unenhanced"] == pytest.approx(44.0)
    assert not any("tumor" in organ for organ in table.index.get_level_values(1))
    gaps = rnd.gaps(table)
    assert gaps.loc["default", "CT -> MRI-like"] == pytest.approx(75.0)
    assert gaps.loc["default", "CT -> unenhanced"] == pytest.approx(40.0)
    assert np.isfinite(gaps.to_numpy()).all()
    # a subset of options, in the order asked for; the validation split is its own table
    assert list(rnd.organ_table(scores, "test", ["cheap", "default"]).index.get_level_values(0).unique()) == \
        ["cheap", "default"]
    assert list(rnd.organ_table(scores, "val").columns) == list(rnd.VALIDATION_TESTS)


def test_the_rule_never_picks_an_option_that_loses_more_than_two_points_on_ct_validation():
    selection = rnd.selection_table(_all_scores())
    assert selection.loc["costly", "CT change"] == pytest.approx(-3.0)
    assert selection.loc["costly", "mean gain"] == pytest.approx(20.0)  # the largest gain, but not eligible
    assert not selection.loc["costly", "eligible"]
    assert selection.loc["cheap", "CT change"] == pytest.approx(-1.5) and selection.loc["cheap", "eligible"]
    assert selection.loc["cheap", "mean gain"] == pytest.approx(4.0)
    chosen = rnd.choose(selection)
    assert chosen == "cheap"
    assert selection.loc[chosen, "CT change"] >= -rnd.MAX_CT_LOSS


def test_the_rule_keeps_the_default_when_no_eligible_option_gains():
    val = {"default": VAL["default"], "costly": VAL["costly"], "worse": VAL["worse"]}
    assert rnd.choose(rnd.selection_table(_all_scores(val))) == rnd.BASELINE
    verdict = rnd.verdict(rnd.BASELINE, rnd.test_bar(_all_scores(val)))
    assert "no option is chosen" in verdict and "Options that meet it" not in verdict  # costly loses 3 on test CT


def test_the_test_bar_and_the_verdict_are_computed_from_the_test_split():
    scores = _all_scores()
    bar = rnd.test_bar(scores)
    assert bar.loc["cheap", "CT change"] == pytest.approx(-1.0)
    assert bar.loc["cheap", "unenhanced gain"] == pytest.approx(4.0)
    assert bar.loc["cheap", "meets the bar"]
    assert not bar.loc["costly", "meets the bar"]  # -3 points on CT
    assert not bar.loc["flat", "meets the bar"]  # no gain
    assert not bar.loc[rnd.BASELINE, "meets the bar"]
    assert "it meets the bar: CT -1.0 points" in rnd.verdict("cheap", bar)
    assert "does not meet the bar" in rnd.verdict("flat", bar)


def test_the_localiser_table_gives_the_fraction_found_per_organ_and_test_domain():
    found = pd.DataFrame([
        dict(test="CT", cases="test splits", dataset="kits19", case_id="k1", organ="kidney", found=True),
        dict(test="CT", cases="test splits", dataset="kits19", case_id="k2", organ="kidney", found=True),
        dict(test="unenhanced", cases="test splits", dataset="kits19", case_id="k1", organ="kidney", found=False),
        dict(test="unenhanced", cases="test splits", dataset="kits19", case_id="k2", organ="kidney", found=True),
        dict(test="unenhanced", cases="BTCV", dataset="btcv", case_id="b1", organ="liver", found=True),
        dict(test="CT", cases="BTCV", dataset="btcv", case_id="b1", organ="liver", found=True),
    ])
    table = rnd.localiser_table(found)
    assert list(table.columns) == ["CT", "unenhanced"]
    assert list(table.index) == [("test splits", "kidney"), ("BTCV", "liver")]
    assert table.loc[("test splits", "kidney"), "unenhanced"] == "50 (1/2)"
    assert table.loc[("BTCV", "liver"), "CT"] == "100 (1/1)"
