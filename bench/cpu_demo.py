"""CPU benchmark of the README's main job: wall time of `python -m orchestrator +experiment=legal_demo`
and what it is spent on, on the bundled sample set and on the real UNFAIR-ToS data.

Usage: python bench/cpu_demo.py [--unfair-tos ../shared/data/unfair_tos] [extra Hydra overrides...]
Prints a markdown table (one row per dataset) for bench/RESULTS.md, and writes bench/results/cpu_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(data_path: str, extra: list) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="cpu_demo_"))
    command = [sys.executable, "-m", "orchestrator", "+experiment=legal_demo", f"data.path={data_path}",
               "logger.mode=disabled", f"hydra.run.dir={run_dir}", *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"data": data_path, "command": " ".join(command[1:]), "wall_s": wall, **{
        k: v for k, v in metrics.items() if not isinstance(v, list)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unfair-tos", default=str(ROOT.parent / "shared" / "data" / "unfair_tos"))
    args, extra = parser.parse_known_args()
    datasets = ["sample:legal_clauses"] + ([args.unfair_tos] if os.path.isdir(args.unfair_tos) else [])
    rows = [run_demo(d, extra) for d in datasets]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    (out / "cpu_demo.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\nmachine: {machine}\n")
    print("| data | wall s | command to first step s (incl. evaluation before) | training s | evaluation after s "
          "| rest (export, teardown) s "
          "| accuracy before → after | macro-F1 before → after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        to_first_step = r["time/first_step_at"] - r["time/command_started_at"]
        rest = r["wall_s"] - to_first_step - r["time/train_s"] - r.get("time/eval_s", 0)
        print(f"| {r['data']} | {r['wall_s']:.0f} | {to_first_step:.0f} | {r['time/train_s']:.0f} | "
              f"{r.get('time/eval_s', 0):.0f} | {rest:.0f} | {r['eval_before/accuracy']:.3f} → "
              f"{r['eval/accuracy']:.3f} | {r['eval_before/macro_f1']:.3f} → {r['eval/macro_f1']:.3f} |")

if __name__ == "__main__":
    main()
