"""The papermill chain and the studies built on it (sweep, node sets, contrast, budget); `python -m fedseg` is its
command line. Profiles and the project a run works in are `fedseg.config`.

The modules, each importing only those listed after it (pyproject.toml's [tool.importlinter]):

- `cli`: the command line (`main`: run, sweep, nodes, contrast, budget, predict), and what each prints.
- `budget`: the budget-response study's runner (`run_budget`, `BUDGET_RUNS`), built on the other studies.
- `studies`: the sweep of federated methods (`run_sweep`), SegViz's node sets (`run_nodes`), FedGIN's
  cross-contrast experiment (`run_contrast`), and a study folder's derived profile (`write_profile_once`).
- `chain`: the notebooks 01-05 executed with papermill into a run folder (`CHAIN`, `run_chain`, `new_run_dir`,
  `default_run_name`, `ChainError`), with the run's README.
- `notebook`: what the notebooks call (`notebook_setup`) and the refusal of parameters they do not declare
  (`check_parameters`, `injected_unknown`, `refuse_injected_unknown`).
- `provenance`: what `run.json` records besides results (`package_versions`, `host_record`, `cpu_model`,
  `PeakMemory`) and its writing with portable paths (`portable`).

Importing the package loads PyTorch (`provenance`), as `fedseg.run` always has; papermill, psutil and IPython are
imported only where they are used.
"""

from fedseg.run.budget import BUDGET_RUNS, run_budget
from fedseg.run.chain import CHAIN, ChainError, default_run_name, new_run_dir, run_chain
from fedseg.run.cli import EXPERIMENTS, _parse_param, main
from fedseg.run.notebook import check_parameters, injected_unknown, notebook_setup, refuse_injected_unknown
from fedseg.run.provenance import VERSIONED_PACKAGES, PeakMemory, cpu_model, host_record, package_versions, portable
from fedseg.run.studies import run_contrast, run_nodes, run_sweep

__all__ = [
    "BUDGET_RUNS", "CHAIN", "EXPERIMENTS", "VERSIONED_PACKAGES", "ChainError", "PeakMemory", "_parse_param",
    "check_parameters", "cpu_model", "default_run_name", "host_record", "injected_unknown", "main", "new_run_dir",
    "notebook_setup", "package_versions", "portable", "refuse_injected_unknown", "run_budget", "run_chain",
    "run_contrast", "run_nodes", "run_sweep",
]
