"""The mechanism cells of 01, 02 and 04 (one label map, one training step, one BTCV case): their figures drawn from
small arrays, and the facts about the package those cells rely on."""

import matplotlib

matplotlib.use("Agg")
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedseg.config import load_profile  # noqa: E402
from fedseg.data.labels import CHANNEL_INDEX, CHANNELS, owned_mask, to_multihot  # noqa: E402
from fedseg.reporting import figures  # noqa: E402
from fedseg.train import inference  # noqa: E402
from fedseg.train.losses import LOSSES  # noqa: E402
from fedseg.train.models import build_network  # noqa: E402
from fedseg.train.training import seed_everything  # noqa: E402


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_label_channels_figure_greys_the_channels_a_site_does_not_own():
    label = np.zeros((10, 8), np.int16)
    label[2:6, 2:6] = 1
    label[3, 3] = 2  # a liver tumour voxel: liver and liver_tumor both on
    sites = {"liver": {"label": label, "target": to_multihot(label, "liver"), "owned": owned_mask("liver"),
                       "case_id": "liver_0, z 4"},
             "spleen": {"label": label.clip(0, 1), "target": to_multihot(label.clip(0, 1), "spleen"),
                        "owned": owned_mask("spleen"), "case_id": "spleen_2, z 1"}}
    fig = figures.label_channels_figure(sites)
    axes = np.array(fig.axes).reshape(2, 1 + len(CHANNELS))
    for row, site in zip(axes, sites):
        unknown = [c for ax, c in zip(row[1:], CHANNELS) if "?" in _texts(ax)]
        assert unknown == [c for c, owned in zip(CHANNELS, owned_mask(site)) if not owned]
    assert "2 → liver + liver tumor" in axes[0, 0].get_xlabel()
    assert axes[1, 0].get_ylabel() == "spleen\nspleen_2, z 1"
    # the liver tumour channel shows the one tumour voxel (radiological view: transposed and flipped)
    assert axes[0, 1 + CHANNEL_INDEX["liver_tumor"]].images[0].get_array().sum() == 1


def test_one_step_figure_writes_an_exact_zero_and_draws_no_bar_for_it():
    owned = pd.Series([c in ("pancreas", "pancreas_tumor") for c in CHANNELS], index=list(CHANNELS))
    masked = pd.Series(np.where(owned, 1e-3, 0.0), index=list(CHANNELS))
    literal = pd.Series(np.where(np.arange(len(CHANNELS)) > 0, 3e-4, 0.0), index=list(CHANNELS))
    losses = {"dice_ce": (1.70, 1.68), "literal_dice_ce": (1.72, 1.70)}
    fig = figures.one_step_figure(owned, {"dice_ce": masked, "literal_dice_ce": literal}, losses,
                                  {"dice_ce": masked * 20, "literal_dice_ce": literal * 60}, title="t")
    gradient, moves, step = fig.axes
    assert _texts(gradient).count("0") == int((masked == 0).sum() + (literal == 0).sum())  # 6 + 1 (background)
    heights = [bar.get_height() for bars in gradient.containers for bar in bars if np.isfinite(bar.get_height())]
    assert len(heights) == int((masked > 0).sum() + (literal > 0).sum())
    assert [list(line.get_ydata()) for line in step.lines] == [list(pair) for pair in losses.values()]
    assert len(figures.one_step_figure(owned, {"dice_ce": masked}, {"dice_ce": (1.0, 0.9)}).axes) == 2


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("name", list(LOSSES))
def test_a_channels_loss_alone_is_the_loss_on_background_and_that_channel(name, batch):
    """02's cell reads channel c's term as the loss on channels (0, c): every loss leaves background out, so that is
    c's own term, 0 for a channel the sample's site does not own under a masked loss, and the loss is the mean of the
    terms over the channels it counts (the owned ones, or all foreground ones for a literal loss)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(CHANNELS), 6, 6, 6, generator=generator)
    draw = torch.rand(2, 6, 6, 6, generator=generator)
    label = (draw > 0.6).long() + (draw > 0.9).long()  # pancreas values: 0, 1 (organ), 2 (tumour)
    target = torch.stack([torch.as_tensor(to_multihot(x.numpy(), "pancreas")) for x in label])
    owned = torch.as_tensor(owned_mask("pancreas")).expand(2, -1)
    loss = LOSSES[name]
    terms = torch.stack([loss(logits[:, [0, c]], target[:, [0, c]], owned[:, [0, c]], batch=batch)
                         for c in range(1, len(CHANNELS))])
    counted = owned[0, 1:] if name in ("masked_dice", "dice_ce") else torch.ones(len(CHANNELS) - 1, dtype=torch.bool)
    assert torch.all(terms[~counted] == 0)
    assert torch.isclose(terms[counted].mean(), loss(logits, target, owned, batch=batch), rtol=1e-5)


def test_a_network_built_under_fork_rng_is_the_one_fit_starts_from_and_leaves_the_rng_alone():
    model = load_profile("smoke")["model"]
    seed_everything(3)
    started = build_network(**model).state_dict()
    torch.manual_seed(11)
    state = torch.random.get_rng_state()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        fresh = build_network(**model).state_dict()
    assert all(torch.equal(started[key], fresh[key]) for key in started)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_as_ras_orients_arrays_as_canonical_reads_the_file(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    affine = np.array([[0, -2.0, 0, 0], [0, 0, 3.0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]])  # L, S, I axes: not RAS
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    ras, _ = figures.canonical(path)
    np.testing.assert_array_equal(figures.as_ras(data, affine), ras)
    np.testing.assert_array_equal(figures.as_ras(np.stack([data, -data]), affine), np.stack([ras, -ras]))


def test_ensemble_figure_outlines_what_the_rule_removed_on_the_truths_slice(tmp_path):
    shape = (20, 18, 6)
    nib.save(nib.Nifti1Image(np.full(shape, 40.0, np.float32), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    ensemble = np.zeros((len(CHANNELS), *shape), bool)
    ensemble[CHANNEL_INDEX["liver"], 2:9, 2:9, 1:5] = True
    ensemble[CHANNEL_INDEX["liver"], 15:17, 14:16, 4] = True  # a stray island: the rule removes it
    ensemble[CHANNEL_INDEX["spleen"], 7:12, 7:12, 4] = True  # overlaps the liver: the order makes it spleen
    processed = inference.postprocess(ensemble)
    fused = inference.fuse(processed)
    truth = {organ: np.zeros(shape, bool) for organ in ("liver", "pancreas", "kidney", "spleen")}
    truth["liver"][2:9, 2:9, 1:5] = True
    truth["spleen"][9:12, 9:12, 4] = True  # slice 4 holds two organs, the others one
    probabilities = {"liver": ("liver", ensemble[CHANNEL_INDEX["liver"]] * 0.9),
                     "spleen": ("spleen", ensemble[CHANNEL_INDEX["spleen"]] * 0.8)}
    fig = figures.ensemble_figure(tmp_path / "ct.nii.gz", probabilities, ensemble, processed, fused, truth,
                                  title="case")
    assert "axial slice 4" in fig._suptitle.get_text()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    removed = next(ax for title, ax in panels.items() if title.startswith("largest components"))
    fused_panel = next(ax for title, ax in panels.items() if title.startswith("fused label map"))
    assert removed.collections and fused_panel.collections  # the white outlines: removed island, order's overlap
    assert not processed[CHANNEL_INDEX["liver"], 15:17, 14:16, 4].any()
    assert (fused[7:9, 7:9, 4] == CHANNEL_INDEX["spleen"]).all()
