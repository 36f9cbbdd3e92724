"""Issue 13's tables for bench/RESULTS.md, computed from the raw results in bench/results/issue13/ (nothing typed):

  1. the recipe variants of bench/imbalance_compare.py (macro-F1 on UNFAIR-ToS validation.jsonl, mean ± std over
     seeds, for the last epoch and for the epoch selected on the carve-out, with and without logit adjustment);
  2. the careful plain loop (bench/plain_loop.py) per seed;
  3. our CLI's default command (bench/cli_quality.py), its export scored by orchestrator.predict.

  python bench/recipe_tables.py
"""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "issue13"


def spread(values) -> str:
    values = list(values)
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} (n={len(values)})"


def variants() -> None:
    print("| file | batch, max_length | variant | last epoch | selected epoch | last + logit adjustment |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in sorted(RESULTS.glob("gpu_variants_*.json")):
        setting = path.stem.removeprefix("gpu_variants_").rsplit("_", 1)[0]
        results = json.loads(path.read_text())["results"]
        for name in dict.fromkeys(r["variant"] for r in results):
            rows = [r for r in results if r["variant"] == name]
            print(f"| {path.name} | {setting} | {name} | {spread(r['last'] for r in rows)} | "
                  f"{spread(r['best'] for r in rows)} | {spread(r['last+adjust'] for r in rows)} |")


def plain_loop() -> None:
    rows = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(RESULTS / "*plain_loop_seed*.json")))]
    print("\n| plain loop run | device | seed | macro-F1 | accuracy | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']['epochs']} epochs, lr {r['recipe']['lr']} | {r['environment']['device_name']} | "
              f"{r['seed']} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | {r['wall_seconds']:.0f} |")
    print(f"\nplain loop macro-F1: {spread(r['macro_f1'] for r in rows)}")


def cli() -> None:
    rows = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(RESULTS / "cli_*.json")))]
    if not rows:
        return
    print("\n| our CLI run | seed | wall s | exported step (of) | validation carve-out macro-F1 | "
          "validation.jsonl macro-F1 (export) | accuracy (export) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['seed']} | {r['wall_s']:.0f} | {r['exported_step']} ({r['steps']}) | "
              f"{r['carve_out_macro_f1']:.3f} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} |")
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        print(f"\n{label}: macro-F1 {spread(r['macro_f1'] for r in group)}, wall s "
              f"{spread(r['wall_s'] for r in group)}")


if __name__ == "__main__":
    variants()
    plain_loop()
    cli()
