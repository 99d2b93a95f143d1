"""The federated methods' core arithmetic (SegViz selective aggregation, FedProx) and their wiring."""

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord
from helpers import client_context, client_message, reply

from fedseg.config import load_profile
from fedseg.data.labels import CHANNELS, owned_mask
from fedseg.federated import aggregation, client_app, methods, settings
from fedseg.federated.simulation import federation_run_config
from fedseg.federated.strategies import StudyFedAvg, StudyOwnerFedAvg, StudySegViz
from fedseg.train.models import (
    NoOutputLayer,
    SharedTaskUNet,
    build_network,
    load_weights,
    output_layer,
    split_state_dict,
    unique_state_dict,
)


def segviz_state(value, tasks=("liver", "spleen")):
    torch.manual_seed(0)
    model = SharedTaskUNet(tasks=tasks, channels=(4, 8), strides=(2,))
    return {k: (torch.full_like(v, value) if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


def test_selective_average_keeps_task_blocks_and_averages_the_shared_block_by_n_k():
    rng = np.random.default_rng(0)
    datasets = ["liver", "spleen", "pancreas"]
    base = SharedTaskUNet(tasks=datasets, channels=(4, 8), strides=(2,)).state_dict()
    states = [{k: rng.normal(size=v.shape).astype(np.float32) if v.is_floating_point() else v.numpy()
               for k, v in base.items()} for _ in datasets]
    sizes = [79, 25, 169]
    out = aggregation.selective_average(states, sizes, datasets)
    groups = split_state_dict(base)
    for key in groups["shared"]:
        if states[0][key].dtype == np.float32:
            expected = sum(n * s[key].astype(np.float64) for n, s in zip(sizes, states)) / sum(sizes)
            assert np.allclose(out[key], expected, rtol=1e-6, atol=1e-7), key
    for k, dataset in enumerate(datasets):
        for key in groups[f"task:{dataset}"]:
            assert out[key].tobytes() == states[k][key].tobytes(), key  # byte for byte, the owner's block
    # a task block nobody sent this round keeps the previous global model's
    out = aggregation.selective_average(states[:2], sizes[:2], datasets[:2], previous=states[2])
    assert all(out[key].tobytes() == states[2][key].tobytes() for key in groups["task:pancreas"])
    with pytest.raises(ValueError, match="No client owns"):
        aggregation.selective_average(states[:2], sizes[:2], datasets[:2])


def test_the_segviz_strategy_returns_each_owners_task_block_unchanged(tmp_path):
    liver, spleen = segviz_state(1.0), segviz_state(3.0)
    strategy = StudySegViz(tmp_path, num_clients=2)
    strategy.previous_arrays = ArrayRecord(segviz_state(0.0))
    arrays, _ = strategy.aggregate_train(1, [reply(11, "spleen", spleen, num_examples=1),
                                             reply(10, "liver", liver, num_examples=3)])
    result = arrays.to_torch_state_dict()
    for key, value in result.items():
        if not value.is_floating_point():
            continue
        if key.startswith("shared."):
            assert torch.equal(value, torch.full_like(value, 0.75 * 1.0 + 0.25 * 3.0)), key
        elif key.startswith("task.liver."):
            assert torch.equal(value, liver[key]), key
        else:
            assert torch.equal(value, spleen[key]), key


def test_proximal_term_is_zero_at_the_global_weights_and_its_gradient_is_mu_times_the_drift():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    term = methods.fedprox.proximal_term(model.state_dict(), mu=0.5)
    logits = torch.zeros(1)
    assert float(term(model, logits, {}).detach()) == 0.0
    with torch.no_grad():
        model.weight += 2.0
    value = term(model, logits, {})
    value.backward()
    assert float(value) == pytest.approx(0.5 * 0.5 * 4.0 * model.weight.numel())
    assert torch.allclose(model.weight.grad, torch.full_like(model.weight, 0.5 * 2.0))
    assert torch.equal(model.bias.grad, torch.zeros_like(model.bias)) and torch.equal(reference["bias"], model.bias)


def test_network_config_gives_segviz_one_task_block_per_dataset():
    cfg = {"model": {"name": "UNet", "channels": [8, 16], "strides": [2], "num_res_units": 1},
           "federated": {"method": "segviz"}}
    config = methods.get("segviz").network(cfg["model"], ["liver", "spleen", "liver"])
    assert config == {"name": "SharedTaskUNet", "tasks": ["liver", "spleen"], "channels": [8, 16], "strides": [2]}
    assert isinstance(build_network(**config), SharedTaskUNet)
    assert methods.get("fedprox").network(cfg["model"], ["liver"]) == cfg["model"]
    with pytest.raises(ValueError, match="federated.method"):
        settings.federated_settings({"train": {"steps": 4}, "federated": {"method": "fedsgd"}})


def test_segviz_is_shaped_like_the_profiles_network_dynunet_included():
    paper = load_profile("paper")
    config = methods.get("segviz").network(paper["model"], ["liver", "spleen"])
    assert config == {"name": "SharedTaskUNet", "tasks": ["liver", "spleen"],
                      "channels": [32, 64, 128, 256, 320], "strides": [2, 2, 2, 2]}  # DynUNet's filters and strides
    model = {"name": "DynUNet", "filters": [8, 16], "strides": [2, 2]}
    with pytest.raises(ValueError, match="strides starting with 1"):
        methods.get("segviz").network(model, ["liver"])
    with pytest.raises(ValueError, match="set model.name to UNet or DynUNet"):
        methods.get("segviz").network({"name": "SegResNet"}, ["liver"])


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_builds_the_paper_profiles_network_and_takes_a_step(tiny, method):
    """The paper profile's network, loss and AMP setting with each method: one local step on a tiny input."""
    cfg, cases, run_dir = tiny
    paper = load_profile("paper")
    cfg["model"] = paper["model"]
    cfg["train"].update(loss=paper["train"]["loss"], amp=paper["train"]["amp"], lr=paper["train"]["lr"])
    cfg["preprocess"]["patch_size"] = [32, 32, 32]  # four downsamplings need 16 voxels; 32 keeps a 2^3 bottleneck
    cfg["federated"].update(method=method, local_steps=1, rounds=1, pseudo_after=0, distill_weight=1.0, mu=0.01)
    context = client_context(cfg, run_dir, cases, {"partition-id": 1})  # the spleen client
    trained = settings.study_config(context.run_config, context.node_config)["model"]
    assert trained["name"] == ("SharedTaskUNet" if method == "segviz" else "DynUNet")
    message, model = client_message({**cfg, "model": trained}, "train")
    out = client_app.app(message, context)
    assert not out.has_error(), out.error
    assert np.isfinite(out.content["metrics"]["train-loss"])
    sent = out.content["arrays"].to_torch_state_dict()
    assert list(sent) == list(unique_state_dict(model))  # each weight once, DynUNet's aliases left out
    assert any(not torch.equal(sent[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def test_a_segviz_client_trains_the_shared_block_and_its_own_task_block_only(tiny):
    cfg, cases, run_dir = tiny
    cfg["federated"]["method"] = "segviz"
    context = client_context(cfg, run_dir, cases, {"partition-id": 1})  # spleen of liver,spleen
    cfg_model = settings.study_config(context.run_config, context.node_config)["model"]
    assert cfg_model["name"] == "SharedTaskUNet" and cfg_model["tasks"] == ["liver", "spleen"]
    torch.manual_seed(0)
    model = build_network(**cfg_model)
    message, _ = client_message({**cfg, "model": cfg_model}, "train")
    message.content["arrays"] = ArrayRecord(model.state_dict())
    out = client_app.app(message, context)
    assert not out.has_error(), out.error
    sent = out.content["arrays"].to_torch_state_dict()
    before = model.state_dict()
    changed = {k for k, v in sent.items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert any(k.startswith("task.spleen.") for k in changed) and any(k.startswith("shared.") for k in changed)
    assert not any(k.startswith("task.liver.") for k in changed)  # another client's block gets no gradient


def test_a_fedprox_client_stays_closer_to_the_global_model(tiny):
    cfg, cases, run_dir = tiny
    drift = {}
    for method, mu in (("fedavg", 0.0), ("fedprox", 100.0)):
        cfg["federated"].update(method=method, mu=mu)
        context = client_context(cfg, run_dir / method, cases, {"partition-id": 0})
        message, model = client_message(cfg, "train")
        sent = client_app.app(message, context).content["arrays"].to_torch_state_dict()
        drift[method] = sum(float((sent[k] - v).pow(2).sum()) for k, v in model.state_dict().items()
                            if v.is_floating_point())
    assert drift["fedprox"] < drift["fedavg"]


@pytest.mark.slow
def test_a_segviz_federation_runs_in_simulation_and_its_checkpoints_load_as_trained(tiny):
    from fedseg.evaluate.evaluation import load_best
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    cfg["federated"]["method"] = "segviz"
    result = run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    assert set(result["rounds"]["kind"]) == {"train", "evaluate", "global"}
    final = torch.load(result["global_final"], weights_only=False)["model"]
    local = torch.load(result["local_best"]["spleen"], weights_only=False)["model"]
    assert any(k.startswith("task.spleen.") for k in final) and any(k.startswith("task.liver.") for k in final)
    if torch.load(result["local_best"]["spleen"], weights_only=False)["step"] == 2:  # the last round's local model
        assert all(torch.equal(final[k], v) for k, v in local.items() if k.startswith("task.spleen."))
    model = load_best(cfg, result["global_best"])  # the profile says UNet; the run trained a SharedTaskUNet
    assert isinstance(model, SharedTaskUNet) and model.tasks == ("liver", "spleen")


def test_the_distillation_term_is_zero_against_itself_and_pulls_unowned_channels_to_the_teacher():
    torch.manual_seed(0)
    student = build_network("UNet", channels=(4, 8), strides=(2,), num_res_units=1)
    image = torch.rand(2, 1, 16, 16, 16)
    label = torch.zeros(2, 8, 16, 16, 16)
    owned = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0]] * 2)  # a liver client
    batch = {"image": image, "label": label, "owned": owned}
    same = methods.distill.distillation_term(copy_of(student), weight=2.0)
    assert float(same(student, student(image), batch).detach()) == pytest.approx(0.0, abs=1e-6)
    other = copy_of(student)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    value = methods.distill.distillation_term(other, weight=2.0)(student, student(image), batch)
    assert float(value.detach()) > 0
    value.backward()
    assert all(p.grad is None for p in other.parameters())  # the teacher is frozen


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_a_distill_client_trains_and_replies(tiny):
    cfg, cases, run_dir = tiny
    cfg["federated"].update(method="distill", distill_weight=1.0)
    context = client_context(cfg, run_dir, cases, {"partition-id": 0})
    message, _ = client_message(cfg, "train")
    out = client_app.app(message, context)
    assert not out.has_error(), out.error
    assert np.isfinite(out.content["metrics"]["train-loss"])


def test_fedgin_switches_gin_on_in_local_training_only():
    from fedseg.data.gin import RandGINd
    from fedseg.data.transforms import augment

    cfg = {"preprocess": {"patch_size": [8, 8, 8], "patches_per_volume": 1, "patch_sampling": "random",
                          "intensity_shift": {"prob": 0.0, "offset": 0.1}}, "federated": {"method": "fedgin"}}
    local = methods.get("fedgin").local_config(cfg)
    assert local["preprocess"]["gin"] == methods.fedgin.GIN_DEFAULT and "gin" not in cfg["preprocess"]
    assert any(isinstance(t, RandGINd) for t in augment(local).transforms)
    assert not any(isinstance(t, RandGINd) for t in augment(cfg).transforms)
    fedavg = {**cfg, "federated": {"method": "fedavg"}}
    assert methods.get("fedavg").local_config(fedavg) is fedavg  # other methods train as the profile says
    image = torch.rand(1, 8, 8, 8)
    label = (torch.rand(8, 8, 8, 8) > 0.5).to(torch.uint8)
    sample = {"image": image, "label": label, "foreground": label[1:2]}
    local["preprocess"]["gin"] = {"prob": 1.0}
    out = augment(local)(sample)[0]
    assert torch.equal(out["label"], label) and not torch.allclose(out["image"], image)


def test_a_pseudo_client_trains_on_targets_completed_by_the_global_model(tiny):
    from fedseg.data.transforms import case_records

    cfg, cases, run_dir = tiny
    cfg["federated"].update(method="pseudo", pseudo_after=0)
    records = case_records(cfg["data_root"], cases[(cases.dataset == "liver") & (cases.split == "train")])

    class Teacher(torch.nn.Module):  # says "spleen" wherever the image is dark, liver included
        def forward(self, x):
            logits = torch.full((x.shape[0], 8, *x.shape[2:]), -10.0)
            logits[:, 3] = torch.where(x[:, 0] < 0.7, 10.0, -10.0)
            return logits

    run_config = federation_run_config(cfg, run_dir, clients=("liver", "spleen"))
    study = settings.study_config(run_config)
    volumes = methods.pseudo.pseudo_labelled_volumes(study, Teacher(), records, torch.device("cpu"))
    for volume in volumes:
        owned = np.asarray(volume["owned"]).astype(bool)
        assert owned[3] and owned[1] and owned[2]  # spleen completed; the liver client's own channels kept
        assert volume["label"][3].any() and not (volume["label"][3].bool() & volume["label"][1].bool()).any()
    folder = run_dir / "pseudo"  # as a client keeps them: on disk, a byte per voxel, read back one at a time
    on_disk = methods.pseudo.pseudo_labelled_volumes(study, Teacher(), records, torch.device("cpu"), folder=folder)
    assert isinstance(on_disk, methods.pseudo.CompletedVolumes) and len(on_disk) == len(volumes)
    for kept, read in zip(volumes, on_disk):
        assert torch.equal(kept["label"], read["label"]) and torch.equal(kept["foreground"], read["foreground"])
        assert np.array_equal(kept["owned"], read["owned"]) and torch.equal(kept["image"], read["image"])
    written = sorted(folder.glob("*.pt"))
    assert len(written) == len(records)
    label = torch.load(written[0], weights_only=False)["label"]
    assert label.dtype == torch.uint8 and label.shape == volumes[0]["label"].shape[1:]  # 1 byte, not 8, per voxel
    context = client_context(cfg, run_dir, cases, {"partition-id": 0})
    message, _ = client_message(cfg, "train", server_round=1)
    out = client_app.app(message, context)
    assert not out.has_error(), out.error


def test_a_segviz_client_scores_the_meta_model_with_its_own_task_block_alone():
    torch.manual_seed(0)
    model = SharedTaskUNet(tasks=("liver", "pancreas", "kits19", "spleen"), channels=(4, 8), strides=(2,)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        meta = model(x)
        for dataset in ("liver", "pancreas", "kits19", "spleen"):
            block = methods.segviz.evaluation_block(model, dataset)
            assert block == dataset
            owned = torch.as_tensor(owned_mask(dataset))
            assert torch.equal(model(x, task=block)[:, owned], meta[:, owned])
    assert methods.segviz.evaluation_block(model, "liver-2of3") == "liver"  # a shard scores with its dataset's block
    assert methods.segviz.evaluation_block(build_network("UNet", channels=(4, 8), strides=(2,)), "liver") is None


# --------------------------------------------------------------------------------------------------
# ownerfedavg and the dilution of FedAvg (the output layer of channel c owned by c's annotators only)
# --------------------------------------------------------------------------------------------------

OUTPUT_AXES = {"out.weight": 1, "out.bias": 0}  # a ConvTranspose head: weight (in, out, k, k, k)


def head(value, body=0.0):
    """A fake network: a body array and an 8-channel transposed-convolution head, every entry `value`."""
    return {"body": torch.full((3,), float(body)), "out.weight": torch.full((2, 8, 1, 1, 1), float(value)),
            "out.bias": torch.full((8,), float(value))}


def channel_values(array, axis, channel):
    return np.take(np.asarray(array), channel, axis=axis)


def test_owner_output_average_averages_each_channel_over_its_owners_only():
    previous = {k: v.numpy() for k, v in head(-7.0).items()}
    states = [{k: v.numpy() for k, v in head(value).items()} for value in (1.0, 5.0, 11.0)]
    names = ["liver-1of2", "liver-2of2", "pancreas"]
    out = aggregation.owner_output_average(states, [3, 1, 2], names, OUTPUT_AXES, previous)
    assert set(out) == set(OUTPUT_AXES)
    for key, axis in OUTPUT_AXES.items():
        assert out[key].dtype == np.float32 and out[key].shape == previous[key].shape
        for channel in range(8):
            values = channel_values(out[key], axis, channel)
            if owned_mask("liver")[channel]:  # the two liver shards, weighted 3 : 1
                assert np.array_equal(values, np.full_like(values, 0.75 * 1.0 + 0.25 * 5.0)), (key, channel)
            elif owned_mask("pancreas")[channel]:  # its one owner, exactly
                assert np.array_equal(values, np.full_like(values, 11.0)), (key, channel)
            else:  # background, kidney, spleen: nobody replying owns them
                assert np.array_equal(values, np.full_like(values, -7.0)), (key, channel)


def test_the_ownerfedavg_strategy_averages_the_body_by_n_k_and_the_head_by_owners(tmp_path):
    strategy = StudyOwnerFedAvg(tmp_path, num_clients=2, output_axes=OUTPUT_AXES)
    strategy.previous_arrays = ArrayRecord(head(0.0))
    arrays, _ = strategy.aggregate_train(1, [reply(11, "spleen", head(4.0, body=4.0), num_examples=1),
                                             reply(10, "liver", head(2.0, body=2.0), num_examples=3)])
    result = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
    assert np.array_equal(result["body"], np.full(3, 0.75 * 2.0 + 0.25 * 4.0, dtype=np.float32))  # FedAvg
    for key, axis in OUTPUT_AXES.items():
        for channel in range(8):
            expected = 2.0 if owned_mask("liver")[channel] else 4.0 if owned_mask("spleen")[channel] else 0.0
            assert np.all(channel_values(result[key], axis, channel) == expected), (key, channel)
    with pytest.raises(ValueError, match="output layer"):
        StudyOwnerFedAvg(tmp_path, num_clients=2)


def test_output_moves_gives_the_owner_share_under_fedavg_and_sees_others_pulling_against():
    previous = {k: v.numpy() for k, v in head(0.0).items()}
    liver, pancreas = head(1.0), head(0.0)  # masked loss: pancreas leaves the liver head as it got it
    states = [{k: v.numpy() for k, v in s.items()} for s in (liver, pancreas)]
    averaged = {k: 0.25 * states[0][k] + 0.75 * states[1][k] for k in OUTPUT_AXES}
    rows = {r["channel"]: r for r in aggregation.output_moves(previous, states, [1, 3], ["liver", "pancreas"], averaged,
                                                          OUTPUT_AXES)}
    assert len(rows) == 7 and rows["liver"]["owners"] == "liver"
    assert rows["liver"]["owner_share"] == 0.25 and rows["liver"]["others_move"] == 0.0
    assert rows["liver"]["ratio"] == pytest.approx(0.25) and rows["liver"]["cosine"] == pytest.approx(1.0)
    assert rows["liver"]["owner_move"] == pytest.approx(np.sqrt(3.0))  # 2 weights + 1 bias of channel 1, each +1
    assert np.isnan(rows["spleen"]["ratio"]) and rows["spleen"]["owners"] == ""
    # a literal loss: the pancreas client teaches "no liver" and pulls the liver head the other way, harder
    states[1] = {k: v.numpy() for k, v in head(-1.0).items()}
    averaged = {k: 0.25 * states[0][k] + 0.75 * states[1][k] for k in OUTPUT_AXES}
    rows = {r["channel"]: r for r in aggregation.output_moves(previous, states, [1, 3], ["liver", "pancreas"], averaged,
                                                          OUTPUT_AXES)}
    assert rows["liver"]["others_move"] == pytest.approx(np.sqrt(3.0))
    assert rows["liver"]["cosine"] == pytest.approx(-1.0) and rows["liver"]["ratio"] == pytest.approx(0.5)


def test_the_strategy_writes_the_dilution_of_every_round(tmp_path):
    strategy = StudyFedAvg(tmp_path, num_clients=2, output_axes=OUTPUT_AXES)
    for server_round in (1, 2):
        strategy.previous_arrays = ArrayRecord(head(0.0))
        strategy.aggregate_train(server_round, [reply(10, "liver", head(1.0), num_examples=1),
                                                reply(11, "spleen", head(0.0), num_examples=3)])
    table = pd.read_csv(tmp_path / "metrics" / "fl_dilution.csv")
    assert list(table["round"].unique()) == [1, 2] and len(table) == 14
    liver = table[table["channel"] == "liver"]
    assert np.allclose(liver["ratio"], 0.25) and np.allclose(liver["owner_share"], 0.25)


def test_output_layer_is_the_convolution_whose_output_is_the_logits_and_refuses_residual_unets():
    """The layer is found on the real output path: its output is the network's logits, so its row c (and bias c)
    write logit c alone. A residual UNet has no such layer and is refused, naming the network and the fix."""
    transposed = build_network("UNet", channels=[8, 16], strides=[2], num_res_units=0)
    axes = output_layer(transposed)
    assert axes == {"model.2.conv.weight": 1, "model.2.conv.bias": 0}  # ConvTranspose: weight (in, out, k, k, k)
    assert transposed.state_dict()["model.2.conv.weight"].shape[1] == 8
    assert output_layer(build_network("DynUNet", filters=[8, 16, 32], strides=[1, 2, 2])) == {
        "output_block.conv.conv.weight": 0, "output_block.conv.conv.bias": 0}
    # nudging the layer's channel-1 entries moves logit 1 and no other logit
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in unique_state_dict(transposed).items()}
    nudged = {k: v.clone() for k, v in state.items()}
    nudged["model.2.conv.weight"][:, 1] += 0.1
    nudged["model.2.conv.bias"][1] += 0.1
    before, after = logits_of(transposed, state, x), logits_of(transposed, nudged, x)
    assert not torch.equal(before[:, 1], after[:, 1])
    assert torch.equal(before[:, [0, *range(2, 8)]], after[:, [0, *range(2, 8)]])
    for units in (1, 2):
        residual = build_network("UNet", channels=[8, 16], strides=[2], num_res_units=units)
        with pytest.raises(NoOutputLayer, match=rf"UNet with num_res_units={units} has no output layer of its own"
                                                r".*num_res_units: 0"):
            output_layer(residual)
    with pytest.raises(NoOutputLayer, match="SharedTaskUNet"):
        output_layer(SharedTaskUNet(tasks=("liver", "spleen"), channels=(4, 8), strides=(2,)))


def logits_of(model, state, x):
    """`model`'s logits on `x` with weights `state` (eval mode, no gradient)."""
    load_weights(model, state).eval()
    with torch.no_grad():
        return model(x)


def top_layer_step(model, state, x, loss_of, lr=0.5):
    """`state` after one gradient step of `loss_of(logits)` on the top up-layer of a MONAI UNet (`model.2.*`: the
    plain UNet's transposed convolution; the residual UNet's transposed convolution, norm, PReLU and last
    ResidualUnit), everything else as it was: an update of the head alone, as a client would make it."""
    load_weights(model, state).train()
    model.zero_grad()
    loss_of(model(x)).backward()
    named = dict(model.named_parameters())
    return {k: (v - lr * named[k].grad).detach() if k.startswith("model.2.") and k in named else v.clone()
            for k, v in state.items()}


@pytest.mark.parametrize("num_res_units", [0, 1])
def test_ownerfedavg_keeps_a_non_owners_update_off_the_channels_logit_on_the_real_output_path(tmp_path, num_res_units):
    """Measured on the logits, not on the layer ownerfedavg averages: after one ownerfedavg aggregation a
    non-owner's update of the head (the spleen client teaching "no liver", a literal loss) leaves the liver logit
    exactly as it was, and the liver client's update of it is kept whole; plain FedAvg moves the liver logit
    with the non-owner's update and keeps only the owner's share of the owner's. A residual UNet has no head
    that does this (its last ResidualUnit adds the transposed convolution's liver channel, which everyone trains,
    to the liver logit): output_layer and ownerfedavg refuse it instead of averaging the wrong layer."""
    torch.manual_seed(0)
    model = build_network("UNet", channels=[8, 16], strides=[2], num_res_units=num_res_units)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    liver, spleen = CHANNELS.index("liver"), CHANNELS.index("spleen")
    start = {k: v.clone() for k, v in unique_state_dict(model).items()}  # not the model's own tensors
    owner = top_layer_step(model, start, x, lambda z: -z[:, liver].mean())  # the liver client: more liver
    other = top_layer_step(model, start, x, lambda z: z[:, liver].mean() - z[:, spleen].mean())  # "no liver"
    try:
        axes = output_layer(model)
    except NoOutputLayer as error:
        assert num_res_units == 1 and "UNet with num_res_units=1" in str(error)
        with pytest.raises(ValueError, match="ownerfedavg is refused on this network: UNet with num_res_units=1"):
            methods.get("ownerfedavg").output_layer(model)
        return

    def liver_logit(method, liver_state, spleen_state):
        strategy = (StudyOwnerFedAvg if method == "ownerfedavg" else StudyFedAvg)(
            tmp_path / method, num_clients=2, output_axes=axes)
        strategy.previous_arrays = ArrayRecord(start)
        arrays, _ = strategy.aggregate_train(1, [reply(10, "liver", liver_state, num_examples=1),
                                                 reply(11, "spleen", spleen_state, num_examples=3)])
        return logits_of(model, arrays.to_torch_state_dict(), x)[:, liver]

    unchanged, owners_own = logits_of(model, start, x)[:, liver], logits_of(model, owner, x)[:, liver]
    moved_by_other = (liver_logit("ownerfedavg", start, other) - unchanged).abs().max().item()
    assert moved_by_other == 0, f"a non-owner's head update moved the liver logit by {moved_by_other} (ownerfedavg)"
    assert torch.equal(liver_logit("ownerfedavg", owner, start), owners_own)  # the owner's update, whole
    assert num_res_units == 0
    assert (liver_logit("fedavg", start, other) - unchanged).abs().max() > 1e-3  # FedAvg: the conflict reaches it
    kept = (liver_logit("fedavg", owner, start) - unchanged).abs().mean() / (owners_own - unchanged).abs().mean()
    assert kept.item() == pytest.approx(0.25, rel=1e-3)  # FedAvg: the owner's share of cases (dilution)


def test_a_residual_unet_measures_no_dilution_and_says_why(tmp_path):
    """On a network without an output layer of its own, FedAvg's dilution is not measured (rather than measured
    on weights that are not the logits' own), an earlier federation's table in the folder is removed, and the
    tables say "not measured" with the reason."""
    from fedseg.federated.strategies import record_dilution
    from fedseg.reporting import report

    residual = build_network("UNet", channels=[8, 16], strides=[2], num_res_units=1)
    axes, reason = methods.get("fedavg").output_layer(residual)
    assert axes is None and reason.startswith("UNet with num_res_units=1 has no output layer of its own")
    assert methods.get("segviz").output_layer(residual) == (None, None)
    plain = build_network("UNet", channels=[8, 16], strides=[2], num_res_units=0)
    assert methods.get("ownerfedavg").output_layer(plain) == (output_layer(plain), None)
    with pytest.raises(ValueError, match="ownerfedavg is refused on this network: UNet with num_res_units=1"):
        methods.check_network({"federated": {"method": "ownerfedavg"}, "preprocess": {"patch_size": [16] * 3},
                               "model": {"name": "UNet", "channels": [8, 16], "strides": [2], "num_res_units": 1}})
    methods.check_network({"federated": {"method": "fedavg"}, "model": {"name": "UNet", "num_res_units": 1}})

    folders = {"plain": tmp_path / "plain", "residual": tmp_path / "residual"}
    stale = tmp_path / "residual" / "metrics" / "fl_dilution.csv"  # an earlier federation's, in the same folder
    stale.parent.mkdir(parents=True)
    stale.write_text("round,channel\n1,liver\n")
    record_dilution(folders["residual"], measured=False, reason=reason)
    assert not stale.exists()
    strategy = StudyFedAvg(folders["plain"], num_clients=2, output_axes=OUTPUT_AXES)
    strategy.previous_arrays = ArrayRecord(head(0.0))
    strategy.aggregate_train(1, [reply(10, "liver", head(1.0), num_examples=1),
                                 reply(11, "spleen", head(0.0), num_examples=3)])
    dilution, unmeasured = report.read_dilution(folders), report.unmeasured_dilution(folders)
    assert set(dilution) == {"plain"} and unmeasured == {"residual": reason}
    table = report.dilution_summary(dilution, unmeasured)
    assert (table.loc[("residual", "all channels")] == report.NOT_MEASURED).all()
    assert table.loc[("plain", "liver"), "global / owner move"] == 0.25
    assert f"**residual: not measured.** {reason}" in report.dilution_note(unmeasured)
    record_dilution(folders["residual"], measured=True)  # a later federation there that measures it
    assert report.unmeasured_dilution(folders) == {}


def test_ownerfedavg_on_a_residual_unet_is_refused_before_the_federation_starts(tiny):
    from fedseg.federated.simulation import run_federation

    cfg, cases, run_dir = tiny
    cfg["federated"]["method"], cfg["model"]["num_res_units"] = "ownerfedavg", 1
    with pytest.raises(ValueError, match="ownerfedavg is refused on this network: UNet with num_res_units=1"):
        run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    assert not (run_dir / "fl" / "state.pt").exists() and not (run_dir / "metrics" / "fl_rounds.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, loss, num_res_units", [("ownerfedavg", "masked_dice", 0),
                                                         ("fedavg", "literal_dice_ce", 0),
                                                         ("fedavg", "masked_dice", 1)])
def test_the_head_moves_as_each_method_and_loss_predict_in_simulation(tiny, method, loss, num_res_units):
    """ownerfedavg with a masked loss: no non-owner moves an owned channel's head; a literal loss makes non-owners
    move every head; a residual UNet (no head of its own) writes "not measured" and why, not numbers."""
    from fedseg.federated.simulation import run_federation
    from fedseg.reporting import report

    cfg, cases, run_dir = tiny
    cfg["federated"]["method"], cfg["train"]["loss"] = method, loss
    cfg["model"]["num_res_units"] = num_res_units
    run_federation(cfg, run_dir, cases, clients=("liver", "spleen"), progress=False)
    table = run_dir / "metrics" / "fl_dilution.csv"
    if num_res_units:
        assert not table.exists()
        reason = report.unmeasured_dilution({"fl": run_dir})["fl"]
        assert reason.startswith("UNet with num_res_units=1 has no output layer of its own")
        return
    assert not (run_dir / "metrics" / "fl_dilution_not_measured.txt").exists()
    dilution = pd.read_csv(table)
    owned = dilution[dilution["owners"].notna()]
    if method == "ownerfedavg":
        assert (owned["others_move"] == 0).all() and (owned["owner_move"] > 0).all()
    else:
        assert (dilution["others_move"] > 0).all()  # every channel, owned or not, is taught by the non-owners
