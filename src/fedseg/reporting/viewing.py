"""Interactive 3D views of a CT volume with its labels, for JupyterLab (never under papermill).

Two backends (docs/viewing.md): ipyniivue (default; its JavaScript ships in the wheel, so it
works offline) and itkwidgets (the viewer the study names; it loads its JavaScript from remote hosts at
run time and blocks papermill). Every view also exists as a static matplotlib figure in `report`.
The NiiVue view is drawn in radiological view, like Fig. 1, with a colour legend beside it (`legend_html`).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fedseg.data.labels import CHANNELS, COLOURS, LABEL_MAPS

#: Not a dataset: a fused prediction (`inference.fuse`), whose label values are channel indices.
PREDICTION = "prediction"
#: The convention both Fig. 1 and the NiiVue view use, said beside each.
RADIOLOGICAL = "radiological view: the patient's right on the screen's left (R and L at the edges), as in Fig. 1"


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


def _rgb255(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in rgb)


def legend_entries(dataset: str) -> dict[str, str]:
    """The legend of a view of `dataset`: each label name shown (once, in label order) -> its colour as #rrggbb,
    the colour NiiVue draws it in."""
    entries = {}
    for _, (name, rgb) in sorted(label_colours(dataset).items()):
        entries.setdefault(name.replace("_", " "), "#" + "".join(f"{c:02x}" for c in _rgb255(rgb)))
    return entries


def legend_html(dataset: str) -> str:
    """The colour legend shown beside the NiiVue view: a swatch and a name per label, and the view's convention."""
    rows = "".join(
        f'<div style="display:flex;align-items:center;gap:8px;margin:3px 0">'
        f'<span style="width:16px;height:16px;flex:none;background:{colour};border:1px solid #444"></span>'
        f"{escape(name)}</div>" for name, colour in legend_entries(dataset).items())
    return (f'<div style="font-size:13px;line-height:1.3;padding:4px 8px"><b>labels</b>{rows}'
            f'<div style="margin-top:10px;color:#555;font-size:12px">{escape(RADIOLOGICAL)}</div></div>')


def niivue_view(image: str | Path, label: str | Path, dataset: str, height: int = 600):
    """A NiiVue widget: axial, coronal, sagittal slices and a 3D render, labels in the paper's colours, slices in
    radiological view like Fig. 1."""
    from ipyniivue import MultiplanarType, NiiVue, ShowRender, SliceType

    viewer = NiiVue(height=height, slice_type=SliceType.MULTIPLANAR, multiplanar_show_render=ShowRender.ALWAYS,
                    multiplanar_layout=MultiplanarType.GRID, is_radiological_convention=True)
    viewer.load_volumes([{"path": str(image), "colormap": "gray", "cal_min": -500, "cal_max": 500},
                         {"path": str(label), "opacity": 0.6}])
    colours = label_colours(dataset)
    top = max(colours)
    lut = {"R": [0] * (top + 1), "G": [0] * (top + 1), "B": [0] * (top + 1), "A": [0] * (top + 1),
           "I": list(range(top + 1)), "labels": [""] * (top + 1)}
    for value, (name, rgb) in colours.items():
        lut["R"][value], lut["G"][value], lut["B"][value] = _rgb255(rgb)
        lut["A"][value], lut["labels"][value] = 255, name
    viewer.volumes[1].set_colormap_label(lut)
    return viewer


def itkwidgets_view(image: str | Path, label: str | Path):
    """An itkwidgets viewer (needs its remote JavaScript hosts reachable from the browser)."""
    import itk
    from itkwidgets import view

    return view(image=itk.imread(str(image)), label_image=itk.imread(str(label)))


def show(image: str | Path, label: str | Path, dataset: str, backend: str = "niivue"):
    """The interactive view of one case with the chosen backend ("niivue" or "itkwidgets"); NiiVue's comes with
    its colour legend on the right (the NiiVue widget itself is `.children[0]`)."""
    if backend == "niivue":
        from ipywidgets import HTML, HBox, Layout

        viewer = niivue_view(image, label, dataset)
        viewer.layout = Layout(flex="1 1 auto", min_width="0")
        return HBox([viewer, HTML(legend_html(dataset), layout=Layout(flex="0 0 200px"))],
                    layout=Layout(width="100%", align_items="flex-start"))
    if backend == "itkwidgets":
        return itkwidgets_view(image, label)
    raise ValueError(f"viewer={backend!r}: use 'niivue' or 'itkwidgets'.")
