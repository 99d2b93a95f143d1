"""The claims table decides each paper's claim from a run folder's scores: build folders whose numbers make
every claim hold, then fail, and check that every verdict follows the numbers."""

import json

import numpy as np
import pandas as pd
import pytest

from fedseg.data.labels import TRAIN_DATASETS, owned_channels
from fedseg.evaluate.external import GLOBAL, LOCAL, LOCAL_PP, SL
from fedseg.reporting import claims

CASES = 5
ORGANS = ("liver", "spleen", "pancreas", "kidney")


def noisy(rng, centre, n=CASES):
    return np.clip(centre + rng.normal(0, 0.01, n), 0, 1)


def write_run(folder, holds: bool, seed=0):
    """A run folder with every experiment's per-case scores; `holds` decides which way each comparison goes."""
    rng = np.random.default_rng(seed)
    sign = 1 if holds else -1
    metrics = folder / "metrics"
    metrics.mkdir(parents=True)
    sl, fl = [], []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            base = noisy(rng, 0.5)
            fails = channel in claims.PAPER_FAILED if holds else channel in ("pancreas", "kidney")
            glob = noisy(rng, 0.02) if fails else noisy(rng, 0.4)
            local = base + sign * 0.1
            for k in range(CASES):
                case = f"{dataset}_{k}"
                sl.append({"model": f"sl-{dataset}", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": base[k]})
                fl.append({"model": f"fl-local-{dataset}", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": local[k]})
                fl.append({"model": "fl-global", "dataset": dataset, "case_id": case, "channel": channel,
                           "dice": glob[k]})
    pd.DataFrame(sl).to_csv(metrics / "test_dice_per_case.csv", index=False)
    pd.DataFrame(fl).to_csv(metrics / "fl_test_dice_per_case.csv", index=False)
    btcv = []
    for organ in ORGANS:
        glob = noisy(rng, 0.4)
        ensemble = glob + sign * 0.2
        for method, values in ((GLOBAL, glob), (LOCAL, ensemble), (LOCAL_PP, ensemble + sign * 0.05),
                               (SL, ensemble - sign * 0.1)):
            btcv += [{"method": method, "case_id": f"img{k}", "organ": organ, "dice": values[k]} for k in range(CASES)]
    pd.DataFrame(btcv).to_csv(metrics / "btcv_per_case.csv", index=False)
    nodes = []
    for n, organs in ((2, ORGANS[:2]), (3, ORGANS[:3]), (4, ORGANS)):
        for organ in organs:
            conventional = noisy(rng, 0.8 - sign * 0.15 * n)
            for model, values in (("Conventional FL", conventional), ("SegViz", conventional + sign * 0.05)):
                nodes += [{"setup": f"{n}-node", "model": model, "case_id": f"img{k}", "organ": organ,
                           "dice": values[k]} for k in range(CASES)]
    pd.DataFrame(nodes).to_csv(metrics / "segviz_nodes_per_case.csv", index=False)
    mri_like = ("liver", "spleen")
    contrast = []
    for dataset in TRAIN_DATASETS:
        for channel in owned_channels(dataset):
            for tested in ("CT", "MRI"):
                avg = noisy(rng, 0.3)
                for model, values in (("fedavg-global", avg), ("fedgin-global", avg + sign * 0.1)):
                    contrast += [{"model": model, "dataset": dataset, "case_id": f"{dataset}_{k}", "channel": channel,
                                  "dice": values[k], "contrast": tested} for k in range(CASES)]
    pd.DataFrame(contrast).to_csv(metrics / "contrast_per_case.csv", index=False)
    (folder / "run.json").write_text(json.dumps(
        {"profile_config": {"data": {"phantom": {"mri_like": list(mri_like)}}}}))
    return folder


@pytest.mark.parametrize("holds", [True, False])
def test_every_verdict_follows_the_runs_numbers(tmp_path, holds):
    table = claims.claims_table(write_run(tmp_path / "run", holds), n_boot=500)
    assert len(table) == 7
    expected = claims.HELD if holds else claims.NOT_HELD
    assert list(table["verdict"]) == [expected] * 7, table[["claim", "verdict", "evidence"]].to_string()
    assert set(table["paper"]) == {claims.SHEN, claims.SEGVIZ, claims.FEDGIN}
    local = table.iloc[0]
    assert local["estimate"] == pytest.approx(10.0 if holds else -10.0, abs=1e-6)  # local = SL +- 10 points per case
    assert local["ci_low"] <= local["estimate"] <= local["ci_high"]


def test_the_failed_channels_must_be_exactly_the_papers(tmp_path):
    folder = write_run(tmp_path / "run", True)
    scores = pd.read_csv(folder / "metrics" / "fl_test_dice_per_case.csv")
    extra = (scores["model"] == "fl-global") & (scores["channel"] == "kidney")
    scores.loc[extra, "dice"] = 0.01  # a fourth channel fails too: the claim says "and not elsewhere"
    scores.to_csv(folder / "metrics" / "fl_test_dice_per_case.csv", index=False)
    row = claims.claims_table(folder, n_boot=200).iloc[1]
    assert row["verdict"] == claims.NOT_HELD and "kidney" in row["evidence"]


def test_an_overlapping_interval_does_not_hold(tmp_path):
    """FL local better on average but not beyond the noise: the CI spans 0, so the claim is not held."""
    folder = write_run(tmp_path / "run", True)
    scores = pd.read_csv(folder / "metrics" / "fl_test_dice_per_case.csv")
    local = scores["model"].str.startswith("fl-local")
    rng = np.random.default_rng(1)
    scores.loc[local, "dice"] = scores.loc[local, "dice"] - 0.1 + rng.normal(0.005, 0.2, local.sum())
    scores.to_csv(folder / "metrics" / "fl_test_dice_per_case.csv", index=False)
    row = claims.claims_table(folder, n_boot=500).iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == claims.NOT_HELD


def test_claims_without_their_experiment_are_not_tested(tmp_path):
    folder = write_run(tmp_path / "run", True)
    for name in ("btcv_per_case.csv", "segviz_nodes_per_case.csv", "contrast_per_case.csv"):
        (folder / "metrics" / name).unlink()
    table = claims.claims_table(folder, n_boot=200)
    assert list(table["verdict"]) == [claims.HELD] * 2 + [claims.NOT_TESTED] * 5


def test_each_federation_of_a_run_gets_its_own_test_split_claims(tmp_path):
    """A compared loss (03) or a swept method in a sub-folder is decided separately, labelled by its config."""
    folder = write_run(tmp_path / "run", True)
    other = folder / "loss-literal_dice_ce"
    (other / "metrics").mkdir(parents=True)
    (other / "fl").mkdir()
    (other / "fl" / "config.json").write_text(json.dumps({"federated": {"method": "fedavg"},
                                                          "train": {"loss": "literal_dice_ce"}}))
    scores = pd.read_csv(folder / "metrics" / "fl_test_dice_per_case.csv")
    scores.loc[scores["model"] == "fl-global", "dice"] = 0.5  # this federation's global model fails nowhere
    scores.to_csv(other / "metrics" / "fl_test_dice_per_case.csv", index=False)
    table = claims.claims_table(folder, n_boot=200)
    failing = table[table["claim"].str.startswith("the FL global model fails")]
    assert list(failing["verdict"]) == [claims.HELD, claims.NOT_HELD]
    assert failing.iloc[1]["tested on"] == "test splits, fedavg, loss literal_dice_ce (`loss-literal_dice_ce/`)"


def test_the_stratified_bootstrap_resamples_within_each_group():
    estimate, low, high = claims.stratified_mean_difference({"a": np.array([1.0, 3.0]), "b": np.array([10.0, 10.0])},
                                                            n_boot=1000)
    assert estimate == 6.0  # (2 + 10) / 2
    assert 5.5 - 1e-9 <= low <= estimate <= high <= 6.5 + 1e-9  # only a's mean varies, between 1 and 3
    assert np.isnan(claims.stratified_mean_difference({"a": np.array([1.0])})[1])


def test_a_federation_is_labelled_from_its_run_record_when_its_fl_folder_is_not_kept(tmp_path):
    """The committed reference keeps run.json, not fl/ (absolute paths): the label comes from 03's parameters
    over the profile."""
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({
        "profile_config": {"federated": {"method": "fedavg"}, "train": {"loss": "dice_ce"}},
        "notebooks": {"03_federated_training": {"parameters": {"method": "ownerfedavg", "loss": "literal_dice_ce"}}}}))
    assert claims.federation_label(folder) == "ownerfedavg, loss literal_dice_ce"
    (folder / "run.json").write_text(json.dumps({"profile_config": {"federated": {"method": "fedavg"},
                                                                     "train": {"loss": "dice_ce"}}}))
    assert claims.federation_label(folder) == "fedavg, loss dice_ce"
    assert claims.federation_label(tmp_path / "nothing") == "FL"
