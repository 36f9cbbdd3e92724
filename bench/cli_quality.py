"""Issue 13's measurement of our CLI: the command a new user types, timed, and its export scored on rows it never saw.

  python bench/cli_quality.py --seed 1 [--label default] [-- extra Hydra overrides]
runs
  python -m orchestrator +experiment=legal_demo data.path=../shared/data/unfair_tos/train.jsonl [trainer.seed=N] ...
then
  python -m orchestrator.predict <run_dir>/export --input ../shared/data/unfair_tos/validation.jsonl --score
and writes bench/results/issue13/cli_<label>_seed<N>.json (or into --out DIR). `--run-dir DIR` scores a run made
already (its wall time is read from metrics.json: from the command's start to its end).

  python bench/cli_quality.py --seed 1 --sweep auto --label tuner
runs the same command with `+sweep=auto` (the built-in tuner: every trial with trainer.seed=N, selected on the
validation carve-out) and scores the sweep's best_export/ on the same unseen rows.
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
    global DATA  # --data moves it (the GPU machine has its own copy of the rows)
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=None, help="trainer.seed (default: the schema's)")
    parser.add_argument("--label", default="default")
    parser.add_argument("--run-dir", default=None, help="score this finished run instead of starting one")
    parser.add_argument("--sweep", default=None, help="run +sweep=<this> and score its best_export")
    parser.add_argument("--out", default=str(OUT), help="where the JSON goes")
    parser.add_argument("--data", default=str(DATA), help="the folder of train.jsonl and validation.jsonl")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    DATA = Path(args.data).resolve()
    if args.sweep:
        return tuner(args, extra)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        command = None
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="cli_quality_"))
        command = cli_command(args, [f"hydra.run.dir={run_dir}"], extra)
        subprocess.run(command, cwd=ROOT, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = score(run_dir / "export", DATA / "validation.jsonl")
    result = {"label": args.label, "seed": args.seed if args.seed is not None else "default (42)",
              "command": " ".join(command[1:]) if command else f"(run dir {run_dir})", "run_dir": str(run_dir),
              "wall_s": metrics["time/finished_at"] - metrics["time/command_started_at"],
              "steps": metrics["step"], "exported_step": metrics.get("select/exported_step"),
              "carve_out_macro_f1": metrics["eval/macro_f1"], **scored,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write(args, result)


def cli_command(args, where: list, extra: list) -> list:
    """The command as a new user types it: where its outputs go, the seed asked for, then the extra overrides."""
    seed = [f"trainer.seed={args.seed}"] if args.seed is not None else []
    return [sys.executable, "-m", "orchestrator", "+experiment=legal_demo", f"data.path={DATA / 'train.jsonl'}",
            *where, *seed, *extra]


def tuner(args, extra) -> None:
    """The built-in tuner as typed: one multirun; its best_export (chosen on validation) scored on unseen rows."""
    sweep_dir = Path(tempfile.mkdtemp(prefix=f"cli_quality_{args.sweep}_"))
    command = cli_command(args, [f"+sweep={args.sweep}", f"hydra.sweep.dir={sweep_dir}"], extra)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    wall_s = time.time() - started
    best = (sweep_dir / "best_overrides.txt").read_text().strip()
    best_trial = (sweep_dir / "best_export").resolve().parent  # the link points at <trial run dir>/export
    metrics = json.loads((best_trial / "metrics.json").read_text())
    scored = score(sweep_dir / "best_export", DATA / "validation.jsonl")
    result = {"label": args.label, "seed": args.seed if args.seed is not None else "default (42)",
              "command": " ".join(command[1:]), "sweep_dir": str(sweep_dir), "wall_s": wall_s,
              "best_trial": str(best_trial),
              "best_overrides": best, "exported_step": metrics.get("select/exported_step"),
              "carve_out_macro_f1": metrics.get("eval/macro_f1"), **scored,
              "summary_md": (sweep_dir / "summary.md").read_text() if (sweep_dir / "summary.md").exists() else None,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write(args, result)


def write(args, result: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"cli_{args.label}_seed{args.seed if args.seed is not None else 'default'}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
