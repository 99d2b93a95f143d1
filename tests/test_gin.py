"""GIN augmentation (fedseg.data.gin) on small arrays: shapes, labels, intensities, ranges, seeding, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor

from fedseg.data.gin import (
    RandGINd,
    draw_gin_network,
    gin_augment,
    gin_forward,
    rescale_to_range,
)

SHAPE = (1, 12, 10, 8)


def image(seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(low, high, SHAPE).astype(np.float32))


def sample(seed: int = 0) -> dict:
    label = torch.from_numpy(np.random.default_rng(seed + 100).integers(0, 2, (8, *SHAPE[1:]), dtype=np.uint8))
    return {"image": image(seed), "label": label}


def run(transform: RandGINd, data: dict, seed: int) -> dict:
    transform.set_random_state(seed=seed)
    return transform(data)


@pytest.mark.parametrize("kind", ["torch32", "numpy32", "numpy64", "meta"])
def test_keeps_type_shape_and_dtype(kind):
    base = image()
    value = {"torch32": base, "numpy32": base.numpy(), "numpy64": base.numpy().astype(np.float64),
             "meta": MetaTensor(base, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))}[kind]
    out = run(RandGINd(keys="image", prob=1.0), {"image": value}, seed=1)["image"]
    assert type(out) is type(value)
    assert out.shape == value.shape and out.dtype == value.dtype
    if kind == "meta":
        assert torch.equal(out.affine, value.affine)
    assert not np.allclose(np.asarray(out), np.asarray(value))


def test_label_untouched_and_input_not_modified():
    data = sample()
    image_before, label_before = data["image"].clone(), data["label"].clone()
    out = run(RandGINd(keys="image", prob=1.0), data, seed=2)
    assert out["label"].dtype == torch.uint8 and torch.equal(out["label"], label_before)
    assert torch.equal(data["image"], image_before)
    assert not torch.allclose(out["image"], image_before)


def test_mapping_is_nonlinear_and_can_be_non_monotonic():
    # With 1x1 kernels GIN is a voxel-wise function f(x); on a ramp its shape is visible directly.
    ramp = torch.linspace(0.0, 1.0, int(np.prod(SHAPE))).reshape(SHAPE)
    non_monotonic, non_affine = 0, 0
    for seed in range(20):
        g = gin_augment(ramp, 1.0, torch.Generator().manual_seed(seed), kernel_size=1).flatten().double()
        steps = torch.diff(g)
        non_monotonic += bool((steps > 1e-6).any() and (steps < -1e-6).any())
        x = ramp.flatten().double()
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        residual = g - design @ torch.linalg.lstsq(design, g[:, None]).solution[:, 0]
        non_affine += bool(residual.abs().max() > 1e-3)
    assert non_monotonic >= 2 and non_affine >= 10


def test_default_gin_decorrelates_intensities():
    x = image(3)
    correlations = []
    for seed in range(10):
        out = run(RandGINd(keys="image", prob=1.0, alpha_range=(1.0, 1.0)), {"image": x}, seed)["image"]
        correlations.append(abs(float(torch.corrcoef(torch.stack([out.flatten(), x.flatten()]))[0, 1])))
    assert min(correlations) < 0.9


def test_output_stays_in_input_range():
    x = image(4, low=0.2, high=0.7)
    transform = RandGINd(keys="image", prob=1.0)
    for seed in range(10):
        out = run(transform, {"image": x}, seed)["image"]
        assert float(out.min()) >= float(x.min()) and float(out.max()) <= float(x.max())


def test_seeded_is_reproducible_and_draws_differ():
    transform = RandGINd(keys="image", prob=1.0)
    first = run(transform, sample(), seed=5)["image"]
    again = run(transform, sample(), seed=5)["image"]
    other = run(transform, sample(), seed=6)["image"]
    following = transform(sample())["image"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, following)


def test_seeded_compose_is_reproducible_and_leaves_global_rng_alone():
    pipeline = mt.Compose([mt.RandSpatialCropSamplesd(keys=["image", "label"], roi_size=(6, 6, 6), num_samples=2,
                                                      random_size=False),
                           RandGINd(keys="image", prob=1.0)])
    state = torch.get_rng_state()
    outs = [pipeline.set_random_state(seed=7)(sample()) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(outs[0]) == 2 and outs[0][0]["image"].shape == (1, 6, 6, 6)
    for a, b in zip(*outs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_prob_zero_is_identity_and_prob_half_applies_about_half():
    data = sample()
    transform = RandGINd(keys="image", prob=1.0)
    assert not torch.equal(run(transform, data, seed=8)["image"], data["image"])
    transform.prob = 0.0  # the draws of the previous call must not leak into a skipped one
    assert torch.equal(run(transform, data, seed=8)["image"], data["image"])

    half = RandGINd(keys="image", prob=0.5)
    unchanged = sum(torch.equal(run(half, data, seed)["image"], data["image"]) for seed in range(40))
    assert 8 <= unchanged <= 32


def test_alpha_zero_is_identity_and_alpha_one_is_pure_gin():
    data = sample()
    x = data["image"]
    assert torch.equal(run(RandGINd(keys="image", prob=1.0, alpha_range=(0.0, 0.0)), data, 9)["image"], x)

    pure_transform = RandGINd(keys="image", prob=1.0, alpha_range=(1.0, 1.0))
    pure = run(pure_transform, data, 9)["image"]
    network = draw_gin_network(torch.Generator().manual_seed(pure_transform._seed))
    expected = rescale_to_range(gin_forward(x[None], network), x[None])[0]
    assert torch.allclose(pure, expected, atol=1e-6)
    assert torch.isclose(pure.min(), x.min()) and torch.isclose(pure.max(), x.max())

    mixed = run(RandGINd(keys="image", prob=1.0, alpha_range=(0.3, 0.3)), data, 9)["image"]
    assert torch.allclose(mixed, 0.3 * pure + 0.7 * x, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_uniform_image_stays_finite(value):
    x = torch.full(SHAPE, value)
    for seed in range(3):
        out = run(RandGINd(keys="image", prob=1.0), {"image": x}, seed)["image"]
        assert torch.isfinite(out).all() and torch.allclose(out, x)


def test_fast_convolution_matches_conv3d():
    x = torch.rand(2, 1, 7, 6, 5, dtype=torch.float64)
    for seed in range(4):
        network = draw_gin_network(torch.Generator().manual_seed(seed), layers=3, channels=3,
                                   kernel_size=(1, 3, 5), dtype=torch.float64)
        h = (x - x.mean(dim=(1, 2, 3, 4), keepdim=True)) / (x.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-8)
        for index, (weight, bias) in enumerate(network):
            pad = weight.shape[-1] // 2
            h = F.conv3d(F.pad(h, (pad,) * 6, mode="replicate") if pad else h, weight, bias)
            h = F.leaky_relu(h, 0.01) if index < len(network) - 1 else h
        assert torch.allclose(gin_forward(x, network), h, atol=1e-10)


@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": ()}, {"alpha_range": (0.5, 0.2)},
                                    {"alpha_range": (0.0, 1.5)}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RandGINd(keys="image", **kwargs)
