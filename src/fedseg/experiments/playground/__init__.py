"""The FL playground (notebooks/06_playground.ipynb): a small federation on small phantoms, run round by round through
the study's own Flower App, so what a student watches is what the study runs (docs/playground.md).

A run is the study's ServerApp (`server_app.main`) on an in-process `Grid` (`InProcessGrid`): every message the
server's strategy sends (the identity queries, each round's train and evaluate messages) is handed to the study's
ClientApp (`client_app.app(message, context)`), with each site's own `Context` (its node_config and a state that
persists across rounds, as a SuperNode keeps it), and the reply goes back to the strategy as Flower's simulation
would return it (an exception becomes an error reply, code 2). The strategy is the method's own
(`methods.get(method).strategy`: `StudyFedAvg`, `StudyOwnerFedAvg`, `StudySegViz`), built and started by
`server_app.main`; it writes `metrics/fl_rounds.csv` (per-client and global validation Dice) and
`metrics/fl_dilution.csv` (how far each channel's output layer moved, `aggregation.output_moves`) as in any
federation. After each round the playground reads those two tables and predicts one slice per site with the global
model the round's evaluations scored (`train.inference.predict_logits`), and hands the three to `on_round`.

Nothing here trains, averages or measures on its own: it chooses the data (`playground_cases`), the profile
(`playground_profile`: the smoke profile's 8 mm phantom with more cases), the run config
(`simulation.federation_run_config`) and reads what the study wrote. The presets (`PRESETS`) reproduce the study's
findings, each judged from the run's numbers (`outcome`), never from a sentence written in advance.
"""

from fedseg.data.labels import FOREGROUND, TRAIN_DATASETS, owned_channels
from fedseg.experiments.playground.grid import InProcessGrid
from fedseg.experiments.playground.outcomes import (
    EXERCISES,
    JUDGES,
    SAME,
    Exercise,
    Outcome,
    check,
    global_dice,
    head_table,
    judge_data_poor,
    judge_dilution,
    judge_label_conflict,
    judge_ownerfedavg,
    local_dice,
    outcome,
)
from fedseg.experiments.playground.rounds import (
    PlaygroundRun,
    RoundView,
    owner_shares,
    predicted_slices,
    run,
    run_config_of,
)
from fedseg.experiments.playground.settings import (
    AGGREGATIONS,
    FAILS_BELOW,
    LOSSES,
    MAX_CASES,
    PLAYGROUND_PROFILE,
    PRESETS,
    THREADS,
    Preset,
    Settings,
    matching_preset,
    phantom_needs,
    playground_cases,
    playground_profile,
    prepare_data,
    with_overrides,
)
from fedseg.experiments.playground.trace import RoundTrace, one_round, preserved_random_state

__all__ = [
    "AGGREGATIONS", "EXERCISES", "FAILS_BELOW", "FOREGROUND", "JUDGES", "LOSSES", "MAX_CASES", "PLAYGROUND_PROFILE",
    "PRESETS", "SAME", "THREADS", "TRAIN_DATASETS", "Exercise", "InProcessGrid", "Outcome", "PlaygroundRun",
    "Preset", "RoundTrace", "RoundView", "Settings", "check", "global_dice", "head_table", "judge_data_poor",
    "judge_dilution", "judge_label_conflict", "judge_ownerfedavg", "local_dice", "matching_preset", "one_round",
    "outcome", "owned_channels", "owner_shares", "phantom_needs", "playground_cases", "playground_profile",
    "predicted_slices", "prepare_data", "preserved_random_state", "run", "run_config_of", "with_overrides",
]
