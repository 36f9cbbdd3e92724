"""Mean, standard deviation and range of macro-F1 and accuracy over runs' result.json files, a markdown row per group.

Each file needs top-level "macro_f1" and "accuracy" (bench/plain_loop.py writes them; "seed", when there, is listed).
A pattern is a glob (quote it, so that the shell leaves it alone) or LABEL=GLOB (a glob whose text before its first
"=" has no "/" nor glob character needs a leading "./"). The group of a file is, in order:
its pattern's LABEL, --label, or the name of its run directory (the one holding result.json) without a trailing
seed marker: runs/plain/seed0/result.json and runs/plain-seed0/result.json both go to "plain".
std is the sample standard deviation (n - 1); one run has none.

  python bench/quality_summary.py 'runs/plain/seed*/result.json' 'cli=runs/cli/*/result.json'
  python bench/quality_summary.py 'runs/plain_h200_seed*/result.json' --label "plain loop, H200"
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
from pathlib import Path

SEED_SUFFIX = re.compile(r"[-_/]?seed[-_]?\d+$")
METRICS = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"))


def group_of(path: Path) -> str:
    """The run directory's name without a trailing seed marker (then its parent's, when nothing else is left)."""
    run_dir = path.parent
    name = SEED_SUFFIX.sub("", f"{run_dir.parent.name}/{run_dir.name}")
    return name.rsplit("/", 1)[-1] or run_dir.name


def split_label(pattern: str) -> tuple:
    """LABEL=GLOB → (LABEL, GLOB); a pattern whose text before its first "=" holds "/" or a glob character is all
    glob (Hydra's key=value directories), as is one that starts with "./"."""
    label, sep, rest = pattern.partition("=")
    if not sep or not label or any(c in label for c in "/*?[") or pattern.startswith("./"):
        return None, pattern
    return label, rest


def collect(patterns: list, label: str | None) -> dict:
    """group → list of (path, result), in the order the patterns and the sorted glob give them; each file once."""
    groups, seen = {}, set()
    for pattern in patterns:
        own_label, files = split_label(pattern)
        matches = sorted(glob.glob(files, recursive=True))
        if not matches:
            sys.exit(f"no files match {files!r}")
        for match in matches:
            path = Path(match).resolve()
            if path in seen:
                continue
            seen.add(path)
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                sys.exit(f"{match}: cannot read ({err})")
            missing = [key for key, _ in METRICS if not isinstance(result.get(key), (int, float))]
            if missing:
                sys.exit(f"{match}: no {' or '.join(missing)}")
            groups.setdefault(own_label or label or group_of(path), []).append((match, result))
    return groups


def describe(values: list) -> list:
    """mean, std, min, max as table cells."""
    std = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "–"
    return [f"{statistics.mean(values):.3f}", std, f"{min(values):.3f}", f"{max(values):.3f}"]


def table(groups: dict) -> str:
    header = ["group", "runs", "seeds"]
    for _, title in METRICS:
        header += [f"{title} mean", f"{title} std", f"{title} min", f"{title} max"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in groups.items():
        seeds = sorted(r["seed"] for _, r in runs if "seed" in r)  # a repeated seed shows twice
        cells = [name, str(len(runs)), ", ".join(str(s) for s in seeds) or "–"]
        for key, _ in METRICS:
            cells += describe([float(r[key]) for _, r in runs])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patterns", nargs="+", help="globs of result.json files, each optionally LABEL=GLOB")
    p.add_argument("--label", help="group name for the files of patterns without their own LABEL=")
    p.add_argument("--files", action="store_true", help="also list the files of each group")
    args = p.parse_args(argv)
    groups = collect(args.patterns, args.label)
    print(table(groups))
    print("\nstd: sample standard deviation (n - 1).")
    if args.files:
        for name, runs in groups.items():
            print(f"\n{name}: " + ", ".join(path for path, _ in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
