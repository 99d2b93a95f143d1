"""Kidney Dice on BTCV before and after post-processing, with one or two kidney components kept.

`inference.postprocess` keeps the largest connected component of every foreground channel; the kidney channel
holds two organs, so keeping one component drops a kidney. This scores a finished run's FL local ensemble and
SL ensemble on its BTCV cases (notebook 04's `external.evaluate_btcv`, nothing written) twice: with the
kidney channel reduced to 1 component (the old default) and to 2 (`inference.POSTPROCESS_COMPONENTS`), and
prints the mean kidney Dice (%) per method: ensemble, processed (1 component), processed (2 components); then
the mean Dice of each organ for the same columns.

    .venv/bin/python benchmarks/kidney_postprocess.py --run-dir results/exp1

The run folder needs `fl/config.json`, `data/cases.csv` and `checkpoints/` (notebooks 01-03).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

from fedseg.evaluate import external
from fedseg.train import inference

PAIRS = {"FL local model": (external.LOCAL, external.LOCAL_PP), "SL": (external.SL, external.SL_PP)}


def score(cfg: dict, cases: pd.DataFrame, run_dir: Path, kidney_components: int) -> pd.DataFrame:
    """Per case and organ scores of every method, the kidney channel post-processed to `kidney_components`."""
    with mock.patch.dict(inference.POSTPROCESS_COMPONENTS, {"kidney": kidney_components}):
        return external.evaluate_btcv(cfg, cases, run_dir, coarse_to_fine=False, write=False, progress=False)["scores"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="results/exp1", help="a finished run folder (notebooks 01-03)")
    args = parser.parse_args()
    torch.manual_seed(0)
    run_dir = Path(args.run_dir)
    cfg = json.loads((run_dir / "fl" / "config.json").read_text())
    cases = pd.read_csv(run_dir / "data" / "cases.csv")
    one, two = score(cfg, cases, run_dir, 1), score(cfg, cases, run_dir, 2)
    means = {k: 100 * s.groupby(["method", "organ"], sort=False)["dice"].mean() for k, s in (("1", one), ("2", two))}
    columns = ("ensemble", "processed, 1 kidney component", "processed, 2 kidney components")
    cases_scored = one[one["method"] == external.LOCAL]["case_id"].nunique()
    print(f"BTCV kidney Dice (%), mean over {cases_scored} cases, {run_dir}")
    rows = {name: (means["2"][(ens, "kidney")], means["1"][(pp, "kidney")], means["2"][(pp, "kidney")])
            for name, (ens, pp) in PAIRS.items() if (ens, "kidney") in means["2"]}
    print(pd.DataFrame.from_dict(rows, orient="index", columns=columns).round(1).to_markdown())
    print("\nEvery organ (Dice %):")
    organs = {f"{name}: {column}": means[variant].xs(method, level="method")
              for name, (ens, pp) in PAIRS.items() if (ens, "kidney") in means["2"]
              for column, variant, method in zip(columns, ("2", "1", "2"), (ens, pp, pp))}
    table = pd.DataFrame(organs).T[list(external.inference.BTCV_ORGANS)]
    table["mean of organs"] = table.mean(axis=1)
    print(table.round(1).to_markdown())


if __name__ == "__main__":
    main()
