"""A dataset is declared once (`fedseg.data.catalogue`): every table about datasets is read from there, so adding
one is adding one declaration."""

import json
import subprocess
import sys

from fedseg.data import catalogue, download, labels, layouts, manifest, phantom


def test_every_table_about_datasets_comes_from_the_catalogue():
    names = [d.name for d in catalogue.CATALOGUE]
    assert list(labels.LABEL_MAPS) == list(layouts.DATASET_DIRS) == list(layouts.LAYOUTS) == names
    assert list(manifest.TABLE1) == list(phantom.SCANNERS) == names
    assert labels.DATASETS == tuple(names) and labels.TRAIN_DATASETS == ("liver", "pancreas", "kits19", "spleen")
    assert set(download.SOURCES) == {d.name for d in catalogue.CATALOGUE if d.source is not None} == {
        "liver", "pancreas", "kits19", "spleen"}
    assert all(layouts.DATASET_DIRS[d.name] == d.folder and manifest.TABLE1[d.name] == d.table1
               for d in catalogue.CATALOGUE)


ADD_A_DATASET = """
import dataclasses, json
from fedseg.data import catalogue

site2 = dataclasses.replace(catalogue.BY_NAME["liver"], name="liver_site2", folder="Site2_Liver", table1=(30, 10, 10),
                            source=None, condistfl=None)
catalogue.CATALOGUE = catalogue.CATALOGUE[:4] + (site2,) + catalogue.CATALOGUE[4:]

from fedseg.data import download, labels, layouts, manifest, phantom
from fedseg.federated import sites

print(json.dumps({
    "train": labels.TRAIN_DATASETS, "owned": labels.owned_channels("liver_site2"),
    "folder": str(layouts.dataset_dir("/data", "liver_site2")),
    "image": layouts.relative_paths("liver_site2", "liver_7")[0], "table1": manifest.TABLE1["liver_site2"],
    "scanner": phantom.SCANNERS["liver_site2"]["phases"], "downloadable": "liver_site2" in download.SOURCES,
    "clients": sites.client_list({"clients": "liver,liver_site2"}),
}))
"""


def test_adding_a_dataset_is_one_declaration():
    """The example of docs/datasets.md: a second liver site, declared once, is known to the label scheme, the
    layouts, Table 1, the phantom, the downloader (as not downloadable) and the federation's clients."""
    done = subprocess.run([sys.executable, "-c", ADD_A_DATASET], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["train"] == ["liver", "pancreas", "kits19", "spleen", "liver_site2"]
    assert seen["owned"] == ["liver", "liver_tumor"]
    assert seen["folder"] == "/data/Site2_Liver" and seen["image"] == "imagesTr/liver_7.nii.gz"
    assert seen["table1"] == [30, 10, 10] and seen["scanner"] == {"portal": 1.0} and seen["downloadable"] is False
    assert seen["clients"] == ["liver", "liver_site2"]
