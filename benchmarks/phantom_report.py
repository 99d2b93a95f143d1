"""The phantom's own report: generation time of a profile's data, the anatomy table, and Fig. 1 (axial and coronal).

Generates the profile's synthetic data afresh into a temporary folder (timed, `--workers` processes), checks that a
second generation gives the same bytes, measures `--patients` synthetic patients against the published anatomy
(`phantom.anatomy_table`), and draws Fig. 1 of that data. `--compare ROOT` also draws Fig. 1 of another synthetic
data root (for instance one written by an older version of the generator, from a checkout of an older commit), so
the two can be put side by side. Writes generation.md, anatomy.md, anatomy.png, fig1.png (and fig1_compare.png)
to --out, and always the contrast phases: fig1_phases.png (one case in every phase) and enhancement.md (each
tissue's value per phase in the images beside the published value the generator aims at); `--phases-only` writes
just those two.

    .venv/bin/python benchmarks/phantom_report.py --out results/phantom-report
    .venv/bin/python benchmarks/phantom_report.py --phases-only --out results/reference/phantom
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


def phases_figure(out: Path, seed: int = 0, dataset: str = "btcv", case: str = "img0001") -> None:
    """One case in every contrast phase (same anatomy): an axial slice through the kidneys and a coronal slice,
    W400 L40, the phase and the seconds after the injection in each title."""
    import matplotlib.pyplot as plt
    import numpy as np

    from fedseg.data import phantom

    cases = {phase: phantom.simulate_case(dataset, case, seed=seed, phases=phase) for phase in phantom.PHASES}
    organs = cases["portal"]["organs"]
    kidneys = np.isin(organs, (phantom.ORGANS["kidney_right"], phantom.ORGANS["kidney_left"]))
    z = int(np.argmax(kidneys.sum(axis=(0, 1))))
    y = int(np.argmax((organs > 0).sum(axis=(0, 2))))
    spacing = cases["portal"]["grid"].spacing
    fig, axes = plt.subplots(2, len(cases), figsize=(3.3 * len(cases), 6.6))
    names = {"unenhanced": "unenhanced", "arterial": "late arterial", "portal": "portal venous",
             "delayed": "delayed"}
    for column, (phase, result) in enumerate(cases.items()):
        image = result["image"].astype(float)
        seconds = result["acquisition"]["seconds"]
        when = "no contrast" if seconds is None else f"{seconds:.0f} s after injection"
        # RAS array (+x: the patient's right): right on the screen's left (radiological), anterior up, superior up
        axial = np.flipud(np.fliplr(image[:, :, z].T))
        coronal = np.flipud(np.fliplr(image[:, y, :].T))
        for row, (view, aspect) in enumerate(((axial, spacing[1] / spacing[0]), (coronal, spacing[2] / spacing[0]))):
            ax = axes[row, column]
            ax.imshow(view, cmap="gray", vmin=-160, vmax=240, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, column].set_title(f"{names[phase]}\n{when}", fontsize=10)
    axes[0, 0].set_ylabel("axial, through the kidneys", fontsize=9)
    axes[1, 0].set_ylabel("coronal", fontsize=9)
    fig.suptitle(f"Phantom {phantom.PHANTOM_VERSION}: the same {dataset} case ({case}) in every contrast phase "
                 "(W400 L40; patient's right on the left)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def phases_report(out: Path, seed: int, patients: int) -> None:
    from fedseg.data import phantom

    phases_figure(out / "fig1_phases.png", seed=seed)
    table = phantom.enhancement_table(seed=seed, patients=patients, progress=False)
    note = (f"Phantom {phantom.PHANTOM_VERSION}, {patients} BTCV-like cases at the laptop profile's phantom "
            "resolution (in-plane zoom 4, slice zoom 1.5), each imaged in every phase: the median HU over each "
            "tissue's voxels, median (5th to 95th percentile) over the cases / the value the generator aims at "
            "(published unenhanced value + enhancement at the phase's reference time: 35, 70, 240 s; "
            "docs/phantom.md cites the sources). The images read lower where a tissue is thin against fat "
            "(partial volume: kidney cortex, aorta, urine), where the scan falls early in its phase's window, and "
            "by the BTCV scanner's calibration (gain 0.97).")
    (out / "enhancement.md").write_text(f"# Contrast enhancement per phase\n\n{table.to_markdown()}\n\n{note}\n")
    print(table.to_markdown())


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
    parser.add_argument("--phases-only", action="store_true", help="only fig1_phases.png and enhancement.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phases_report(args.out, args.seed, min(args.patients, 10))
    if args.phases_only:
        return
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
