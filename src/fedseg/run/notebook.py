"""What the notebooks call: `notebook_setup` (each notebook's second cell) and the refusal of a parameter the
notebooks do not declare, both before a run (`check_parameters`) and inside a notebook papermill runs
(`refuse_injected_unknown`)."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedseg import run_folder
from fedseg.config import notebooks_dir, override, repo_root, resolve


def notebook_setup(profile: str, run_dir: str | Path | None, data_root: str | Path | None,
                   seed: int | None, **knobs: Any) -> dict[str, Any]:
    """What each notebook's second cell calls: resolves its parameters and makes its run folder. `knobs` are the
    notebook's knob parameters by their names (`fedseg.config.KNOBS`: steps, loss, ...), applied with
    `fedseg.config.override` (None: the profile's), as a federation applies its run_config's.

    Run alone in JupyterLab (run_dir None), a notebook works in `results/lab-<profile>`, which later
    notebooks opened the same way find again. Run by papermill, a parameter the notebook does not declare is
    refused (`refuse_injected_unknown`).
    """
    refuse_injected_unknown()
    cfg = override(resolve(profile, seed, data_root), knobs, source="notebook parameters")
    run_dir = Path(run_dir) if run_dir else repo_root() / "results" / f"lab-{cfg['name']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.figures_dir(run_dir).mkdir(exist_ok=True)
    cfg["run_dir"] = str(run_dir.resolve())
    return cfg


def _unknown_parameters(unknown: Sequence[str], known: set[str], where: str) -> ValueError:
    """The refusal of `unknown` parameters, each with the closest of `known` (difflib)."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"Unknown parameter {', '.join(hints)}: {where} take {', '.join(sorted(known))}.")


def check_parameters(params: Mapping[str, Any], notebooks: Sequence[str]) -> None:
    """Refuse a parameter that none of `notebooks` has (papermill would only warn and run with the default),
    naming the closest parameter they do have."""
    import papermill as pm

    known: set[str] = {"seed", "data_root"}
    for name in notebooks:
        known |= set(pm.inspect_notebook(str(notebooks_dir() / f"{name}.ipynb")))
    unknown = sorted(set(params) - known)
    if unknown:
        raise _unknown_parameters(unknown, known, ", ".join(notebooks))


def _assigned(source: str) -> list[str]:
    """The names a cell assigns at its top level, in order (a parameters cell, or papermill's injected one)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def injected_unknown(history: Sequence[str]) -> tuple[list[str], set[str]]:
    """The parameters papermill injected that the notebook does not declare, and those it declares, from the
    cells a kernel executed (`In`): papermill's cell starts with "# Parameters" and runs right after the cell
    tagged parameters. ([], set()) when nothing was injected (JupyterLab)."""
    for index in range(len(history) - 1, 0, -1):
        if history[index].lstrip().startswith("# Parameters"):
            declared = set(_assigned(history[index - 1]))
            return [name for name in _assigned(history[index]) if name not in declared], declared
    return [], set()


def refuse_injected_unknown() -> None:
    """In a notebook run by papermill by hand (`papermill ... -p stepz 5`), refuse a parameter the notebook
    does not declare: papermill only warns and the notebook would run with its default."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    unknown, declared = injected_unknown(shell.user_ns.get("In", []))
    if unknown:
        raise _unknown_parameters(unknown, declared, "this notebook's parameters (its cell tagged parameters)")
