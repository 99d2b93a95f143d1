"""The Flower App: FedAvg's arithmetic and order-independence, loud failures, the global/local best, what
a client sends (weights and scalars only), and a 2-client federation through Flower's simulation engine."""

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from helpers import client_context, client_message, error_reply, federation_config, make_data, metadata, reply

from fedseg import config, run_folder
from fedseg.data.labels import TRAIN_DATASETS
from fedseg.federated import client_app, settings, sites, strategies, task
from fedseg.federated.simulation import federation_run_config
from fedseg.federated.strategies import FederationError, StudyFedAvg, fedavg_weights
from fedseg.reporting import report
from fedseg.train.models import build_network
from fedseg.train.training import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Weights for the fake replies (helpers.reply builds the replies as Flower builds them)
# --------------------------------------------------------------------------------------------------

def arrays_of(value, shape=(3, 4)):
    return {"w": torch.full(shape, float(value)), "b": torch.arange(4, dtype=torch.float32) * value}


# --------------------------------------------------------------------------------------------------
# FedAvg arithmetic
# --------------------------------------------------------------------------------------------------

def test_fedavg_weights_are_n_k_over_n():
    assert fedavg_weights([10, 30]) == [0.25, 0.75]
    table1 = [79, 169, 126, 25]  # Shen et al. 2022, Table 1 training cases: liver, pancreas, kits19, spleen
    weights = fedavg_weights(table1)
    assert weights == [n / 399 for n in table1] and math.isclose(sum(weights), 1.0)
    for bad in ([], [0, 0], [3, -1]):
        with pytest.raises(ValueError):
            fedavg_weights(bad)


def test_aggregation_is_the_n_k_weighted_mean_whatever_the_reply_order(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=3)
    datasets = ("liver", "pancreas", "spleen")
    # dyadic weights 1/4, 1/4, 1/2 and small integers: the float32 result is exact
    replies = [reply(10 + k, d, arrays_of(k + 1), num_examples=n, **{"train-loss": float(k)})
               for k, (d, n) in enumerate(zip(datasets, (1, 1, 2)))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()
    assert torch.equal(w["w"], torch.full((3, 4), 0.25 * 1 + 0.25 * 2 + 0.5 * 3))
    assert torch.equal(w["b"], torch.arange(4, dtype=torch.float32) * 2.25)
    assert w["w"].dtype == torch.float32
    assert metrics["train-loss"] == 0.25 * 0 + 0.25 * 1 + 0.5 * 2

    # Table 1's client sizes, random weights: sum n_k w_k / n, and the same bytes in every reply order
    rng = np.random.default_rng(0)
    sizes = dict(zip(TRAIN_DATASETS, (79, 169, 126, 25)))
    weights = {d: {"w": torch.from_numpy(rng.normal(size=(5, 7)).astype(np.float32))} for d in TRAIN_DATASETS}
    expected = sum(n * weights[d]["w"].double() for d, n in sizes.items()) / sum(sizes.values())
    results = set()
    for order in itertools.permutations(TRAIN_DATASETS):
        replies = [reply(100 + TRAIN_DATASETS.index(d), d, weights[d], num_examples=sizes[d]) for d in order]
        arrays, _ = StudyFedAvg(tmp_path, num_clients=4).aggregate_train(1, replies)
        result = arrays["w"].numpy()
        assert np.allclose(result, expected.numpy(), rtol=1e-6, atol=1e-7)
        results.add(result.tobytes())
    assert len(results) == 1, "the aggregate depends on the order the replies arrived in"


def test_an_error_reply_fails_the_round_and_names_the_client(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=2)
    ok = [reply(1, "liver", arrays_of(1)), reply(2, "spleen", arrays_of(2))]
    strategy.aggregate_train(1, ok)  # round 1 teaches the strategy which node is which dataset
    with pytest.raises(FederationError, match=r"(?s)Round 2 \(train\): 1 of 2 clients failed.*'spleen'.*disk full"):
        strategy.aggregate_train(2, [reply(1, "liver", arrays_of(1)), error_reply(2, "OSError: disk full")])
    # a node never seen before is named from its own error text (the client puts its dataset there)
    with pytest.raises(FederationError, match=r"client 'kits19' \(node 3\), error code 2: Client 'kits19' failed"):
        StudyFedAvg(tmp_path, num_clients=2).aggregate_train(
            1, [reply(1, "liver", arrays_of(1)), error_reply(3, "RuntimeError: Client 'kits19' failed in train")])


def test_a_missing_reply_fails_the_round(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=3)
    strategy.aggregate_train(1, [reply(n, d, arrays_of(1)) for n, d in ((1, "liver"), (2, "spleen"), (3, "kits19"))])
    strategy.sent["train"] = {1, 2, 3}
    with pytest.raises(FederationError, match=r"2 of 3 clients replied; no reply from client 'kits19'"):
        strategy.aggregate_train(2, [reply(1, "liver", arrays_of(1)), reply(2, "spleen", arrays_of(2))])


def test_min_nodes_follow_the_number_of_clients(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=4)
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (4, 4, 4)
    assert StudyFedAvg(tmp_path, num_clients=4, fraction_train=0.5).min_train_nodes == 2


def test_global_best_is_the_channel_mean_and_is_saved_with_the_rounds_table(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=2)
    model = build_network(name="UNet", channels=[8, 16], strides=[2], num_res_units=1)
    first = task.state_dict_cpu(model)
    strategy.aggregate_train(1, [reply(1, "liver", first, 3, **{"train-loss": 0.6}),
                                 reply(2, "spleen", first, 1, **{"train-loss": 0.2})])
    strategy.global_arrays = ArrayRecord(first)
    scores = [reply(1, "liver", kind="evaluate", num_examples=2, **{"dice-liver": 0.8, "dice-liver_tumor": 0.4,
                                                                   "mean-dice": 0.6}),
              reply(2, "spleen", kind="evaluate", num_examples=1, **{"dice-spleen": 0.9, "mean-dice": 0.9})]
    metrics = strategy.aggregate_evaluate(1, scores)
    assert math.isclose(metrics["global-mean-dice"], (0.8 + 0.4 + 0.9) / 3)  # channels, not client means (0.75)
    assert metrics["dice-spleen"] == 0.9 and metrics["dice-liver"] == 0.8 and math.isnan(metrics["dice-kidney"])
    best = torch.load(tmp_path / "checkpoints" / "fl-global" / "best.pt", weights_only=False)
    assert set(best) == {"model", "step", "val_mean_dice", "code", "federation_id"} and best["step"] == 1
    assert all(torch.equal(best["model"][k], first[k]) for k in first)

    # round 2 is worse: the best stays round 1's weights
    strategy.global_arrays = ArrayRecord({k: v + 1 for k, v in first.items()})
    strategy.aggregate_train(2, [reply(1, "liver", first, 3), reply(2, "spleen", first, 1)])
    strategy.aggregate_evaluate(2, [reply(1, "liver", kind="evaluate", **{"dice-liver": 0.1}),
                                    reply(2, "spleen", kind="evaluate", **{"dice-spleen": 0.1})])
    best = torch.load(tmp_path / "checkpoints" / "fl-global" / "best.pt", weights_only=False)
    assert best["step"] == 1 and math.isclose(best["val_mean_dice"], 0.7)
    assert (strategy.best_round, strategy.last_metric) == (1, 0.1)

    table = pd.read_csv(tmp_path / "metrics" / "fl_rounds.csv")
    assert len(table) == 2 * (2 + 2 + 1)
    first_round = table[table["round"] == 1].set_index(["kind", "dataset"])
    assert first_round.loc[("train", "liver"), "num_examples"] == 3
    assert first_round.loc[("train", "liver"), "loss"] == 0.6
    assert first_round.loc[("evaluate", "liver"), "dice_liver_tumor"] == 0.4
    assert bool(first_round.loc[("global", "all"), "global_best"])
    assert math.isclose(first_round.loc[("global", "all"), "mean_dice"], 0.7)


def test_rounds_between_validations_send_no_evaluation_and_the_best_is_chosen_among_validated_rounds(tmp_path):
    fl = {"val_every": 2, "rounds": 5}
    assert [r for r in range(1, 6) if task.validated_round(fl, r)] == [2, 4, 5]  # every 2nd and the last
    assert all(task.validated_round({"val_every": 1, "rounds": 5}, r) for r in range(1, 6))
    with pytest.raises(ValueError, match="val_every"):
        settings.federated_settings({"train": {"steps": 4}, "federated": {"val_every": 0}})
    strategy = StudyFedAvg(tmp_path, num_clients=2, settings={"federated": {"val_every": 2, "rounds": 3}})
    model = build_network(name="UNet", channels=[8, 16], strides=[2], num_res_units=1)
    first = task.state_dict_cpu(model)
    for server_round in (1, 2, 3):
        strategy.aggregate_train(server_round, [reply(1, "liver", first, 3, **{"train-loss": 0.6}),
                                                reply(2, "spleen", first, 1, **{"train-loss": 0.2})])
        if server_round == 1:  # no grid needed: nothing is sent, no reply awaited
            assert strategy.configure_evaluate(1, ArrayRecord(first), ConfigRecord(), grid=None) == []
            assert strategy.aggregate_evaluate(1, []) is None
            assert torch.load(tmp_path / "fl" / "state.pt", weights_only=False)["round"] == 1  # resumable as ever
            continue
        strategy.global_arrays = ArrayRecord(first)  # what configure_evaluate sets on a validated round
        dice = 0.5 if server_round == 2 else 0.4
        strategy.aggregate_evaluate(server_round, [reply(1, "liver", kind="evaluate", **{"dice-liver": dice}),
                                                   reply(2, "spleen", kind="evaluate", **{"dice-spleen": dice})])
    table = pd.read_csv(tmp_path / "metrics" / "fl_rounds.csv")
    assert sorted(table[table["kind"] == "evaluate"]["round"].unique()) == [2, 3]
    glob = table[table["kind"] == "global"].set_index("round")
    assert math.isnan(glob.loc[1, "mean_dice"]) and not glob.loc[1, "global_best"]
    assert math.isclose(glob.loc[1, "loss"], 0.4)  # the round's training is still recorded
    assert strategy.best_round == 2 and torch.load(strategy.global_best_path, weights_only=False)["step"] == 2
    figure = report.fl_curves(table)
    assert "validated after 2 of 3 rounds" in figure._suptitle.get_text()


# --------------------------------------------------------------------------------------------------
# The client: what it sends, its local best, its failures
# --------------------------------------------------------------------------------------------------

def test_a_client_sends_only_model_weights_and_scalar_metrics(tiny):
    cfg, cases, run_dir = tiny
    context = client_context(cfg, run_dir, cases, {"partition-id": 1, "num-partitions": 2})  # spleen
    message, model = client_message(cfg, "train")
    out = client_app.app(message, context)
    assert not out.has_error()
    parameters = model.state_dict()
    assert list(out.content.keys()) == ["arrays", "metrics"]
    sent = out.content["arrays"]
    assert set(sent.keys()) == set(parameters)
    for key, array in sent.items():  # nothing shaped like an image, label or patch: only parameters
        assert tuple(array.shape) == tuple(parameters[key].shape), key
    metrics = out.content["metrics"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    assert metrics["num-examples"] == 2  # training cases (n_k), not batches or patches
    assert metrics["dataset-index"] == TRAIN_DATASETS.index("spleen")
    assert math.isfinite(metrics["dice-spleen"]) and math.isnan(metrics["dice-liver"])
    assert not any(torch.equal(sent.to_torch_state_dict()[k], v) for k, v in parameters.items() if v.numel() > 8)

    local_best = run_dir / "checkpoints" / "fl-local-spleen" / "best.pt"
    saved = torch.load(local_best, weights_only=False)
    assert saved["step"] == 1 and math.isclose(saved["val_mean_dice"], metrics["mean-dice"])
    assert context.state["local-best"]["val-mean-dice"] == metrics["mean-dice"]

    message, _ = client_message(cfg, "evaluate")
    scored = client_app.app(message, context)
    assert list(scored.content.keys()) == ["metrics"]  # evaluation sends no arrays at all
    assert scored.content["metrics"]["num-examples"] == 1
    assert all(isinstance(v, (int, float)) for v in scored.content["metrics"].values())


def test_a_restarted_client_keeps_its_local_best_from_disk(tiny):
    cfg, cases, run_dir = tiny
    node = {"dataset": "liver"}
    path = task.local_best_path(run_dir, "liver")
    save_checkpoint({}, path, step=1, val_mean_dice=2.0, federation_id="fed-A")  # unbeatable (Dice <= 1)
    message, _ = client_message(cfg, "train", server_round=2, federation="fed-A")
    out = client_app.app(message, client_context(cfg, run_dir, cases, node))  # fresh state: a restart
    assert out.content["metrics"]["local-best-updated"] == 0
    assert torch.load(path, weights_only=False)["val_mean_dice"] == 2.0
    message, _ = client_message(cfg, "train", server_round=2, federation="fed-B")  # another federation: afresh
    out = client_app.app(message, client_context(cfg, run_dir, cases, node))
    assert out.content["metrics"]["local-best-updated"] == 1
    saved = torch.load(path, weights_only=False)
    assert saved["val_mean_dice"] < 1.0 and saved["federation_id"] == "fed-B"


def test_an_earlier_federations_local_best_does_not_count_when_round_1_is_not_validated(tiny):
    """Issue 27.1: the local best was forgotten only at round 1, which `val_every` > 1 does not validate, so at the
    first validated round the bar was an earlier federation's best.pt (0.99): a worse new federation never
    replaced it, and Tables 2 and 3 scored the old model."""
    cfg, cases, run_dir = tiny
    cfg["federated"].update(rounds=4, val_every=2)
    node = {"dataset": "liver"}
    path = task.local_best_path(run_dir, "liver")
    save_checkpoint({}, path, step=4, val_mean_dice=0.99, federation_id="an-earlier-federation")
    context = client_context(cfg, run_dir, cases, node)
    for server_round in (1, 2):
        message, _ = client_message(cfg, "train", server_round, federation="fed-new")
        metrics = client_app.app(message, context).content["metrics"]
    assert metrics["local-best-updated"] == 1 and metrics["mean-dice"] < 0.99
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 2 and saved["federation_id"] == "fed-new"
    assert math.isclose(saved["val_mean_dice"], metrics["mean-dice"])


def test_an_earlier_federations_local_best_does_not_answer_for_the_run(tiny):
    """A local best left by an earlier federation in the run folder (e.g. of a site the new federation does not
    have) is not the run's model: loading it for the run's tables is refused, naming both federations."""
    from fedseg.evaluate.evaluation import load_best
    from fedseg.train.training import StaleCheckpointError

    cfg, cases, run_dir = tiny
    message, _ = client_message(cfg, "train", 2, federation="fed-old")
    client_app.app(message, client_context(cfg, run_dir, cases, {"dataset": "liver"}))
    path = task.local_best_path(run_dir, "liver")
    (run_dir / "fl" / "summary.json").write_text(json.dumps({"federation_id": "fed-old"}))
    load_best(cfg, path, torch.device("cpu"))  # the run's own federation wrote it
    (run_dir / "fl" / "summary.json").write_text(json.dumps({"federation_id": "fed-new"}))
    with pytest.raises(StaleCheckpointError, match="written by federation 'fed-old', not by this run's 'fed-new'"):
        load_best(cfg, path, torch.device("cpu"))


def test_a_train_message_without_a_federation_is_refused(tiny):
    cfg, cases, run_dir = tiny
    message, _ = client_message(cfg, "train", federation="")
    with pytest.raises(RuntimeError, match="'liver' failed in train of round 1: .*no 'federation-id'"):
        client_app.app(message, client_context(cfg, run_dir, cases, {"dataset": "liver"}))
    assert not task.local_best_path(run_dir, "liver").exists()  # refused before any training


def test_each_round_trains_on_new_batches_and_keep_optimizer_continues_the_steps(tiny):
    cfg, cases, run_dir = tiny
    node = {"dataset": "liver"}
    history = run_dir / "fl" / "liver" / "history.csv"
    losses = []
    for server_round in (1, 2):  # a fresh optimizer each round, batches seeded by (seed, client, round)
        message, _ = client_message(cfg, "train", server_round)
        losses.append(
            client_app.app(message, client_context(cfg, run_dir, cases, node)).content["metrics"]["train-loss"])
        assert list(pd.read_csv(history)["step"]) == [2]
    assert losses[0] != losses[1], "round 2 drew the same batches as round 1 from the same weights"

    cfg["federated"]["keep_optimizer"] = True
    for server_round in (1, 2):
        message, _ = client_message(cfg, "train", server_round)
        client_app.app(message, client_context(cfg, run_dir, cases, node))
    assert list(pd.read_csv(history)["step"]) == [2, 4]  # round 2 resumed the optimizer at step 2
    assert "optimizer" in torch.load(run_dir / "fl" / "liver" / "last.pt", weights_only=False)


def test_keep_optimizer_reruns_a_cut_round_from_the_state_the_round_before_ended_with(tiny):
    """Issue 27.4: a client that finished round r before the server was cut had saved last.pt at step r*L; the
    rerun round r loaded it, so its optimizer held the discarded round and its batches shifted by a round. The
    rerun must give the very weights and metrics of the first run of that round."""
    cfg, cases, run_dir = tiny
    cfg["federated"].update(rounds=3, keep_optimizer=True)
    node = {"dataset": "liver"}
    context = client_context(cfg, run_dir, cases, node)
    replies = {}
    for server_round in (1, 2, 2):  # round 2 again: the server was cut after this client had finished it
        message, _ = client_message(cfg, "train", server_round)
        replies.setdefault(server_round, []).append(client_app.app(message, context))
    first, rerun = replies[2]
    assert not first.has_error() and not rerun.has_error()
    a, b = (r.content["arrays"].to_torch_state_dict() for r in (first, rerun))
    assert all(torch.equal(a[k], b[k]) for k in a), "the rerun round did not start from round 1's end state"
    assert first.content["metrics"]["train-loss"] == rerun.content["metrics"]["train-loss"]
    client_dir = run_dir / "fl" / "liver"
    assert torch.load(task.round_state_path(client_dir, 2), weights_only=False)["state"]["step"] == 4
    message, _ = client_message(cfg, "train", 3)
    assert not client_app.app(message, context).has_error()
    assert sorted(p.name for p in client_dir.glob("round-*.pt")) == ["round-0002.pt", "round-0003.pt"]


def test_a_client_validates_on_validated_rounds_only_and_on_the_fixed_subset_of_its_cases(tiny):
    cfg, cases, run_dir = tiny
    cases = pd.concat([cases, cases[cases["split"] == "val"].assign(case_id=lambda f: f["case_id"] + "b")])
    cfg["federated"].update(val_every=2, rounds=3)
    cfg["train"]["val_cases"] = 1
    node = {"dataset": "liver"}
    context = client_context(cfg, run_dir, cases, node)
    study = settings.study_config(context.run_config, context.node_config)
    _, val = task.client_records(study, cases, "liver")
    assert [r["case_id"] for r in val] == ["liver_2"]  # the first of its two validation cases by id, every round
    for server_round, validated in ((1, False), (2, True)):
        message, _ = client_message(cfg, "train", server_round)
        metrics = client_app.app(message, client_context(cfg, run_dir, cases, node)).content["metrics"]
        assert math.isfinite(metrics["train-loss"])
        assert math.isfinite(metrics["mean-dice"]) == validated
        assert metrics["local-best-updated"] == int(validated)  # the local best is chosen on validated rounds
    assert torch.load(task.local_best_path(run_dir, "liver"), weights_only=False)["step"] == 2


def test_a_failing_client_names_its_dataset(tiny):
    cfg, cases, run_dir = tiny
    broken = cases.assign(image=cases["image"].str.replace("imagesTr", "missing"))
    message, _ = client_message(cfg, "train")
    with pytest.raises(RuntimeError, match=r"Client 'liver' failed in train of round 1: .*FileNotFoundError.*missing"):
        client_app.app(message, client_context(cfg, run_dir, broken, {"partition-id": 0}))


def test_study_config_from_run_config_and_node_config(tmp_path):
    run_config = {"profile": "smoke", "seed": -1, "data-root": str(tmp_path / "a"), "run-dir": str(tmp_path / "r"),
                  "rounds": "", "local-steps": 7, "fraction-train": "", "min-clients": "", "keep-optimizer": ""}
    cfg = settings.study_config(run_config, {"data-root": str(tmp_path / "b")})
    assert cfg["data_root"] == str((tmp_path / "b").resolve()) and cfg["run_dir"] == str((tmp_path / "r").resolve())
    fl = cfg["federated"]
    assert fl["local_steps"] == 7 and fl["fraction_train"] == 1.0 and fl["keep_optimizer"] is False
    assert fl["rounds"] == cfg.get("federated", {}).get("rounds", 2)
    assert settings.study_config({**run_config, "clients": "liver,spleen"})["federated"]["min_clients"] == 2
    assert sites.site_identity({"partition-id": 1}, {"clients": "liver,spleen"}) == ("spleen", 1)
    assert sites.site_identity({"dataset": "kits19"}, {}) == ("kits19", 2)
    with pytest.raises(ValueError, match="node-config"):
        sites.site_identity({}, {})
    with pytest.raises(ValueError, match="run-dir"):
        settings.study_config({**run_config, "run-dir": ""})


def test_a_simulation_is_configured_by_the_keys_flwr_run_takes(tmp_path):
    """One configuration path: a notebook's simulation hands the App only the run_config keys of pyproject's
    [tool.flwr.app.config], and `settings.study_config` merges them with the profile as in deployment."""
    import tomllib

    deployment_keys = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    run_config = federation_run_config("smoke", tmp_path / "run", seed=3, clients=("liver", "spleen"), rounds=5,
                                       method="fedprox", mu=0.1, loss="masked_dice", local_steps=None)
    assert set(run_config) <= deployment_keys, set(run_config) - deployment_keys
    assert "local-steps" not in run_config  # None: the profile's
    cfg = settings.study_config(run_config)
    assert cfg["seed"] == 3 and cfg["train"]["loss"] == "masked_dice"
    assert (cfg["federated"]["rounds"], cfg["federated"]["method"], cfg["federated"]["mu"]) == (5, "fedprox", 0.1)
    assert cfg["federated"]["min_clients"] == 2
    with pytest.raises(ValueError, match=r"Not a federation setting: stepz; use .*local_steps"):
        federation_run_config("smoke", tmp_path / "run", stepz=5)
    with pytest.raises(ValueError, match="Unknown loss 'dice'"):
        settings.study_config({**run_config, "loss": "dice"})
    # a configuration built by hand (a test's, a benchmark's) travels as a profile file, as in deployment
    mine = federation_config(tmp_path / "data")
    run_config = federation_run_config(mine, tmp_path / "mine", clients=("liver", "spleen"))
    assert Path(run_config["profile"]) == tmp_path / "mine" / "fl" / "profile.yaml"
    cfg = settings.study_config(run_config)
    assert cfg["train"] == mine["train"] and cfg["data_root"] == str(Path(mine["data_root"]).resolve())


def test_unset_is_absent_and_zero_is_a_value_in_the_run_config(tmp_path):
    """A knob of pyproject's run config is unset when absent or "" (its declared default): the profile's value
    stands. Any other value is set, 0 included: `pseudo-after=0` pseudo-labels from round 1, where it used to be
    read as unset and became rounds // 2."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    knobs = settings.run_config_knobs()
    assert all(declared[key] == "" for key in knobs if key in declared), {k: declared[k] for k in knobs}
    base = federation_run_config("smoke", tmp_path / "run", clients=("liver", "spleen"), rounds=4, method="pseudo")
    unset = settings.study_config({**base, **{key: "" for key in knobs if key not in base}})["federated"]
    assert unset["pseudo_after"] == 2 and unset["mu"] == 0.01 and unset["val_every"] == 1
    zero = settings.study_config({**base, "pseudo-after": 0, "mu": 0.0})["federated"]
    assert zero["pseudo_after"] == 0 and zero["mu"] == 0.0
    with pytest.raises(ValueError, match="rounds and local_steps must be >= 1"):
        settings.study_config({**base, "rounds": 0})  # a zero that makes no sense is refused, not ignored


def test_shards_split_a_dataset_into_disjoint_virtual_clients(tmp_path):
    cases = make_data(tmp_path / "data", {"liver": (5, 1), "spleen": (2, 1)})
    cfg = federation_config(tmp_path / "data")
    assert sites.client_list({"clients": "liver,spleen", "shards": "2"}) == (
        "liver-1of2", "liver-2of2", "spleen-1of2", "spleen-2of2")
    assert sites.client_list({"clients": "liver,spleen", "shards": "liver=3"}) == (
        "liver-1of3", "liver-2of3", "liver-3of3", "spleen")
    assert len(sites.client_list({"shards": 4})) == 16
    assert settings.study_config(
        {"profile": "smoke", "run-dir": str(tmp_path), "shards": "4"})["federated"]["min_clients"] == 16
    trains = [task.client_records(cfg, cases, f"liver-{k}of2") for k in (1, 2)]
    ids = [[r["case_id"] for r in train] for train, _ in trains]
    assert sorted(ids[0] + ids[1]) == sorted(cases.query("dataset == 'liver' and split == 'train'")["case_id"])
    assert not set(ids[0]) & set(ids[1]) and [len(i) for i in ids] == [3, 2]
    # whole val split
    assert [r["case_id"] for r in trains[0][1]] == [r["case_id"] for r in trains[1][1]] == ["liver_5"]
    with pytest.raises(ValueError, match="spleen has 2 training cases, too few for 3 shards"):
        task.client_records(cfg, cases, "spleen-1of3")
    for bad in ("liver-3of2", "lung", "liver-0of2"):
        with pytest.raises(ValueError, match="client"):
            sites.parse_client(bad)
    with pytest.raises(ValueError, match="shards="):
        sites.client_list({"clients": "liver", "shards": "spleen=2"})
    # an unsharded client keeps the seeds it always had; shards of one dataset draw different batches
    assert task.round_seed(0, "liver", 1) == int(np.random.SeedSequence([0, 0, 1]).generate_state(1)[0] % 2**31)
    assert len({task.round_seed(0, name, 1) for name in ("liver", "liver-1of2", "liver-2of2")}) == 3


def test_a_shard_replies_under_its_own_name_and_keeps_its_own_local_best(tiny):
    cfg, cases, run_dir = tiny
    context = client_context(cfg, run_dir, cases, {"partition-id": 1})
    context.run_config["shards"] = "2"  # liver-1of2, liver-2of2, spleen-1of2, spleen-2of2
    message, _ = client_message(cfg, "train")
    out = client_app.app(message, context)
    assert not out.has_error()
    metrics = out.content["metrics"]
    assert metrics["num-examples"] == 1 and (metrics["shard"], metrics["shards"]) == (1, 2)
    assert strategies._dataset_name(metrics) == "liver-2of2"
    assert task.local_best_path(run_dir, "liver-2of2").exists()
    assert not task.local_best_path(run_dir, "liver").exists()


# --------------------------------------------------------------------------------------------------
# Flower's simulation engine, as a notebook runs it
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_two_client_federation_runs_in_simulation(tiny):
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    result = run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    table = result["rounds"]
    assert len(table) == 2 * (2 + 2 + 1)
    assert list(table["round"].unique()) == [1, 2]
    train = table[table["kind"] == "train"]
    assert sorted(train["dataset"]) == ["liver", "liver", "spleen", "spleen"]
    assert set(train["num_examples"]) == {2}
    assert (table[table["kind"] == "global"]["global_best"]).any()
    best = torch.load(result["global_best"], weights_only=False)
    assert set(best) == {"model", "step", "val_mean_dice", "settings", "code", "federation_id"}
    assert best["step"] == result["best_round"] and best["federation_id"] == result["federation_id"]
    # every checkpoint of the federation names the settings that made it
    assert best["settings"]["loss"] == "masked_dice" and best["settings"]["model"] == cfg["model"]
    assert best["settings"]["federated"]["rounds"] == 2 and "client_cpus" not in best["settings"]["federated"]
    for path in (result["global_final"], *result["local_best"].values()):
        saved = torch.load(path, weights_only=False)
        assert saved["settings"] == best["settings"] and saved["federation_id"] == best["federation_id"], path
    assert torch.load(result["global_final"], weights_only=False)["step"] == 2
    for dataset in ("liver", "spleen"):
        assert torch.load(result["local_best"][dataset], weights_only=False)["step"] in (1, 2)
    assert (run_dir / "fl" / "config.json").exists()
    assert json.loads((run_dir / "fl" / "status.json").read_text())["status"] == "finished"
    run_folder.require_finished_federation(run_dir)
    # dilution, measured on real local training: with the masked loss a client leaves the output weights of
    # the channels it does not own exactly as it got them, so FedAvg moves an owned channel by exactly its
    # owner's share (2 of 4 cases) of the owner's update
    dilution = pd.read_csv(run_dir / "metrics" / "fl_dilution.csv")
    assert len(dilution) == 2 * 7
    owned = dilution[dilution["owners"].notna()]
    assert set(owned["channel"]) == {"liver", "liver_tumor", "spleen"}
    assert (owned["others_move"] == 0).all() and (owned["owner_move"] > 0).all()
    assert np.allclose(owned["ratio"], 0.5, rtol=1e-5) and np.allclose(owned["owner_share"], 0.5)
    assert dilution[dilution["owners"].isna()]["ratio"].isna().all()  # kidney, pancreas: nobody trains them


@pytest.mark.slow
def test_a_federation_on_the_paper_profiles_data_path_and_validation_schedule_runs_in_simulation(tiny):
    """The patch cache read by loading workers inside the virtual clients, validation on the last of three rounds
    only (val_every 2: rounds 2 and 3) on one case per client: what the paper profile runs, at toy size."""
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    cfg["preprocess"].update(cache="patches", cache_dtype="float16")
    cfg["train"]["val_cases"] = 1
    cfg["federated"].update(rounds=3, val_every=2, client_workers=2)
    result = run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    table = result["rounds"]
    assert sorted(table[table["kind"] == "evaluate"]["round"].unique()) == [2, 3]
    glob = table[table["kind"] == "global"].set_index("round")
    assert glob["mean_dice"].isna().tolist() == [True, False, False] and result["best_round"] in (2, 3)
    assert (table[table["kind"] == "evaluate"]["num_examples"] == 1).all()  # the first validation case only
    stored = list((Path(os.environ["FEDSEG_CACHE"])).glob("*/patches-float16/*/case.json"))
    assert len(stored) == len(cases)  # every case the clients read came from the patch cache
    for dataset in ("liver", "spleen"):
        assert torch.load(result["local_best"][dataset], weights_only=False)["step"] in (2, 3)


@pytest.mark.slow
def test_a_client_failure_stops_the_simulation(tiny):
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    broken = cases.copy()
    broken.loc[broken["dataset"] == "spleen", "label"] = "labelsTr/absent.nii.gz"
    with pytest.raises(Exception, match="spleen") as caught:
        run_federation(cfg, run_dir, broken, clients=("liver", "spleen"), progress=False)
    assert "Round 1 (train)" in str(caught.value) and "absent.nii.gz" in str(caught.value)
    assert not (run_dir / "fl" / "summary.json").exists()
    # the folder says the federation failed, and why; 04 refuses to evaluate it
    status = json.loads((run_dir / "fl" / "status.json").read_text())
    assert status["status"] == "failed" and "spleen" in status["reason"]
    with pytest.raises(RuntimeError, match="(?s)is failed.*rerun 03"):
        run_folder.require_finished_federation(run_dir)


def test_integer_buffers_stay_integers(tmp_path):
    counts = [{"w": torch.ones(2), "n": torch.tensor([3], dtype=torch.int64)},
              {"w": torch.zeros(2), "n": torch.tensor([6], dtype=torch.int64)}]
    arrays, _ = StudyFedAvg(tmp_path, num_clients=2).aggregate_train(
        1, [reply(1, "liver", counts[0], 1), reply(2, "spleen", counts[1], 2)])
    averaged = arrays.to_torch_state_dict()
    assert averaged["n"].dtype == torch.int64 and int(averaged["n"]) == 5  # (1*3 + 2*6) / 3
    assert averaged["w"].dtype == torch.float32


@pytest.mark.parametrize("keep_optimizer", [False, True])
def test_the_learning_rate_anneals_once_over_the_whole_federation(tiny, keep_optimizer):
    """A client's learning rate at round r, local step s is the cosine schedule's value at global step
    (r - 1) * local_steps + s of rounds * local_steps, typed here independently of fedseg.train.training."""
    cfg, cases, run_dir = tiny
    rounds, local_steps, lr = 3, 2, cfg["train"]["lr"]
    cfg["federated"].update(rounds=rounds, local_steps=local_steps, keep_optimizer=keep_optimizer)
    cfg["train"].update(schedule="cosine", val_every=1, checkpoint_every=1)
    horizon = rounds * local_steps

    def cosine(global_step):  # the rate used by the update of global step g (1-based)
        return lr * 0.5 * (1 + math.cos(math.pi * (global_step - 1) / horizon))

    cfg["run_dir"] = str(run_dir)
    cfg["federated"] = settings.federated_settings(cfg)
    train, val = task.client_records(cfg, cases, "liver")
    for server_round in range(1, rounds + 1):
        model = build_network(**cfg["model"])
        summary = task.train_locally(cfg, model, "liver", server_round, train, val)
        expected = [cosine((server_round - 1) * local_steps + s) for s in range(1, local_steps + 1)]
        assert summary["learning_rates"] == pytest.approx(expected, rel=1e-6), f"round {server_round}"
        assert summary["history"]["lr"].iloc[-1] == pytest.approx(expected[-1], rel=1e-6)


def test_a_federation_that_did_not_finish_is_not_evaluated(tmp_path):
    """Issue: after a failure the folder held round 1's rows and valid bests and nothing said the run failed."""
    run_folder.require_finished_federation(tmp_path)  # no status: a folder from before statuses were written
    run_folder.write_federation_status(tmp_path, "running")
    with pytest.raises(RuntimeError, match="is running"):
        run_folder.require_finished_federation(tmp_path)
    run_folder.write_federation_status(tmp_path, "failed",
                                       "FederationError: Round 2 (train): no reply from client 'spleen'")
    with pytest.raises(RuntimeError, match="is failed .*no reply from client 'spleen'"):
        run_folder.require_finished_federation(tmp_path)
    run_folder.write_federation_status(tmp_path, "finished")
    run_folder.require_finished_federation(tmp_path)


def test_a_site_flower_lost_is_named_by_its_dataset(tmp_path):
    """Issue: a SuperNode killed in round 2 was reported as `node 1 (dataset unknown)`: Flower answers for a lost
    node with an error reply sent from the SuperLink's own node id. The lost site is the one sent work that did
    not reply itself."""
    strategy = StudyFedAvg(tmp_path, num_clients=2)
    strategy.sent["train"] = {11, 12}
    strategy.aggregate_train(1, [reply(11, "liver", arrays_of(1)), reply(12, "spleen", arrays_of(2))])
    lost = Message(error=Error(code=5, reason="Node Unavailable"), metadata=metadata(1, "train"))  # from the link
    with pytest.raises(FederationError, match=r"client 'spleen' \(node 12\), error code 5: Node Unavailable"):
        strategy.aggregate_train(2, [reply(11, "liver", arrays_of(1)), lost])


class FakeGrid:
    """A Grid whose connected nodes follow a script (one entry per get_node_ids call) and whose nodes answer the
    identity query with their dataset, as `client_app.query` does."""

    def __init__(self, script, datasets):
        self.script, self.datasets, self.calls, self.queried = list(script), datasets, 0, []

    def get_node_ids(self):
        self.calls += 1
        return self.script[min(self.calls, len(self.script)) - 1]

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.queried.append(node)
            out.append(reply(node, self.datasets[node], kind="query"))
        return out


def test_the_server_says_which_sites_it_waits_for_and_gives_up_after_the_timeout(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp's process
        monkeypatch.setattr(TaskIdentity, key, value)
    datasets = {11: "liver", 12: "spleen", 13: "kits19", 14: "pancreas"}
    said = []
    grid = FakeGrid([[11], [11, 12], [11, 12, 13], [11, 12, 13, 14]], datasets)
    names = strategies.wait_for_sites(grid, 4, ("liver", "pancreas", "kits19", "spleen"), timeout=60, poll=0,
                                      say=lambda text, **_: said.append(text))
    assert names == datasets and sorted(grid.queried) == [11, 12, 13, 14]  # each node asked once
    assert said[0] == "Waiting: 1 of 4 sites connected (liver); missing: kits19, pancreas, spleen"
    assert said[-1] == "Waiting: 3 of 4 sites connected (kits19, liver, spleen); missing: pancreas"
    # without a declared client list the missing datasets are suggested; a site that never comes ends the wait
    grid = FakeGrid([[11, 12]], datasets)
    with pytest.raises(FederationError, match=r"after 0 s \(run config wait-timeout\): 2 of 3 sites connected "
                                              r"\(liver, spleen\); 1 more site\(s\), e.g. pancreas, kits19"):
        strategies.wait_for_sites(grid, 3, None, timeout=0, poll=0, say=lambda *a, **k: None)


@pytest.mark.slow
def test_a_federation_cut_after_a_round_resumes_to_the_weights_of_an_uninterrupted_one(tiny, monkeypatch):
    """Issue: after a crash a federation started again from round 1. The server saves its state each round; a run
    started again with the same folder and settings continues after the last finished round, and ends with the
    same weights, bests and rounds table as an uninterrupted run. A finished federation is refused unless
    overwrite is asked (`flwr run` used to replace one silently)."""
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    cfg["federated"]["rounds"] = 3
    whole = run_federation(cfg, run_dir.with_name("whole"), cases, clients=("liver", "spleen"), progress=False)

    original = StudyFedAvg.aggregate_evaluate

    def cut_after_round_2(self, server_round, replies):
        metrics = original(self, server_round, replies)
        if server_round + self.round_offset == 2:
            raise RuntimeError("the machine went down after round 2")
        return metrics

    monkeypatch.setattr(StudyFedAvg, "aggregate_evaluate", cut_after_round_2)
    with pytest.raises(Exception, match="went down after round 2"):
        run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    assert json.loads((run_dir / "fl" / "status.json").read_text())["status"] == "failed"
    assert torch.load(run_dir / "fl" / "state.pt", weights_only=False)["round"] == 2
    monkeypatch.setattr(StudyFedAvg, "aggregate_evaluate", original)

    resumed = run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    assert resumed["resumed_after_round"] == 2 and whole["resumed_after_round"] is None
    for name in ("global_final", "global_best"):
        a, b = (torch.load(r[name], weights_only=False) for r in (whole, resumed))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    for client in ("liver", "spleen"):
        a, b = (torch.load(r["local_best"][client], weights_only=False) for r in (whole, resumed))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    columns = [c for c in whole["rounds"].columns if c != "seconds"]
    pd.testing.assert_frame_equal(whole["rounds"][columns], resumed["rounds"][columns])

    with pytest.raises(FileExistsError, match="holds a finished federation"):
        run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    # other settings never continue an unfinished federation
    run_folder.write_federation_status(run_dir, "failed", "pretend")
    # nor other cases (issue 27.2): the state is stamped with each site's case fingerprints; simulate refuses them
    # before fl/cases.csv is replaced, and the server itself refuses them (deployment has no fl/cases.csv)
    stamp = torch.load(run_dir / "fl" / "state.pt", weights_only=False)["settings"]["cases"]
    assert set(stamp) == {"liver", "spleen"} and stamp["liver"]["val"].startswith("1 cases")
    recorded = (run_dir / "fl" / "cases.csv").read_text()
    fewer = cases.assign(case_id=cases["case_id"].where(cases["case_id"] != "spleen_1", "spleen_9"))  # renamed
    with pytest.raises(ValueError, match="unfinished federation .* on other cases"):
        run_federation(cfg, run_dir, fewer, clients=("liver", "spleen"), progress=False)
    assert (run_dir / "fl" / "cases.csv").read_text() == recorded
    # the server names every setting that differs, so one refused start (past simulate's check) shows both the
    # cases and the loss refused, where two starts of Ray showed one each
    monkeypatch.setattr("fedseg.federated.simulation.refuse_other_cases", lambda *a: None)
    other = {**cfg, "train": {**cfg["train"], "loss": "dice_ce"}}
    with pytest.raises(Exception, match=r"state.pt was trained under other settings than this run asks for "
                                        r"\(cases\.spleen: .*; loss: 'masked_dice' -> 'dice_ce'"):
        run_federation(other, run_dir, fewer, clients=("liver", "spleen"), progress=False)
    again = run_federation(other, run_dir, cases, clients=("liver", "spleen"), progress=False, overwrite=True)
    assert again["resumed_after_round"] is None


@pytest.mark.slow
def test_a_federation_cut_in_the_middle_of_a_round_with_keep_optimizer_resumes_to_the_same_weights(tiny, monkeypatch):
    """Issue 27.4: with keep_optimizer, clients that finished the cut round had saved that round's optimizer state;
    the rerun round started from it (Adam's moments with the discarded round, batches a round ahead). Each client
    now keeps its state per finished round and the rerun round starts from the round before's."""
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    cfg["federated"].update(rounds=2, keep_optimizer=True)
    clients = ("liver", "spleen")
    whole = run_federation(cfg, run_dir.with_name("whole"), cases, clients=clients, progress=False)
    original = StudyFedAvg.aggregate_train

    def cut_in_round_2(self, server_round, replies):
        if server_round + self.round_offset == 2:  # every client finished round 2; the server did not
            raise RuntimeError("the machine went down in round 2")
        return original(self, server_round, replies)

    monkeypatch.setattr(StudyFedAvg, "aggregate_train", cut_in_round_2)
    with pytest.raises(Exception, match="went down in round 2"):
        run_federation(cfg, run_dir, cases, clients=clients, progress=False)
    assert torch.load(run_dir / "fl" / "state.pt", weights_only=False)["round"] == 1
    assert torch.load(run_dir / "fl" / "liver" / "last.pt", weights_only=False)["state"]["step"] == 4
    monkeypatch.setattr(StudyFedAvg, "aggregate_train", original)
    resumed = run_federation(cfg, run_dir, cases, clients=clients, progress=False)
    assert resumed["resumed_after_round"] == 1
    a, b = (torch.load(r["global_final"], weights_only=False)["model"] for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for client in clients:
        a, b = (torch.load(r["local_best"][client], weights_only=False)["model"] for r in (whole, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), client


def test_virtual_clients_never_fall_back_to_the_cpu_silently():
    import dataclasses

    from fedseg.federated.section import FederatedSettings
    from fedseg.federated.simulation import client_devices

    smoke = settings.federated_settings(config.load_profile("smoke"))
    fl = FederatedSettings.of({"federated": {**smoke, "client_gpus": 0.0, "client_cpus": 1, "cpu_clients": False}})
    assert client_devices(fl, gpus=0) == "virtual clients on the CPU: 1 core(s) each"
    with pytest.raises(ValueError, match="Ray would hide them.*cpu_clients: true"):
        client_devices(fl, gpus=2)
    assert client_devices(dataclasses.replace(fl, cpu_clients=True), gpus=2).endswith("(cpu_clients: true)")
    gpu = dataclasses.replace(fl, client_gpus=0.25, client_cpus=4)
    assert "up to 8 training at once on 2 GPU(s)" in client_devices(gpu, gpus=2)
    with pytest.raises(ValueError, match="no GPU on this machine.*client_gpus: 0"):
        client_devices(gpu, gpus=0)
