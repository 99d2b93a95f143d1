"""Networks by name and the SegViz shared-block + task-block network, on small CPU inputs."""

import importlib.util

import pytest
import torch

from fedseg.data.labels import CHANNEL_INDEX, NUM_CHANNELS
from fedseg.train.models import (
    ABSENT_LOGIT,
    NETWORKS,
    SharedTaskUNet,
    build_network,
    count_parameters,
    load_weights,
    network_kwargs,
    parameter_group,
    split_state_dict,
    unique_state_dict,
)

TASKS = ("liver", "pancreas", "kits19", "spleen")
HAS_EINOPS = importlib.util.find_spec("einops") is not None
#: Transformers need MONAI's optional einops; UNETR is told the patch size, SwinUNETR needs 64^3 or more.
NEEDS = {"UNETR": ({"img_size": 32}, 32), "SwinUNETR": ({}, 64)}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_each_network_maps_a_patch_to_eight_logit_channels(name):
    if name in NEEDS and not HAS_EINOPS:
        pytest.skip(f"{name} needs einops, which MONAI imports optionally")
    kwargs, size = NEEDS.get(name, ({}, 32))
    torch.manual_seed(0)
    model = build_network(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size, size))
    assert out.shape == (1, NUM_CHANNELS, size, size, size)
    assert count_parameters(model) > 0


def test_unknown_network_names_the_known_ones():
    with pytest.raises(ValueError, match="UNet, BasicUNet, DynUNet, SegResNet, AttentionUnet"):
        build_network("C2FNAS")


def test_profile_kwargs_override_defaults_and_typos_are_named():
    assert network_kwargs("UNet", num_res_units=2)["num_res_units"] == 2
    assert network_kwargs("UNet")["channels"] == (16, 32, 64, 128)
    dyn = network_kwargs("DynUNet", filters=[32, 64, 128, 256, 320], strides=[1, 2, 2, 2, 2])
    assert dyn["kernel_size"] == [3] * 5 and dyn["upsample_kernel_size"] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="num_res_unit"):
        build_network("UNet", num_res_unit=2)


def small_segviz(tasks=TASKS):
    torch.manual_seed(0)
    return SharedTaskUNet(tasks, channels=(4, 8, 16), strides=(2, 2)).eval()


def patch():
    torch.manual_seed(1)
    return torch.randn(2, 1, 16, 16, 16)


def test_segviz_gives_eight_channels_per_task_and_for_the_meta_model():
    model, x = small_segviz(), patch()
    with torch.no_grad():
        for task in TASKS:
            assert model(x, task).shape == (2, NUM_CHANNELS, 16, 16, 16)
        assert model(x).shape == (2, NUM_CHANNELS, 16, 16, 16)
    with pytest.raises(ValueError, match="liver, pancreas, kits19, spleen"):
        model(x, "btcv")


def test_every_parameter_is_in_exactly_one_group_and_every_group_has_some():
    model = small_segviz()
    state = model.state_dict()
    groups = split_state_dict(state)
    assert set(groups) == {"shared", *(f"task:{t}" for t in TASKS)}
    assert all(groups[g] for g in groups)
    assert sorted(k for part in groups.values() for k in part) == sorted(state)
    for name, _ in model.named_parameters():
        assert parameter_group(name) in groups and name in groups[parameter_group(name)]
    assert all(k.startswith("shared.") for k in groups["shared"])
    assert all(k.startswith("task.spleen.") for k in groups["task:spleen"])
    assert count_parameters(model) == sum(v.numel() for part in groups.values() for v in part.values())
    with pytest.raises(ValueError, match="module."):
        parameter_group("module.shared.encoder.0.conv1.conv.weight")


def test_changing_one_task_block_leaves_the_other_tasks_unchanged():
    model, x = small_segviz(), patch()
    with torch.no_grad():
        before = {t: model(x, t) for t in TASKS}
        for p in model.task["liver"].parameters():
            p.add_(0.5)
        assert not torch.allclose(model(x, "liver"), before["liver"])
        for t in ("pancreas", "kits19", "spleen"):
            assert torch.equal(model(x, t), before[t])
        for p in model.shared.parameters():
            p.add_(0.5)
        assert not torch.allclose(model(x, "spleen"), before["spleen"])


def test_meta_model_takes_each_channel_from_the_task_that_owns_it():
    model, x = small_segviz(), patch()
    with torch.no_grad():
        meta = model(x)
        per_task = {t: model(x, t) for t in TASKS}
    for channel, task in [("liver", "liver"), ("liver_tumor", "liver"), ("spleen", "spleen"),
                          ("pancreas", "pancreas"), ("pancreas_tumor", "pancreas"),
                          ("kidney", "kits19"), ("kidney_tumor", "kits19")]:
        c = CHANNEL_INDEX[channel]
        assert torch.equal(meta[:, c], per_task[task][:, c])
    # background = 1 - max foreground probability, i.e. logit -max(foreground logits)
    assert torch.equal(meta[:, 0], -meta[:, 1:].amax(dim=1))


def test_two_node_meta_model_predicts_channels_no_task_owns_as_absent():
    model, x = small_segviz(("liver", "spleen")), patch()
    with torch.no_grad():
        meta = model(x)
    for channel in ("pancreas", "pancreas_tumor", "kidney", "kidney_tumor"):
        assert torch.all(meta[:, CHANNEL_INDEX[channel]] == ABSENT_LOGIT)
    assert torch.equal(meta[:, CHANNEL_INDEX["spleen"]], model(x, "spleen")[:, CHANNEL_INDEX["spleen"]])


def test_segviz_refuses_tasks_with_no_label_map():
    with pytest.raises(ValueError, match="dataset names"):
        SharedTaskUNet(("liver", "lungs"))


def test_a_dynunet_state_travels_with_each_tensor_once_and_loads_back_whole():
    torch.manual_seed(0)
    model = build_network("DynUNet", filters=(4, 8, 16), strides=(1, 2, 2))
    full, unique = model.state_dict(), unique_state_dict(model)
    assert len(unique) < len(full) and any(k.startswith("skip_layers.") for k in full)  # DynUNet aliases its blocks
    assert all(torch.equal(full[k], v) for k, v in unique.items())
    nbytes = {name: sum(v.numel() * v.element_size() for v in state.values())
              for name, state in (("full", full), ("unique", unique))}
    assert nbytes["unique"] < 0.6 * nbytes["full"]
    torch.manual_seed(1)
    other = load_weights(build_network("DynUNet", filters=(4, 8, 16), strides=(1, 2, 2)), unique)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in full.items())  # aliases restored
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(model.eval()(x), other.eval()(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(other, {k: v for k, v in unique.items() if not k.startswith("input_block.")})
    unet = build_network("UNet", channels=(4, 8), strides=(2,))
    assert list(unique_state_dict(unet)) == list(unet.state_dict())  # nothing to drop in a network without aliases
