"""How often the claims table says "held" when nothing is there: the false-"held" rate of the claims' interval.

Simulates zero-mean paired differences with the structure the claims see (`claims.simulate_differences`: channels
scored on the same case correlated 0.32, datasets with different spreads) and counts the draws in which "A > B"
comes out held, for the interval the claims use now (a sign-flip test over whole cases, inverted;
`claims.simulated_false_held`) and for the one they used before (a percentile bootstrap resampling each
channel's cases on its own, `scipy.stats.bootstrap(..., paired=False, method="percentile")` with 2,000
resamples, replicated here in numpy). Nominal: 2.5%. Prints one row per structure and case count: the old and
the new rate under normal differences, and the new one under heavy-tailed (t, 3 df) and left-skewed differences.

    .venv/bin/python benchmarks/claims_calibration.py            # ~1 minute on 2 cores
    .venv/bin/python benchmarks/claims_calibration.py --draws 1000 --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedseg.reporting import claims

#: (label, cases per dataset, channels per dataset) at n = 2, 3, 4, 8, 9 cases, then the profiles' own counts
#: (test splits: liver, pancreas, kits19, spleen with 2, 2, 2, 1 channels; BTCV: 4 organs on the same cases).
SCENARIOS = [(f"one channel, n = {n}", [n], [1]) for n in (2, 3, 4, 8, 9)] + [
    (f"4 organs on n = {n} cases (BTCV)", [n], [4]) for n in (2, 3, 4, 8, 9)] + [
    (f"4 datasets x n = {n}, 7 channels", [n] * 4, [2, 2, 2, 1]) for n in (2, 3, 4, 8, 9)] + [
    ("smoke: test splits (1, 1, 1, 1)", [1, 1, 1, 1], [2, 2, 2, 1]),
    ("smoke: BTCV, 2 cases", [2], [4]),
    ("laptop: test splits (8, 17, 13, 4)", [8, 17, 13, 4], [2, 2, 2, 1]),
    ("laptop: BTCV / node sets, 9 cases", [9], [4]),
    ("paper: test splits (26, 56, 42, 8)", [26, 56, 42, 8], [2, 2, 2, 1]),
    ("paper: BTCV, 30 cases", [30], [4]),
]


def old_false_held(strata: list[np.ndarray], n_boot: int = 2000, seed: int = 0, chunk: int = 25) -> float:
    """The interval the claims used before: every channel's cases resampled on their own (percentile bootstrap
    of the unweighted mean over channels of their means), NaN (not held) when a channel has < 2 cases, a point
    when nothing varies. The fraction of draws whose lower bound is above 0."""
    rng = np.random.default_rng(seed)
    groups = [s[..., c] for s in strata for c in range(s.shape[-1])]  # (draws, cases) per channel
    draws = groups[0].shape[0]
    if any(g.shape[1] < 2 for g in groups):
        return 0.0
    held = 0
    for start in range(0, draws, chunk):
        stop = min(draws, start + chunk)
        boot = np.zeros((stop - start, n_boot))
        for g in groups:
            x = g[start:stop]
            idx = rng.integers(0, x.shape[1], size=(stop - start, n_boot, x.shape[1]))
            boot += np.take_along_axis(x[:, None, :], idx, axis=2).mean(axis=2)
        boot /= len(groups)
        low = np.percentile(boot, 2.5, axis=1)
        flat = np.all([np.ptp(g[start:stop], axis=1) == 0 for g in groups], axis=0)
        estimate = np.mean([g[start:stop].mean(axis=1) for g in groups], axis=0)
        low = np.where(flat, estimate, low)
        held += int((low > 0).sum())
    return held / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000, help="simulated runs per row (new interval)")
    parser.add_argument("--old-draws", type=int, default=2000, help="simulated runs per row (old interval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="skip the old interval on the paper's counts")
    args = parser.parse_args()
    start = time.perf_counter()
    mc = 100 * np.sqrt(0.025 * 0.975 / args.draws)
    print(f"false 'held' rate (%), nominal 2.5; Monte Carlo s.e. {mc:.2f} (new), "
          f"{100 * np.sqrt(0.025 * 0.975 / args.old_draws):.2f} (old, normal)")
    print("| structure | old (bootstrap, normal) | new (sign flips, normal) | new, t3 | new, left-skewed |")
    print("|---|---|---|---|---|")
    for label, cases, channels in SCENARIOS:
        if args.quick and label.startswith("paper"):
            old = float("nan")
        else:
            old = old_false_held(claims.simulate_differences(cases, channels, draws=args.old_draws, seed=args.seed),
                                 seed=args.seed + 1)
        new = [claims.simulated_false_held(cases, channels, draws=args.draws, seed=args.seed, distribution=d)
               for d in ("normal", "t3", "left-skewed")]
        tested = "" if sum(cases) >= claims.MIN_CASES else " (not tested)"
        print(f"| {label} | {100 * old:.1f} | {100 * new[0]:.1f}{tested} | {100 * new[1]:.1f} | {100 * new[2]:.1f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
