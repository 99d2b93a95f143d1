"""SegViz's node-set experiment (Kanhere et al. 2024's table; docs/study.md, Experiments, item 4): 2, 3 and 4 nodes.

The nodes are added in the paper's order: liver and spleen (2-node), + pancreas (3-node), + kidney (4-node).
On each node set four kinds of model are compared on BTCV (the paper's test set), each on the organs of its
node set, Dice mean ± std over the cases:

- **Single-dataset models**: each node's standalone model (02) on its own organ (one row, as in the paper).
- **Central aggregation**: one model on the node set's pooled training data (02's for 4 nodes, else trained
  here into `<run>/nodes-<n>/checkpoints/central/`), with the profile's loss.
- **Conventional FL**: FedAvg of the profile's network on the node set (03, `method=fedavg`).
- **SegViz**: the shared-block + task-block network with selective aggregation (03, `method=segviz`); its
  global model is the meta-model (shared block + every node's task block).

`run_nodes` is resumable: 01/02, each central model and each federation already in the run folder are
reused (for 4 nodes, a sweep's `<run>/<method>/`, or the chain's own FedAvg in the run folder, is the same
federation), so an interrupted run goes on.
Inference and scoring are `fedseg.train.inference` and `fedseg.evaluate.metrics`, as in the external evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fedseg import run_folder
from fedseg.data.transforms import case_records
from fedseg.evaluate import metrics
from fedseg.evaluate.evaluation import load_best
from fedseg.evaluate.external import btcv_test_cases, load_btcv_case, require_btcv_files
from fedseg.published import KANHERE_2024, KANHERE_BTCV_CASES, KANHERE_MODELS, KANHERE_NODES
from fedseg.train import inference
from fedseg.train.training import central_budget, fit, select_device

#: The node sets of the SegViz table, by node count, in the paper's order.
NODE_SETS: dict[int, tuple[str, ...]] = {
    2: ("liver", "spleen"),
    3: ("liver", "spleen", "pancreas"),
    4: ("liver", "spleen", "pancreas", "kits19"),
}
#: The BTCV organ each node's dataset annotates (`inference.BTCV_ORGANS`), and the table's column order.
ORGAN_OF = {"liver": "liver", "spleen": "spleen", "pancreas": "pancreas", "kits19": "kidney"}
ORGANS = ("liver", "spleen", "pancreas", "kidney")
#: The table's rows (models), in the paper's order.
SINGLE, CENTRAL, CONVENTIONAL, SEGVIZ = KANHERE_MODELS
#: The federated method each FL row trains with (`federated.methods.METHODS`).
FL_ROWS = {CONVENTIONAL: "fedavg", SEGVIZ: "segviz"}

#: Kanhere et al. 2024's table (`fedseg.published.KANHERE_NODES`), by the old name docs/references.md cites.
PAPER_SEGVIZ = KANHERE_NODES
NOTE = ("Dice on the BTCV test cases (original grid, sigmoid > 0.5, each organ with its tumour), mean ± std over "
        f"the cases (ddof 1); each model scored on its node set's organs only. Paper: {KANHERE_2024}, same layout.")


def setup_name(nodes: int) -> str:
    return f"{nodes}-node"


def check_nodes(nodes: Iterable[int]) -> tuple[int, ...]:
    nodes = tuple(int(n) for n in nodes)
    unknown = [n for n in nodes if n not in NODE_SETS]
    if not nodes or unknown:
        raise ValueError(f"nodes {list(nodes)}: choose from {sorted(NODE_SETS)} (SegViz's 2-, 3- and 4-node sets).")
    return nodes


def federation_dir(run_dir: str | Path, nodes: int, method: str) -> Path:
    """Where the node set's federation of `method` lives: `<run>/nodes-<n>/<method>/`, or for the 4-node set
    a sweep's `<run>/<method>/` when that one finished, else the run folder itself when its own 03 (the chain's)
    is that federation (`chain_federation`): the same four clients, seed and profile."""
    run_dir = Path(run_dir)
    if nodes == len(NODE_SETS[4]):
        if finished_federation(run_dir / method):
            return run_dir / method
        if chain_federation(run_dir) == method:
            return run_dir
    return run_dir / f"nodes-{nodes}" / method


#: 03 parameters that do not change which federation the chain trained (the rest, e.g. rounds or clients, do).
SAME_FEDERATION_PARAMETERS = {"profile", "run_dir", "data_root", "seed", "method", "loss", "compare_loss",
                              "overwrite"}


def chain_federation(run_dir: str | Path) -> str | None:
    """The method of the run folder's own finished federation (the chain's 03) when it is the node sets' 4-node
    one: every client, the profile's settings and loss (03's compared-loss federation aside); else None."""
    run_dir = Path(run_dir)
    if not finished_federation(run_dir):
        return None
    record = json.loads(run_folder.run_record(run_dir).read_text())
    params = record["notebooks"][run_folder.FEDERATED].get("parameters") or {}
    profile = record.get("profile_config") or {}
    if set(params) - SAME_FEDERATION_PARAMETERS or params.get("loss") not in (None, profile.get("train", {}).get(
            "loss")):
        return None
    return params.get("method") or (profile.get("federated") or {}).get("method") or "fedavg"


def central_checkpoint(run_dir: str | Path, nodes: int) -> Path:
    """02's central model for the 4-node set (trained on all four datasets), else the node set's own."""
    run_dir = Path(run_dir)
    if nodes == len(NODE_SETS[4]):
        return run_folder.checkpoint(run_dir, "central")
    return run_folder.checkpoint(run_dir / f"nodes-{nodes}", "central")


def finished_federation(folder: Path) -> bool:
    """Whether `folder` holds a federation whose notebook 03 ran to the end, with its global best model."""
    return (run_folder.FEDERATED in run_folder.finished_notebooks(folder)
            and run_folder.checkpoint(folder, "fl-global").exists())


def table_models(run_dir: str | Path, nodes: Sequence[int], methods: Mapping[str, str] = FL_ROWS
                 ) -> dict[tuple[str, str], dict[str, Path]]:
    """Every row of the table -> {organ: the checkpoint whose prediction of that organ is scored}."""
    run_dir = Path(run_dir)
    datasets = sorted({d for n in nodes for d in NODE_SETS[n]}, key=NODE_SETS[4].index)
    models = {("single", SINGLE): {ORGAN_OF[d]: run_folder.checkpoint(run_dir, f"sl-{d}") for d in datasets}}
    for n in nodes:
        organs = [ORGAN_OF[d] for d in NODE_SETS[n]]
        rows = {CENTRAL: central_checkpoint(run_dir, n),
                **{row: run_folder.checkpoint(federation_dir(run_dir, n, method), "fl-global")
                   for row, method in methods.items()}}
        for row, path in rows.items():
            models[(setup_name(n), row)] = {organ: path for organ in organs}
    return models


def score_btcv(cfg: dict[str, Any], cases: pd.DataFrame, models: Mapping[tuple[str, str], Mapping[str, Path]],
               tolerances: Mapping[str, float] | None = None, progress: bool = True) -> pd.DataFrame:
    """Dice, NSD and HD95 per BTCV test case of every (set-up, model) row on its organs.

    Each checkpoint runs once per case (sliding window, `inference.predict_logits`); its sigmoid > 0.5 mask
    is resampled back to the BTCV grid (`inference.to_original_grid`) and scored (`metrics.score_case`).
    Long form: setup, model, case_id, organ, dice, nsd, hd95, pred_empty, truth_empty.
    """
    missing = sorted({str(p) for organs in models.values() for p in organs.values() if not Path(p).exists()})
    if missing:
        raise FileNotFoundError(f"Checkpoints missing for the SegViz table: {', '.join(missing)}. "
                                "Run `python -m fedseg nodes` on this run folder to train them.")
    btcv = btcv_test_cases(cases)
    require_btcv_files(cfg, cases)  # every missing file named before any model is loaded
    device = select_device()
    loaded = {str(p): load_best(cfg, p, device) for p in {str(p) for m in models.values() for p in m.values()}}
    transform = inference.inference_transform(cfg)
    rows = []
    for _, case in tqdm(list(btcv.iterrows()), desc="BTCV cases", disable=not progress):
        _, image, truth, spacing = load_btcv_case(cfg, case, transform)
        logits = inference.predict_logits(loaded, image, cfg, device)
        organs_of = {path: inference.organ_masks(np.asarray(inference.to_original_grid(value, image, cfg, logits=True)))
                     for path, value in logits.items()}
        for (setup, model), organ_paths in models.items():
            predicted = {organ: organs_of[str(path)][organ] for organ, path in organ_paths.items()}
            for item in metrics.score_case(predicted, {o: truth[o] for o in organ_paths}, spacing, tolerances):
                rows.append({"setup": setup, "model": model, "case_id": case["case_id"], **item})
    return pd.DataFrame(rows)


def segviz_table(scores: pd.DataFrame,
                 paper: Mapping[tuple[str, str], Mapping[str, tuple[float, float]]] = KANHERE_NODES) -> pd.DataFrame:
    """Kanhere et al. 2024's layout: per (set-up, model) row, "mean ± std" Dice per organ for this run, the paper's row
    below it (rows named "<set-up> <model> (this run)" / "(paper)"), and the number of cases. Organs a row
    does not segment are "-"; a row the paper lacks gets no paper line."""
    stats = scores.groupby(["setup", "model", "organ"], sort=False)["dice"].agg(["mean", "std", "count"])
    out = {}
    for (setup, model), group in stats.groupby(level=[0, 1], sort=False):
        cells = group.droplevel([0, 1])
        out[(setup, model, "this run")] = {organ: f"{cells.loc[organ, 'mean']:.2f} ± {cells.loc[organ, 'std']:.2f}"
                                           if organ in cells.index else "-" for organ in ORGANS}
        out[(setup, model, "this run")]["cases"] = int(cells["count"].max())
        if (setup, model) in paper:
            out[(setup, model, "paper")] = {organ: "{:.2f} ± {:.2f}".format(*paper[(setup, model)][organ])
                                            if organ in paper[(setup, model)] else "-" for organ in ORGANS}
            out[(setup, model, "paper")]["cases"] = KANHERE_BTCV_CASES
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index = [f"{model} ({source})" if setup == "single" else f"{setup} {model} ({source})"
                   for setup, model, source in table.index]
    return table


def segviz_figure(scores: pd.DataFrame,
                  paper: Mapping[tuple[str, str], Mapping[str, tuple[float, float]]] = KANHERE_NODES):
    """One panel per set-up: mean Dice per organ and model with std error bars; the paper's means as black ticks."""
    import matplotlib.pyplot as plt

    setups = [s for s in dict.fromkeys(scores["setup"])]
    fig, axes = plt.subplots(1, len(setups), figsize=(4.2 * len(setups), 3.6), sharey=True, squeeze=False)
    colours = {SINGLE: "tab:gray", CENTRAL: "tab:orange", CONVENTIONAL: "tab:blue", SEGVIZ: "tab:green"}
    for ax, setup in zip(axes[0], setups):
        part = scores[scores["setup"] == setup]
        models = list(dict.fromkeys(part["model"]))
        organs = [o for o in ORGANS if o in set(part["organ"])]
        width = 0.8 / len(models)
        for k, model in enumerate(models):
            stats = part[part["model"] == model].groupby("organ")["dice"].agg(["mean", "std"]).reindex(organs)
            x = np.arange(len(organs)) + (k - (len(models) - 1) / 2) * width
            ax.bar(x, stats["mean"], width, yerr=stats["std"].fillna(0), capsize=2, label=model,
                   color=colours.get(model), alpha=0.85)
            published = paper.get((setup, model), {})
            ticks = [published.get(o, (np.nan,))[0] for o in organs]
            ax.scatter(x, ticks, marker="_", s=120, color="black", zorder=3,
                       label=f"paper ({KANHERE_2024})" if k == 0 and setup == setups[0] else None)
        ax.set_xticks(np.arange(len(organs)), organs)
        ax.set_title(setup if setup != "single" else "single-dataset models")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice on BTCV (mean ± std over cases)")
    handles, labels = [], []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def train_central(cfg: dict[str, Any], run_dir: str | Path, cases: pd.DataFrame, nodes: int) -> dict[str, Any]:
    """The node set's central aggregation model (02's recipe: the profile's loss; `central_steps`, by default
    the node set's SL models' steps together) into `<run>/nodes-<n>/checkpoints/central/`."""
    datasets = NODE_SETS[nodes]

    def records(split: str) -> list[dict[str, Any]]:
        return case_records(cfg["data_root"], cases[cases["dataset"].isin(datasets) & (cases["split"] == split)])

    return fit(cfg, "central", records("train"), records("val"), Path(run_dir) / f"nodes-{nodes}",
               steps=central_budget(cfg["train"], len(datasets)), loss=cfg["train"]["loss"])
