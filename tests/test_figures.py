"""Fig. 1 (axial and coronal) and the phantom's anatomy figure, drawn from small arrays."""

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fedseg.data import phantom  # noqa: E402
from fedseg.data.labels import CHANNEL_INDEX  # noqa: E402
from fedseg.reporting import report  # noqa: E402


def test_figure1_has_an_axial_and_a_coronal_row_through_the_labels():
    image = np.zeros((12, 10, 8), np.float32)
    target = np.zeros((8, 12, 10, 8), np.float32)
    target[CHANNEL_INDEX["spleen"], 2:5, 6, 3:6] = 1  # only coronal slice y=6 and axial slices 3-5 hold spleen
    fig = report.figure1({"spleen": (image, target, "spleen_2")})
    axial, coronal = fig.axes[0], fig.axes[1]
    assert "axial 3" in axial.get_title() and coronal.get_title() == "coronal 6"
    # the coronal panel shows x (columns) against z (rows)
    assert coronal.images[0].get_array().shape == (8, 12)


def test_anatomy_figure_shades_each_published_range():
    patients = pd.DataFrame({q: np.linspace(lo, hi, 5) for q, (lo, hi) in phantom.PUBLISHED_RANGES.items()})
    fig = report.anatomy_figure(patients)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(phantom.PUBLISHED_RANGES)
    dome = panels[list(phantom.PUBLISHED_RANGES).index("liver dome (vertebra)")]
    span = dome.patches[0]  # the shaded published range: T10-T9 is levels 2.5 to 4.5
    assert np.isclose(span.get_x(), 2.5) and np.isclose(span.get_x() + span.get_width(), 4.5)


def test_figure1_fits_a_notebook_cell_legibly_and_says_its_convention():
    """Five datasets make a figure about 900 pixels wide at the notebook's 100 dpi, so JupyterLab shows it near its
    own size (not shrunk to half, its 9-point titles 5 pixels tall); no text under 9 points."""
    image = np.zeros((12, 10, 8), np.float32)
    target = np.zeros((8, 12, 10, 8), np.float32)
    volumes = {}
    for dataset, channel in (("liver", "liver"), ("pancreas", "pancreas"), ("kits19", "kidney"),
                             ("spleen", "spleen"), ("btcv", "liver")):
        labelled = target.copy()
        labelled[CHANNEL_INDEX[channel], 2:5, 6, 3:6] = 1
        volumes[dataset] = (image, labelled, f"{dataset}_1")
    fig = report.figure1(volumes)
    assert fig.get_size_inches()[0] * 100 <= 950
    legend = fig.legends[0]
    assert "radiological" in legend.get_title().get_text()
    texts = [ax.title for ax in fig.axes] + legend.get_texts() + [legend.get_title()]
    assert min(text.get_fontsize() for text in texts) >= 9
