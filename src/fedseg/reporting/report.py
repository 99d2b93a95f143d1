"""The study's tables and figures under one name, as the notebooks and `fedseg.run` use them.

Two modules build them, each with one job; this one re-exports both (and the old names of the paper's rows):

- `fedseg.reporting.tables` builds the tables (pandas) and saves them (`save_table`): Table 1 (`table1`), the
  dataset fingerprint (`fingerprint`), the cross-task matrix (`cross_task_matrix`), Table 2 (`table2`, its rows
  from `own_task_means`, `AVERAGE_NOTE` under it; per case: `table2_cases`), the sweep's methods side by side
  (`sweep_table`), the dilution table (`dilution_summary`, `read_dilution`, `unmeasured_dilution`,
  `dilution_note`), Table 3 (`table3`, `TABLE3_NOTE` under it) and its detail with CIs (`table3_detail`).
- `fedseg.reporting.figures` draws the figures (matplotlib) and saves them (`save_figure`): Fig. 1 (`figure1`,
  from `first_training_volumes`), the phantom's anatomy (`anatomy_figure`), learning curves (`learning_curves`,
  `fl_curves`), the dilution figure (`dilution_figure`), bars with bootstrap CIs (`metric_bars`), Fig. 3
  (`figure3`) and Fig. 4 (`figure4`), and the drawing blocks they share (`radiological`, `overlay`,
  `best_axial_slice`, `canonical`).

The papers' published numbers live in `fedseg.published`; `PAPER_NAMES`, `TABLE2_CHANNELS`, `PAPER_TABLE2`,
`TABLE3_ORGANS` and `PAPER_TABLE3` are their old names here (the notebooks use `TABLE2_CHANNELS`).
"""

from __future__ import annotations

from fedseg.published import SHEN_DATASET_NAMES as PAPER_NAMES
from fedseg.published import SHEN_TABLE2 as PAPER_TABLE2
from fedseg.published import SHEN_TABLE2_CHANNELS as TABLE2_CHANNELS
from fedseg.published import SHEN_TABLE3 as PAPER_TABLE3
from fedseg.published import SHEN_TABLE3_ORGANS as TABLE3_ORGANS
from fedseg.reporting.figures import (
    anatomy_figure,
    best_axial_slice,
    canonical,
    dilution_figure,
    figure1,
    figure3,
    figure4,
    first_training_volumes,
    fl_curves,
    learning_curves,
    metric_bars,
    overlay,
    radiological,
    save_figure,
)
from fedseg.reporting.tables import (
    AVERAGE_NOTE,
    DILUTION_NOTE,
    NOT_MEASURED,
    TABLE3_NOTE,
    cross_task_matrix,
    dilution_note,
    dilution_summary,
    fingerprint,
    own_task_means,
    read_dilution,
    save_table,
    sweep_table,
    table1,
    table2,
    table2_cases,
    table3,
    table3_detail,
    unmeasured_dilution,
)

__all__ = [
    # the paper's rows (fedseg.published), by their old names
    "PAPER_NAMES", "PAPER_TABLE2", "PAPER_TABLE3", "TABLE2_CHANNELS", "TABLE3_ORGANS",
    # tables
    "AVERAGE_NOTE", "DILUTION_NOTE", "NOT_MEASURED", "TABLE3_NOTE", "cross_task_matrix", "dilution_note",
    "dilution_summary", "fingerprint", "own_task_means", "read_dilution", "save_table", "sweep_table", "table1",
    "table2", "table2_cases", "table3", "table3_detail", "unmeasured_dilution",
    # figures
    "anatomy_figure", "best_axial_slice", "canonical", "dilution_figure", "figure1", "figure3", "figure4",
    "first_training_volumes", "fl_curves", "learning_curves", "metric_bars", "overlay", "radiological", "save_figure",
]
