"""The papermill chain and the studies built on it (sweep, node sets, contrast, budget); `python -m fedseg` is its
command line: one subcommand per runner (run, sweep, nodes, contrast, budget) and `predict`, each printing what it
made. (The first line of this docstring is the command's description in its --help.)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from fedseg import run_folder
from fedseg.predict import predict, volume_table
from fedseg.run.budget import run_budget
from fedseg.run.chain import ChainError, run_chain
from fedseg.run.studies import run_contrast, run_nodes, run_sweep


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"-p {text!r}: write parameters as key=value, e.g. -p seed=1.")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _add_common(parser: argparse.ArgumentParser, run_name_help: str) -> None:
    """The options every command shares."""
    parser.add_argument("--profile", default="laptop", help="smoke, laptop (default), paper, or a YAML path")
    parser.add_argument("-p", "--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE",
                        help="notebook parameter (repeatable), e.g. -p seed=1 -p data_root=/data")
    parser.add_argument("--run-name", help=run_name_help)
    parser.add_argument("--results", help="results folder (default: results/ in the checkout)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


#: The experiments beyond the chain: how each starts from its arguments, and the table it prints at the end.
EXPERIMENTS: dict[str, tuple[Any, str, str]] = {
    "sweep": (lambda a, common: run_sweep(a.profile, _names(a.methods), losses=_names(a.losses) if a.losses else (),
                                          overwrite=a.overwrite, **common),
              "sweep_methods", "sweep {run_dir} finished"),
    "nodes": (lambda a, common: run_nodes(a.profile, tuple(int(n) for n in _names(a.nodes)), **common),
              "segviz_nodes", "SegViz node sets in {run_dir}"),
    "contrast": (lambda a, common: run_contrast(a.profile, _names(a.mri_like), _names(a.methods), **common),
                 "contrast_summary", "cross-contrast run {run_dir}"),
}


def _predict(args: argparse.Namespace) -> int:
    """`python -m fedseg predict`: `fedseg.predict.predict`, then the volumes table."""
    try:
        result = predict(args.run, args.images, args.model, out=args.out, device=args.device, profile=args.profile)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(result.volumes)} predictions (label maps, overlays, volumes.csv) in {result.out}\n"
          f"Volumes (mL):\n{volume_table(result.volumes)}")
    return 0


def _scales(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(k) for k in _names(text) if k not in ("0", "none"))


def _budget(args: argparse.Namespace, argv: list[str] | None) -> int:
    """`python -m fedseg budget`: `run_budget`, then where its report is and each claim's line."""
    import shlex

    words = sys.argv[1:] if argv is None else argv
    try:
        fine = _scales(args.fine_scale)
        path = run_budget(args.profile, _scales(args.scales), fine_scale=fine[0] if fine else None,
                          fine_spacing=args.fine_spacing, nodes_scales=_scales(args.nodes_scales),
                          contrast_scales=_scales(args.contrast_scales), nodes=_scales(args.nodes),
                          scale_rounds=args.scale_rounds, report_only=args.report_only, run_name=args.run_name,
                          params=dict(args.param), results=args.results, log_output=args.log_output,
                          command="python -m fedseg " + " ".join(shlex.quote(w) for w in words))
    except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = [line for line in path.read_text().splitlines() if line.startswith("- **")]
    print(f"budget study {path.parent}: {path.name}, budget.csv, budget.png, claims_by_scale.md\n" + "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebook chain with papermill into results/<run-name>/")
    _add_common(run, "folder name under results/ (default: <profile>-<timestamp>)")
    run.add_argument("--only", help="run one notebook of the chain (e.g. 01_data_prep or data_prep)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder of that name (with "
                     "--only: keep the folder and let that notebook replace its own results, e.g. 03's federation)")
    sweep = sub.add_parser("sweep", help="01 and 02 once, then 03 once per federated method, into one run folder")
    _add_common(sweep, "folder name under results/ (default: <profile>-<timestamp>)")
    sweep.add_argument("--methods", default="fedavg,ownerfedavg,fedprox,segviz",
                       help="comma-separated federated methods")
    sweep.add_argument("--losses", default="", help="comma-separated client losses, each method run with each "
                       "(e.g. dice_ce,literal_dice_ce); default: the profile's loss")
    sweep.add_argument("--overwrite", action="store_true", help="replace an existing run folder of that name")
    nodes = sub.add_parser("nodes", help="SegViz's 2-, 3-, 4-node table (central, FedAvg, SegViz on BTCV) into a "
                           "run folder")
    _add_common(nodes, "run folder under results/ to add to (e.g. a sweep's), or a new one")
    nodes.add_argument("--nodes", default="2,3,4", help="comma-separated node sets (2: liver, spleen; 3: + pancreas; "
                       "4: + kidney)")
    gin = sub.add_parser("contrast", help="FedGIN's cross-contrast experiment: some clients MRI-like, every model "
                         "tested in both contrasts")
    _add_common(gin, "folder name under results/ (default: <profile>-mri-<timestamp>)")
    gin.add_argument("--mri-like", default="", help="comma-separated datasets generated MRI-like "
                     "(default: liver,spleen)")
    gin.add_argument("--methods", default="fedavg,fedgin", help="comma-separated federated methods")
    bud = sub.add_parser("budget", help="the budget-response study: the chain, FedAvg with both losses and "
                         "ownerfedavg at several training budgets (and a finer voxel), SegViz's node sets and FedGIN's "
                         "contrast study at two of them; Dice and the claims against budget. Resumable")
    _add_common(bud, "study folder under results/ (default: budget-<profile>); a rerun resumes it")
    bud.add_argument("--scales", default="1,3,10", help="comma-separated budget scales: k x every training budget "
                     "of the profile (default 1,3,10)")
    bud.add_argument("--fine-scale", default="3", help="the scale also run at --fine-spacing (default 3; '' or 0: "
                     "none)")
    bud.add_argument("--fine-spacing", type=float, default=3.0, help="the finer voxel in mm (default 3.0)")
    bud.add_argument("--nodes-scales", default=None, help="scales with SegViz's node sets (default: the two "
                     "smallest; '' for none)")
    bud.add_argument("--contrast-scales", default=None, help="scales with FedGIN's contrast study (default: the two "
                     "smallest; '' for none)")
    bud.add_argument("--nodes", default="2,3,4", help="the node sets of `nodes` (default 2,3,4)")
    bud.add_argument("--scale-rounds", action="store_true", help="scale the FL rounds with the budget and keep the "
                     "local steps (default: keep the rounds, scale the local steps)")
    bud.add_argument("--report-only", action="store_true", help="only rebuild the report from the study folder")
    pred = sub.add_parser("predict", help="apply a trained run's model to your own CT (a folder of NIfTI): label "
                          "maps, overlays and organ volumes, with 04's preprocessing and inversion")
    pred.add_argument("--run", required=True, help="the run's folder, e.g. results/<run-name> (its checkpoints/)")
    pred.add_argument("--model", default="fl-local-ensemble", help="fl-local-ensemble (default), fl-local-processed, "
                      "fl-global, sl-ensemble, sl-processed or central (those the run has)")
    pred.add_argument("--images", required=True, help="folder of 3D CT volumes (*.nii.gz, *.nii)")
    pred.add_argument("--out", help="output folder (default: <run>/predictions/own/<model>/)")
    pred.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (default: CUDA when present)")
    pred.add_argument("--profile", help="the profile the run was trained with, only for a folder without run.json")
    args = parser.parse_args(argv)
    if args.command == "predict":
        return _predict(args)
    if args.command == "budget":
        return _budget(args, argv)
    if args.command in EXPERIMENTS:
        start, table, title = EXPERIMENTS[args.command]
        common = {"run_name": args.run_name, "params": dict(args.param), "results": args.results,
                  "log_output": args.log_output}
        try:
            run_dir = start(args, common)
        except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{title.format(run_dir=run_dir)}:\n{(run_dir / 'tables' / f'{table}.md').read_text()}")
        return 0
    try:
        run_dir = run_chain(args.profile, run_name=args.run_name, params=dict(args.param), only=args.only,
                            overwrite=args.overwrite, results=args.results, log_output=args.log_output)
    except (ChainError, FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record = json.loads(run_folder.run_record(run_dir).read_text())
    print(f"run {run_dir} finished in {record['wall_s']} s (peak memory {record['peak_rss_mb']} MB)")
    for name, entry in record["notebooks"].items():
        print(f"  {name:28s} {entry['status']:6s} {entry['wall_s']:8.1f} s {entry['peak_rss_mb']:9.1f} MB")
    return 0
