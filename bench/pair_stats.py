"""Statistics of the Ray/torchrun pair ratios in a bench/ray_overhead.py results file (for bench/RESULTS.md).

Usage: python bench/pair_stats.py bench/results/ray_overhead_pairs_2xh200.json
Prints the mean, sample standard deviation, range and median of the per-pair ratios, the 95% t-interval of
the mean, and how many pairs a ±0.02 interval would need at this spread.
"""

from __future__ import annotations

import json
import statistics
import sys

from scipy import stats


def main(path: str) -> None:
    ratios = json.load(open(path, encoding="utf-8"))["ray_over_torchrun_pairs"]
    n, mean, sd = len(ratios), statistics.mean(ratios), statistics.stdev(ratios)
    half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
    print(f"pairs {n}: mean {mean:.3f}, sd {sd:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}, "
          f"median {statistics.median(ratios):.3f}")
    print(f"95% t-interval of the mean ({n - 1} dof): {mean - half:.3f}-{mean + half:.3f}")
    print(f"pairs for a 95% interval of +-0.02 at this spread: {(1.96 * sd / 0.02) ** 2:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
