"""Issue 13's measurement of our CLI: the command a new user types, timed, and its export scored on rows it never saw.

  python bench/cli_quality.py --seed 1 [--label default] [-- extra Hydra overrides]
runs
  python -m orchestrator +experiment=legal_demo data.path=../shared/data/unfair_tos/train.jsonl [trainer.seed=N] ...
then
  python -m orchestrator.predict <run_dir>/export --input ../shared/data/unfair_tos/validation.jsonl --score
and writes bench/results/issue13/cli_<label>_seed<N>.json. `--run-dir DIR` scores a run made already (its wall time
is read from metrics.json: from the command's start to its end).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "unfair_tos"
OUT = ROOT / "bench" / "results" / "issue13"


def score(export: Path, rows: Path) -> dict:
    """orchestrator.predict --score on the export; it prints accuracy and macro-F1 on stderr."""
    with tempfile.TemporaryDirectory() as directory:
        done = subprocess.run([sys.executable, "-m", "orchestrator.predict", str(export), "--input", str(rows),
                               "--output", str(Path(directory) / "p.jsonl"), "--score"], cwd=ROOT,
                              capture_output=True, text=True, check=True)
    line = next(line for line in done.stderr.splitlines() if line.startswith("scored "))
    values = json.loads(line.split(": ", 1)[1])  # "scored N of M rows: {...}"
    return {"score_line": line, "accuracy": values["accuracy"], "macro_f1": values["macro_f1"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=None, help="trainer.seed (default: the schema's)")
    parser.add_argument("--label", default="default")
    parser.add_argument("--run-dir", default=None, help="score this finished run instead of starting one")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.run_dir:
        run_dir = Path(args.run_dir)
        command = None
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="cli_quality_"))
        command = [sys.executable, "-m", "orchestrator", "+experiment=legal_demo", f"data.path={DATA / 'train.jsonl'}",
                   f"hydra.run.dir={run_dir}", *([f"trainer.seed={args.seed}"] if args.seed is not None else []),
                   *extra]
        subprocess.run(command, cwd=ROOT, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = score(run_dir / "export", DATA / "validation.jsonl")
    result = {"label": args.label, "seed": args.seed if args.seed is not None else "default (42)",
              "command": " ".join(command[1:]) if command else f"(run dir {run_dir})", "run_dir": str(run_dir),
              "wall_s": metrics["time/finished_at"] - metrics["time/command_started_at"],
              "steps": metrics["step"], "exported_step": metrics.get("select/exported_step"),
              "carve_out_macro_f1": metrics["eval/macro_f1"], **scored,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"cli_{args.label}_seed{args.seed if args.seed is not None else 'default'}.json"
    (OUT / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
