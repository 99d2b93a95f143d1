"""The published numbers the study compares with, checked against a second, independent transcription.

`fedseg.published` (and `fedseg.data.manifest.TABLE1`, the split the data layer enforces) hold Shen et al. 2022's
Tables 1-3, and the other tests compare the study's tables with those same constants, so a typo there could never
fail them. The numbers below were typed again from the paper (Shen et al. 2022, Tables 1, 2 and 3), not copied from
the package. Every constant is compared by row and column name, so a wrong value, a missing or extra row, or a
column order that no longer matches the values fails; so do the tables the package writes (its functions'
output, the committed reference run and the README) where they show the paper's rows.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedseg.data.manifest import SPLITS, TABLE1
from fedseg.published import (
    SHEN_DATASET_NAMES,
    SHEN_TABLE2,
    SHEN_TABLE2_CHANNELS,
    SHEN_TABLE3,
    SHEN_TABLE3_ORGANS,
    mean_as_printed,
)
from fedseg.reporting import report

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_TABLES = ROOT / "results" / "reference" / "tables"

# --- Shen et al. 2022, transcribed independently ------------------------------------------------------------

#: Table 1: cases (train, val, test, total). The paper's Table 1 lists the four tasks; BTCV is from its §3.1
#: text ("30 portal venous phase CT images", used only as an external test set).
PUBLISHED_TABLE1 = {
    "liver": {"label": "MSD liver", "train": 79, "val": 26, "test": 26, "total": 131},
    "pancreas": {"label": "MSD pancreas", "train": 169, "val": 56, "test": 56, "total": 281},
    "kits19": {"label": "KiTS19", "train": 126, "val": 42, "test": 42, "total": 210},
    "spleen": {"label": "MSD spleen", "train": 25, "val": 8, "test": 8, "total": 41},
    "btcv": {"label": "BTCV (external)", "train": 0, "val": 0, "test": 30, "total": 30},
}

#: Table 2: Dice % on each task's test split, with the paper's own "Avg." column as printed.
PUBLISHED_TABLE2 = {
    "SL": {"liver": 67.4, "liver_tumor": 13.3, "pancreas": 64.2, "pancreas_tumor": 19.6,
           "kidney": 93.1, "kidney_tumor": 30.2, "spleen": 48.7, "Avg.": 63.5},
    "FL global model (server)": {"liver": 0.0, "liver_tumor": 0.0, "pancreas": 66.9, "pancreas_tumor": 30.4,
                                 "kidney": 90.6, "kidney_tumor": 39.3, "spleen": 0.0, "Avg.": 44.6},
    "FL local model (client)": {"liver": 84.4, "liver_tumor": 33.8, "pancreas": 74.3, "pancreas_tumor": 38.4,
                                "kidney": 94.9, "kidney_tumor": 63.7, "spleen": 72.9, "Avg.": 86.7},
}

#: Table 3: Dice % on BTCV, with the paper's "Avg." column as printed.
PUBLISHED_TABLE3 = {
    "SL": {"liver": 65.8, "pancreas": 57.5, "kidney": 70.7, "spleen": 44.6, "Avg.": 60.0},
    "FL global model": {"liver": 0.0, "pancreas": 62.9, "kidney": 54.5, "spleen": 0.0, "Avg.": 29.4},
    "FL local model (ensemble)": {"liver": 87.7, "pancreas": 71.8, "kidney": 80.5, "spleen": 69.9, "Avg.": 77.5},
    "FL local model (processed)": {"liver": 91.6, "pancreas": 75.4, "kidney": 80.2, "spleen": 73.1, "Avg.": 80.1},
}

#: Column labels the written tables use for the channel names above.
TABLE2_LABELS = {"liver": "liver", "liver_tumor": "liver tumor", "pancreas": "pancreas",
                 "pancreas_tumor": "pancreas tumor", "kidney": "kidney", "kidney_tumor": "kidney tumor",
                 "spleen": "spleen", "Avg.": "Avg."}
TABLE3_LABELS = {"liver": "Liver", "pancreas": "Pancreas", "kidney": "Kidney", "spleen": "Spleen", "Avg.": "Avg."}


def by_name(columns, values) -> dict:
    """A constant's row as {column name: value}; a length mismatch is an error, not a silent truncation."""
    columns, values = list(columns), list(values)
    assert len(columns) == len(values), f"{len(values)} values for {len(columns)} columns {columns}"
    return dict(zip(columns, values))


def relabelled(published: dict, labels: dict) -> dict:
    return {labels[name]: value for name, value in published.items()}


# --- the package's constants ----------------------------------------------------------------------------------

def test_table1_constants_are_the_published_case_counts():
    assert sorted(TABLE1) == sorted(PUBLISHED_TABLE1)
    for dataset, row in PUBLISHED_TABLE1.items():
        counts = by_name(SPLITS, TABLE1[dataset])
        assert counts == {split: row[split] for split in ("train", "val", "test")}, dataset
        assert sum(counts.values()) == row["total"], dataset
        assert SHEN_DATASET_NAMES[dataset] == row["label"], dataset


def test_table2_constants_are_the_published_dice_scores():
    assert list(SHEN_TABLE2) == list(PUBLISHED_TABLE2)  # the paper's rows, in its order
    for row, values in PUBLISHED_TABLE2.items():
        assert by_name([*SHEN_TABLE2_CHANNELS, "Avg."], SHEN_TABLE2[row]) == values, row


def test_table3_constants_are_the_published_dice_scores():
    assert list(SHEN_TABLE3) == list(PUBLISHED_TABLE3)
    for row, values in PUBLISHED_TABLE3.items():
        assert by_name([*SHEN_TABLE3_ORGANS, "Avg."], SHEN_TABLE3[row]) == values, row


def test_table2s_printed_average_is_not_the_mean_of_its_channels():
    """The caveat the notes under Table 2 state: the paper's Avg. (63.5, 44.6, 86.7) is not the mean of its seven
    channels (48.1, 32.5, 66.1), so it is printed as published, never recomputed."""
    for row, values in PUBLISHED_TABLE2.items():
        channels = [value for name, value in values.items() if name != "Avg."]
        assert mean_as_printed(channels) != values["Avg."], row
    assert [mean_as_printed(row[:-1]) for row in SHEN_TABLE2.values()] == [48.1, 32.5, 66.1]
    assert "(63.5, 44.6, 86.7)" in report.AVERAGE_NOTE and "(48.1, 32.5, 66.1)" in report.AVERAGE_NOTE


def test_table3s_printed_average_is_the_mean_of_its_organs_except_for_sl():
    """Table 3's Avg. is the mean of its four organs as the paper rounds (half up), except the SL row: 60.0 printed,
    59.7 the mean (59.65, which binary floating point would round to 59.6)."""
    means = {row: mean_as_printed([value for name, value in values.items() if name != "Avg."])
             for row, values in PUBLISHED_TABLE3.items()}
    assert {row: mean for row, mean in means.items() if mean != PUBLISHED_TABLE3[row]["Avg."]} == {"SL": 59.7}
    assert "(60.0; the mean of its organs is 59.7)" in report.TABLE3_NOTE


# --- the tables the package writes ------------------------------------------------------------------------------

def test_table1_written_from_the_manifest_shows_the_published_counts_in_both_columns():
    """The committed manifest reproduces the paper's splits, so "this run" and "paper" both equal Table 1."""
    table = report.table1(pd.read_csv(ROOT / "data_manifest.csv"))
    assert list(table.index) == [published["label"] for published in PUBLISHED_TABLE1.values()]
    for published in PUBLISHED_TABLE1.values():
        row = table.loc[published["label"]]
        for column in ("train", "val", "test", "total"):
            assert row[f"{column} (paper)"] == published[column], (published["label"], column)
            assert row[f"{column} (this run)"] == published[column], (published["label"], column)


def test_table2_and_table3_written_by_the_package_show_the_published_rows():
    table2 = report.table2({})
    for row, published in PUBLISHED_TABLE2.items():
        assert table2.loc[f"{row} (paper)"].to_dict() == relabelled(published, TABLE2_LABELS), row
    table3 = report.table3(pd.DataFrame())
    for row, published in PUBLISHED_TABLE3.items():
        assert table3.loc[f"{row} (paper)"].to_dict() == relabelled(published, TABLE3_LABELS), row
    assert len(table2) == len(PUBLISHED_TABLE2) and len(table3) == len(PUBLISHED_TABLE3)


@pytest.mark.parametrize("name", ["table1", "table2", "table3"])
def test_the_committed_reference_tables_show_the_published_rows(name):
    table = pd.read_csv(REFERENCE_TABLES / f"{name}.csv", index_col=0)
    if name == "table1":
        expected = {published["label"]: {f"{c} (paper)": published[c] for c in ("train", "val", "test", "total")}
                    for published in PUBLISHED_TABLE1.values()}
    else:
        published_rows, labels = ((PUBLISHED_TABLE2, TABLE2_LABELS) if name == "table2"
                                  else (PUBLISHED_TABLE3, TABLE3_LABELS))
        expected = {f"{row} (paper)": relabelled(published, labels) for row, published in published_rows.items()}
    for row, values in expected.items():
        assert table.loc[row, list(values)].to_dict() == pytest.approx(values, abs=1e-9), (name, row)


def readme_table(heading: str) -> dict[str, dict[str, float]]:
    """The README's "Results at a glance" table under `heading`: row label -> {column label: number}."""
    readme = (ROOT / "README.md").read_text()
    lines = readme[readme.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| |"))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = by_name(header, [float(cell.rstrip("*")) for cell in cells[1:]])
    return rows


def test_the_readme_shows_the_published_rows():
    table2 = readme_table("**Table 2**")
    for readme_row, row in (("SL (paper)", "SL"), ("FL global model (paper)", "FL global model (server)"),
                            ("FL local model (paper)", "FL local model (client)")):
        assert table2[readme_row] == relabelled(PUBLISHED_TABLE2[row], TABLE2_LABELS), readme_row
    table3 = readme_table("**Table 3**")
    for readme_row, row in (("SL (paper)", "SL"), ("FL global model (paper)", "FL global model"),
                            ("FL local ensemble (paper)", "FL local model (ensemble)"),
                            ("FL local ensemble, processed (paper)", "FL local model (processed)")):
        assert table3[readme_row] == relabelled(PUBLISHED_TABLE3[row], TABLE3_LABELS), readme_row
