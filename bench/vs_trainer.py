"""Ours against Trainer, pair by pair, from bench/throughput.py results files (for bench/RESULTS.md).

A pair is one of our runs and the Trainer runs of the same call with the same model, GPU count and batch layout
(micro-batch x accumulation; several Trainer runs: their mean): the same machine and minutes, so machine-to-machine
variation cancels. Ratios by the timed window's tokens/s/GPU and by the median step's; over all pairs of one model
and GPU count: mean, sample standard deviation and the 95% t-interval of the mean.

Usage: python bench/vs_trainer.py bench/results/throughput_8b_2xh200_call6.json bench/results/...call7.json ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

from scipy import stats


def case_key(row: Dict) -> tuple:
    """Model, GPUs, micro-batch, accumulation: what must match for two runs to be compared."""
    return row["model"], row["gpus"], row.get("micro_batch", 1), row.get("grad_accum", 1)


def pairs(path: Path) -> List[Dict]:
    rows = [r for r in json.loads(path.read_text())["rows"] if "tokens_per_s_per_gpu" in r]
    found = []
    for ours in (r for r in rows if r["system"] == "ours"):
        key = case_key(ours)
        trainers = [r for r in rows if r["system"] == "trainer" and case_key(r) == key]
        if not trainers:
            continue
        window = statistics.mean(t["tokens_per_s_per_gpu"] for t in trainers)
        medians = [r.get("median_step_tokens_per_s_per_gpu") for r in (ours, *trainers)]
        median = (medians[0] / statistics.mean(medians[1:])) if None not in medians else None  # older files
        found.append({"file": path.name, "ours": ours["name"], "trainer": ", ".join(t["name"] for t in trainers),
                      "key": key, "window": ours["tokens_per_s_per_gpu"] / window, "median": median})
    return found


def layouts(path: Path) -> List[str]:
    """Our runs of one call with the same model, GPUs and rows per GPU per step, split differently: the mean
    tokens/s/GPU of each layout and its ratio to the layout with the most accumulation (the lever the planner's
    micro-batch pick pulls)."""
    rows = [r for r in json.loads(path.read_text())["rows"] if "tokens_per_s_per_gpu" in r and r["system"] == "ours"]
    groups: Dict[tuple, Dict[tuple, List[float]]] = {}
    for r in rows:
        model, gpus, micro, accum = case_key(r)
        groups.setdefault((model, gpus, micro * accum), {}).setdefault((micro, accum), []).append(
            r["tokens_per_s_per_gpu"])
    lines = []
    for (model, gpus, per_step), by_layout in sorted(groups.items()):
        if len(by_layout) < 2:
            continue
        means = {layout: statistics.mean(v) for layout, v in by_layout.items()}
        base = means[max(means, key=lambda layout: layout[1])]
        lines.append(f"{path.name}: ours, {model} on {gpus} GPUs, {per_step} rows per GPU per step: " + "; ".join(
            f"{m} x {a}: {v:,.0f} tokens/s/GPU ({len(by_layout[(m, a)])} runs), {v / base:.2f}x"
            for (m, a), v in sorted(means.items(), reverse=True)))
    return lines


def interval(values: List[float]) -> str:
    n = len(values)
    if not n:
        return "no pairs"
    mean = statistics.mean(values)
    if n < 2:
        return f"{n} pair: {mean:.3f}"
    sd = statistics.stdev(values)
    half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
    return f"{n} pairs: mean {mean:.3f}, sd {sd:.3f}, 95% interval {mean - half:.3f}-{mean + half:.3f}"


def main(paths: List[str]) -> None:
    found = [p for path in paths for p in pairs(Path(path))]
    print("| file | ours | Trainer | model, GPUs, micro x accum | ours/Trainer (window) | ours/Trainer (median step) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in found:
        model, gpus, micro, accum = p["key"]
        print(f"| {p['file']} | {p['ours']} | {p['trainer']} | {model}, {gpus}, {micro} x {accum} | "
              f"{p['window']:.3f} | {'' if p['median'] is None else format(p['median'], '.3f')} |")
    for line in (line for path in paths for line in layouts(Path(path))):
        print(line)
    for key in sorted({p["key"] for p in found}):
        group = [p for p in found if p["key"] == key]
        print(f"{key[0]} on {key[1]} GPUs, {key[2]} x {key[3]}: window {interval([p['window'] for p in group])}; "
              f"median step {interval([p['median'] for p in group if p['median'] is not None])}")


if __name__ == "__main__":
    main(sys.argv[1:])
