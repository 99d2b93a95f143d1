"""The phantom's own report: generation time of a profile's data, the anatomy table, and Fig. 1 (axial and coronal).

Generates the profile's synthetic data afresh into a temporary folder (timed, `--workers` processes), checks that a
second generation gives the same bytes, measures `--patients` synthetic patients against the published anatomy
(`phantom.anatomy_table`), and draws Fig. 1 of that data. `--compare ROOT` also draws Fig. 1 of another synthetic
data root (for instance one written by an older version of the generator, from a checkout of an older commit), so
the two can be put side by side. Writes generation.md, anatomy.md, anatomy.png, fig1.png (and fig1_compare.png)
to --out.

    .venv/bin/python benchmarks/phantom_report.py --out results/phantom-report
"""

from __future__ import annotations

import argparse
import filecmp
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")


def figure1(profile: str, data_root: Path, out: Path) -> None:
    from fedseg.config import resolve
    from fedseg.data.datasets import check_data
    from fedseg.data.transforms import build_cache, case_records
    from fedseg.reporting import report

    cfg = resolve(profile, data_root=data_root)
    cases = check_data(data_root, progress=False).cases
    firsts = cases.groupby("dataset", sort=False).head(1)
    records = case_records(data_root, firsts)
    build_cache(cfg, records, progress=False)
    fig = report.figure1(report.first_training_volumes(cfg, records))
    fig.savefig(out, dpi=110)


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    others = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == others and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--compare", type=Path, help="another synthetic data root to draw Fig. 1 of")
    parser.add_argument("--out", type=Path, default=Path("results/phantom-report"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from fedseg.config import load_profile
    from fedseg.data import phantom
    from fedseg.reporting import report

    settings = dict(load_profile(args.profile)["data"]["phantom"])
    settings["min_cases"] = tuple(settings["min_cases"])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FEDSEG_CACHE", str(Path(tmp) / "cache"))  # the figures' preprocessing stays here
        timings = []
        for attempt in ("first", "second"):
            start = time.perf_counter()
            root = phantom.generate(Path(tmp) / attempt, seed=args.seed, workers=args.workers, progress=False,
                                    **settings)
            timings.append(time.perf_counter() - start)
        cases = len(list((root / "manifest.csv").read_text().splitlines())) - 1
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        same = same_bytes(Path(tmp) / "first", Path(tmp) / "second")
        text = (f"# Phantom {phantom.PHANTOM_VERSION}: {args.profile} profile, seed {args.seed}\n\n"
                f"{cases} cases, {size:.0f} MiB, generated in {timings[0]:.1f} s and again in {timings[1]:.1f} s "
                f"with {args.workers} worker processes ({os.cpu_count()} CPUs); the two generations are "
                f"{'byte-identical' if same else 'NOT byte-identical'}.\n")
        (args.out / "generation.md").write_text(text)
        print(text)
        figure1(args.profile, root, args.out / "fig1.png")
        if args.compare:
            figure1(args.profile, args.compare, args.out / "fig1_compare.png")
    table = phantom.anatomy_table(seed=args.seed, patients=args.patients, progress=False)
    note = (f"Phantom {phantom.PHANTOM_VERSION}: median (5th to 95th percentile) over {args.patients} synthetic "
            "patients, measured on a 3 mm whole-abdomen grid (contacts: % of patients); published: adult values.")
    (args.out / "anatomy.md").write_text(table.to_markdown() + f"\n\n{note}\n")
    report.anatomy_figure(table.attrs["patients"]).savefig(args.out / "anatomy.png", dpi=110)
    print(table.to_markdown())


if __name__ == "__main__":
    main()
