"""The papers' published results that a run's tables and figures show beside its own: one home, with sources.

Every number here is typed from the paper named beside it (docs/references.md has the full citations); nothing is
computed from a run. `tests/test_paper_numbers.py` checks them against a second, independent transcription.

- **Shen et al. 2022**, the study reproduced: Table 2 (`SHEN_TABLE2`: Dice % per channel on each task's test
  split; SL, FL global, FL local) and Table 3 (`SHEN_TABLE3`: Dice % per organ on BTCV), each with the paper's own
  Avg. column as printed, and the names its Table 1 gives the datasets (`SHEN_DATASET_NAMES`). Table 1's case
  counts are not here: they are the split the data layer enforces (`fedseg.data.catalogue`, `manifest.TABLE1`).
- **Kanhere et al. 2024 (SegViz)**, the CVPR 2024 workshop poster's node-set table (`KANHERE_NODES`: Dice mean
  and std on BTCV per set-up, model and organ; the 2023 preprint reports other numbers).
- **Nagaraju et al. 2025 (FedGIN)**: its claim (from the abstract; docs/references.md) is tested as a claim,
  "GIN raises cross-contrast Dice" (`fedseg.reporting.claims.fedgin_claims`); no number of it is printed beside
  a run's, so none is held here.

Caveats: Table 2's Avg. does not follow from its seven channels under any obvious definition (the mean of the
channels is 48.1, 32.5, 66.1: `mean_as_printed`); Table 3's Avg. is the mean of its four organs except in the SL
row (60.0 printed, 59.7 the mean). Both are kept as printed (docs/study.md, "Metrics and their conventions").

The bottom layer of the package (with `fedseg.config` and `fedseg.run_folder`): it imports nothing from fedseg,
so `fedseg.experiments` and `fedseg.reporting` both take their paper rows from here. Channel and organ names
are the label scheme's (`fedseg.data.labels`), spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

#: How the tables cite each paper.
SHEN_2022, KANHERE_2024, NAGARAJU_2025 = "Shen et al. 2022", "Kanhere et al. 2024", "Nagaraju et al. 2025"

# --- Shen et al. 2022 ---------------------------------------------------------------------------------------------

#: The datasets as Shen et al. 2022's Table 1 names them; BTCV, used only as an external test set (its §3.1), is
#: labelled "(external)".
SHEN_DATASET_NAMES = {"liver": "MSD liver", "pancreas": "MSD pancreas", "kits19": "KiTS19", "spleen": "MSD spleen",
                      "btcv": "BTCV (external)"}

#: Table 2's channel columns, in its order; the paper's "Avg." column follows them in every row of `SHEN_TABLE2`.
SHEN_TABLE2_CHANNELS = ("liver", "liver_tumor", "pancreas", "pancreas_tumor", "kidney", "kidney_tumor", "spleen")
#: Shen et al. 2022, Table 2: Dice % on each task's test split, per row: the 7 channels (`SHEN_TABLE2_CHANNELS`)
#: and the paper's "Avg.", which does not follow from its channels under any obvious definition; kept as printed.
SHEN_TABLE2: dict[str, tuple[float, ...]] = {
    "SL": (67.4, 13.3, 64.2, 19.6, 93.1, 30.2, 48.7, 63.5),
    "FL global model (server)": (0.0, 0.0, 66.9, 30.4, 90.6, 39.3, 0.0, 44.6),
    "FL local model (client)": (84.4, 33.8, 74.3, 38.4, 94.9, 63.7, 72.9, 86.7),
}

#: Table 3's organ columns, in its order; the paper's "Avg." column follows them in every row of `SHEN_TABLE3`.
SHEN_TABLE3_ORGANS = ("liver", "pancreas", "kidney", "spleen")
#: Shen et al. 2022, Table 3: Dice % on BTCV, per row: the 4 organs (`SHEN_TABLE3_ORGANS`) and the paper's "Avg.",
#: the mean of the organs except in the SL row (60.0 printed; the mean is 59.7); kept as printed.
SHEN_TABLE3: dict[str, tuple[float, ...]] = {
    "SL": (65.8, 57.5, 70.7, 44.6, 60.0),
    "FL global model": (0.0, 62.9, 54.5, 0.0, 29.4),
    "FL local model (ensemble)": (87.7, 71.8, 80.5, 69.9, 77.5),
    "FL local model (processed)": (91.6, 75.4, 80.2, 73.1, 80.1),
}


def mean_as_printed(values: Sequence[float]) -> float:
    """The unweighted mean of one-decimal numbers as a paper prints it: exact decimal arithmetic, rounded half up to
    one decimal (Table 3's SL organs average 59.65: 59.7, where binary floating point gives 59.6)."""
    mean = sum(Decimal(str(value)) for value in values) / len(values)
    return float(mean.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


# --- Kanhere et al. 2024 (SegViz) -----------------------------------------------------------------------------------

#: The rows (models) of Kanhere et al. 2024's node-set table.
KANHERE_MODELS = ("Single-dataset models", "Central aggregation", "Conventional FL", "SegViz")
_SINGLE, _CENTRAL, _CONVENTIONAL, _SEGVIZ = KANHERE_MODELS
#: Kanhere et al. 2024's node-set table: Dice (in [0, 1]) mean and std over the BTCV cases per (set-up, model) and
#: organ; set-ups "single" (each node's own model on its own organ), "2-node" (liver, spleen), "3-node"
#: (+ pancreas), "4-node" (+ kidney). A 0.00 is printed as such (a model that never segments that organ).
KANHERE_NODES: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("single", _SINGLE): {"liver": (0.88, 0.15), "spleen": (0.79, 0.17), "pancreas": (0.46, 0.20),
                          "kidney": (0.64, 0.21)},
    ("2-node", _CENTRAL): {"liver": (0.00, 0.00), "spleen": (0.65, 0.14)},
    ("2-node", _CONVENTIONAL): {"liver": (0.89, 0.06), "spleen": (0.84, 0.09)},
    ("2-node", _SEGVIZ): {"liver": (0.90, 0.04), "spleen": (0.84, 0.12)},
    ("3-node", _CENTRAL): {"liver": (0.00, 0.00), "spleen": (0.61, 0.18), "pancreas": (0.00, 0.00)},
    ("3-node", _CONVENTIONAL): {"liver": (0.75, 0.29), "spleen": (0.71, 0.17), "pancreas": (0.45, 0.17)},
    ("3-node", _SEGVIZ): {"liver": (0.91, 0.06), "spleen": (0.81, 0.17), "pancreas": (0.55, 0.19)},
    ("4-node", _CENTRAL): {"liver": (0.65, 0.14), "spleen": (0.00, 0.00), "pancreas": (0.55, 0.18),
                           "kidney": (0.68, 0.21)},
    ("4-node", _CONVENTIONAL): {"liver": (0.91, 0.03), "spleen": (0.46, 0.15), "pancreas": (0.53, 0.18),
                                "kidney": (0.68, 0.12)},
    ("4-node", _SEGVIZ): {"liver": (0.93, 0.02), "spleen": (0.78, 0.14), "pancreas": (0.40, 0.20),
                          "kidney": (0.78, 0.12)},
}
#: The cases each of Kanhere et al. 2024's numbers is over: BTCV's 30 labelled CTs (its data table).
KANHERE_BTCV_CASES = 30
