"""What a student sees in JupyterLab: the NiiVue view's colour legend and convention, the notebooks' links (they
open only when JupyterLab serves the repository, as `make lab` does) and the index's times per notebook."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.labels import CHANNELS, COLOURS, LABEL_MAPS
from fedseg.reporting import viewing

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LINK = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"")


def _hex(rgb):
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


@pytest.mark.parametrize("dataset", [*LABEL_MAPS, viewing.PREDICTION])
def test_the_legend_names_every_label_of_the_view_in_its_colour(dataset):
    if dataset == viewing.PREDICTION:
        shown = [c for c in CHANNELS if c in COLOURS]
    else:
        shown = list(dict.fromkeys(channels[-1] for channels in LABEL_MAPS[dataset].values() if channels))
    entries = viewing.legend_entries(dataset)
    assert sorted(entries) == sorted(name.replace("_", " ") for name in shown)
    assert all(entries[name.replace("_", " ")] == _hex(COLOURS[name]) for name in shown)
    html = viewing.legend_html(dataset)
    assert all(name in html and colour in html for name, colour in entries.items())
    assert "radiological" in html


def test_the_niivue_view_is_radiological_like_fig1_with_its_legend_beside(tmp_path):
    image, label = tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), image)
    values = np.zeros((4, 4, 4), np.uint8)
    values[1:3, 1:3, 1:3] = 1
    values[2, 2, 2] = 2
    nib.save(nib.Nifti1Image(values, np.eye(4)), label)
    view = viewing.show(image, label, "kits19")
    niivue, legend = view.children
    assert niivue.opts.is_radiological_convention
    assert "kidney" in legend.value and "kidney tumor" in legend.value and _hex(COLOURS["kidney_tumor"]) in legend.value


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_relative_link_of_a_notebook_reaches_a_file_of_the_repository(notebook):
    """The markdown cells link to ../docs/..., ../README.md, ../results/reference/...: each must exist, inside the
    repository (the folder `make lab` serves)."""
    cells = json.loads(notebook.read_text())["cells"]
    targets = [a or b for c in cells if c["cell_type"] == "markdown" for a, b in LINK.findall("".join(c["source"]))]
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    for target in relative:
        path = (notebook.parent / target).resolve()
        assert path.exists(), f"{notebook.name} links to {target}, which does not exist"
        assert REPO in (path, *path.parents), f"{notebook.name} links to {target}, outside the repository"


def test_make_lab_serves_the_repository_and_opens_the_index():
    recipe = re.search(r"^lab:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "--ServerApp.root_dir=." in recipe and "notebooks/00_index.ipynb" in recipe


def test_the_index_gives_each_notebook_the_reference_runs_time():
    index = json.loads((REPO / "notebooks" / "00_index.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in index["cells"] if c["cell_type"] == "markdown")
    record = json.loads((REPO / "results" / "reference" / "run.json").read_text())["notebooks"]
    for name, entry in record.items():
        row = re.search(rf"^\| \[{name}\]\({name}\.ipynb\) \|.*\| (\d+) s[^|]*\|$", text, re.M)
        assert row, f"00_index has no row with a time for {name}"
        assert int(row.group(1)) == round(entry["wall_s"]), f"{name}: 00_index says {row.group(1)} s, run.json " \
                                                          f"{entry['wall_s']} s"
