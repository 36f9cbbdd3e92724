"""Issue 15: the start-up of finished runs, phase by phase, from their metrics.json (the marks the recipe and the
driver record: console.startup_account prints the same at the end of a run).

  python bench/startup_table.py bench/results/issue13/cli_gpu_default_dropout_seed*_metrics.json
"""

from __future__ import annotations

import json
import sys

from orchestrator.console import STARTUP_PHASES


def main(paths) -> None:
    labels = [label for label, _ in STARTUP_PHASES]
    print("| run | " + " | ".join(labels) + " | command to first step | training | wall |")
    print("| --- |" + " --- |" * (len(labels) + 3))
    for path in paths:
        m = json.load(open(path))
        started = m["time/command_started_at"]
        figures = [seconds(m) for _, seconds in STARTUP_PHASES]
        figures += [m["time/first_step_at"] - started, m.get("time/train_s", 0.0), m["time/finished_at"] - started]
        print(f"| {path.rsplit('/', 1)[-1]} | " + " | ".join(f"{x:.1f}" for x in figures) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
