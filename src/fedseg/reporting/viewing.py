"""Interactive 3D views of a CT volume with its labels, for JupyterLab (never under papermill).

Two backends (docs/viewing.md): ipyniivue (default; its JavaScript ships in the wheel, so it
works offline) and itkwidgets (the viewer the study names; it loads its JavaScript from remote hosts at
run time and blocks papermill). Every view also exists as a static matplotlib figure in `report`.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.data.labels import CHANNELS, COLOURS, LABEL_MAPS

#: Not a dataset: a fused prediction (`inference.fuse`), whose label values are channel indices.
PREDICTION = "prediction"


def label_colours(dataset: str) -> dict[int, tuple[str, tuple[float, float, float]]]:
    """Each label value of `dataset` (or of a fused prediction, `PREDICTION`) -> (name, paper colour);
    a value switching on a tumour shows as it."""
    if dataset == PREDICTION:
        return {index: (name, COLOURS[name]) for index, name in enumerate(CHANNELS) if name in COLOURS}
    colours = {}
    for value, channels in LABEL_MAPS[dataset].items():
        if channels:
            name = channels[-1]
            colours[value] = (name, COLOURS[name])
    return colours


def niivue_view(image: str | Path, label: str | Path, dataset: str, height: int = 600):
    """A NiiVue widget: axial, coronal, sagittal slices and a 3D render, labels in the paper's colours."""
    from ipyniivue import MultiplanarType, NiiVue, ShowRender, SliceType

    viewer = NiiVue(height=height, slice_type=SliceType.MULTIPLANAR, multiplanar_show_render=ShowRender.ALWAYS,
                    multiplanar_layout=MultiplanarType.GRID)
    viewer.load_volumes([{"path": str(image), "colormap": "gray", "cal_min": -500, "cal_max": 500},
                         {"path": str(label), "opacity": 0.6}])
    colours = label_colours(dataset)
    top = max(colours)
    lut = {"R": [0] * (top + 1), "G": [0] * (top + 1), "B": [0] * (top + 1), "A": [0] * (top + 1),
           "I": list(range(top + 1)), "labels": [""] * (top + 1)}
    for value, (name, rgb) in colours.items():
        lut["R"][value], lut["G"][value], lut["B"][value] = (int(255 * c) for c in rgb)
        lut["A"][value], lut["labels"][value] = 255, name
    viewer.volumes[1].set_colormap_label(lut)
    return viewer


def itkwidgets_view(image: str | Path, label: str | Path):
    """An itkwidgets viewer (needs its remote JavaScript hosts reachable from the browser)."""
    import itk
    from itkwidgets import view

    return view(image=itk.imread(str(image)), label_image=itk.imread(str(label)))


def show(image: str | Path, label: str | Path, dataset: str, backend: str = "niivue"):
    """The interactive view of one case with the chosen backend ("niivue" or "itkwidgets")."""
    if backend == "niivue":
        return niivue_view(image, label, dataset)
    if backend == "itkwidgets":
        return itkwidgets_view(image, label)
    raise ValueError(f"viewer={backend!r}: use 'niivue' or 'itkwidgets'.")
