"""A run's README.md: what ran (profile, data, commit, times, memory), its claims, tables and figures.

Built from the files the run wrote, so it never claims a result the run does not hold. The top of the
reporting layer: it reads the tables `report` and `claims` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedseg import run_folder
from fedseg.reporting.claims import save_claims

#: Tables of a run, in reading order, with a heading each (those a run does not have are skipped).
README_TABLES = {
    "claims": "The papers' claims, decided by this run's numbers",
    "table1": "Table 1: cases per dataset and split",
    "table2": "Table 2: Dice (%) on each task's test split",
    "table3": "Table 3: Dice (%) on the external BTCV set",
    "table3_detail": "BTCV in detail: Dice, NSD, HD95 (mean ± std [bootstrap 95% CI], cases scored)",
    "btcv_paired": "BTCV: paired comparisons between methods",
    "btcv_inference_time": "BTCV: inference time per case, full sliding window vs coarse-to-fine",
    "segviz_nodes": "SegViz table: Dice on BTCV per node set (`python -m fedseg nodes`)",
    "sweep_methods": "Every federated method side by side (`python -m fedseg sweep`)",
    "sweep_dilution": "How far each channel's head moves, per swept federation (label conflict vs dilution)",
    "dilution": "How far each channel's head moves in the global model (FedAvg's dilution)",
    "contrast_summary": "FedGIN: in- and cross-contrast Dice (%) (`python -m fedseg contrast`)",
    "contrast_channels": "FedGIN: Dice (%) per channel, tested on CT and on MRI-like",
    "table2_baselines": "Baselines (02): SL and central aggregation",
}
README_FIGURES = {
    "fig1_datasets": "Fig. 1: one case per dataset",
    "learning_curves_baselines": "Learning curves of the SL and central models",
    "fl_learning_curves": "FL learning curves, global and local",
    "fl_dilution": "How far each channel's head moves: global vs owners' update, per round",
    "sweep_dilution": "How far each channel's head moves, per swept federation",
    "btcv_dice_bars": "BTCV Dice with bootstrap 95% confidence intervals",
    "btcv_nsd_bars": "BTCV normalized surface Dice with bootstrap 95% confidence intervals",
    "fig3_btcv": "Fig. 3: a BTCV case, post-processed ensemble of the FL local models",
    "fig4_test_cases": "Fig. 4: a test case per task: ground truth, SL, FL global, FL local",
    "segviz_nodes": "SegViz node sets: Dice on BTCV, the paper's means as ticks",
    "contrast_channels": "FedGIN: Dice per channel tested on CT and on MRI-like",
}


def results_readme(run_dir: str | Path) -> Path:
    """Write `<run_dir>/README.md`: what ran (profile, data, commit, times, memory), the tables, the figures.

    Built only from the files the run wrote, so it never claims a result the run does not hold.
    """
    run_dir = Path(run_dir)
    save_claims(run_dir, seed=0)  # from the scores the run wrote, before the README shows them
    record = json.loads(run_folder.run_record(run_dir).read_text()) if run_folder.run_record(run_dir).exists() else {}
    cfg = record.get("profile_config", {})
    lines = [f"# Run `{run_dir.name}`", ""]
    if record:
        git, host = record.get("git", {}), record.get("host", {})
        phantom = cfg.get("data", {}).get("phantom", {})
        source = cfg.get("data", {}).get("source", "?")
        generated = record.get("phantom") or {}
        version = f"phantom {generated['version']}, " if generated.get("version") else ""
        domain = f", domain {phantom['domain']}" if phantom.get("domain", "ct") != "ct" else ""
        data = (f"synthetic CT (fedseg.data.phantom, {version}case_scale {phantom.get('case_scale')}{domain}, "
                f"seed {record.get('seed')})" if source == "synthetic" else f"real data at `{record.get('data_root')}`")
        lines += [
            f"- **profile** `{record.get('profile')}`, seed {record.get('seed')}, "
            f"parameters {record.get('parameters') or '{}'}",
            f"- **data**: {data}; voxels {cfg.get('preprocess', {}).get('spacing')} mm, "
            f"model {cfg.get('model', {}).get('name')} {cfg.get('model', {}).get('channels')}",
            f"- **code**: commit `{str(git.get('commit', '?'))[:12]}`"
            f"{' (uncommitted changes)' if git.get('dirty') else ''}, "
            f"torch {record.get('versions', {}).get('torch')}, monai {record.get('versions', {}).get('monai')}, "
            f"flwr {record.get('versions', {}).get('flwr')}",
            f"- **host**: {host.get('cpus')} CPUs ({host.get('cpu_model', '?')}), "
            f"torch threads {host.get('torch_threads', '?')}, {host.get('platform')}",
            f"- **status** {record.get('status')}, started {record.get('started')}, ended {record.get('ended')}",
            "", "| notebook | status | wall time (s) | peak memory (MB) |", "|---|---|---|---|",
        ]
        for name, entry in record.get("notebooks", {}).items():
            lines.append(f"| {name} | {entry.get('status')} | {entry.get('wall_s', '')} | "
                         f"{entry.get('peak_rss_mb', '')} |")
        if record.get("wall_s") is not None:
            lines.append(f"| **chain** | {record.get('status')} | {record.get('wall_s')} | "
                         f"{record.get('peak_rss_mb')} |")
        lines.append("")
    for name, heading in README_TABLES.items():
        path = run_folder.table_file(run_dir, name, ".md")
        if path.exists():
            lines += [f"## {heading}", "", path.read_text().strip(), ""]
    figures = [(name, heading) for name, heading in README_FIGURES.items()
               if run_folder.figure_file(run_dir, name).exists()]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"### {heading}\n\n![{heading}](figures/{name}.png)\n" for name, heading in figures]
    path = run_dir / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
