"""`orchestrator --help` (and `-h`): what the tool does, the main keys with one line each, and the experiments,
models, data sets, sweeps and strategies available, read from the installed configs (orchestrator.hydra_conf) and
the schema (orchestrator/config.py), so that a new experiment file or strategy shows up without editing this.
Hydra's own help (its flags: --cfg, --info, -m, ...) stays at --hydra-help."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path
from typing import List, Tuple

from orchestrator.package_files import package_dir

WIDTH = 100
# the keys most runs set, one line each; every one is checked against the schema (tests/unit/test_cli_help.py)
MAIN_KEYS = [
    ("name", "the run's name: everything it writes goes to runs/<name>/<date_time>/"),
    ("model.path", "a Hugging Face model id or local directory (hub downloads need model.allow_download=true)"),
    ("model.task", "classification (a new classifier head) or causal_lm"),
    ("data.path", "a JSONL/CSV/Parquet file or directory, sample:<name>, a Hugging Face dataset id (local "
                  "cache; data.allow_download=true fetches it), or a name in datasets.yaml"),
    ("data.columns", "our fields to the dataset's columns, e.g. text=sentence,label=category"),
    ("data.format", "auto (from the first row), classification (text, label), alpaca, chat or text"),
    ("data.max_length", "tokens per row; longer rows are truncated and counted (data.overlong=fail refuses)"),
    ("strategy", "auto (the planner picks from GPUs and memory) or one of the strategies below"),
    ("optim.lr", "peak learning rate; null (default): the strategy's own (the plan prints it and why)"),
    ("trainer.epochs", "epochs over the training rows (null: 5 for classification, 3 for causal LM)"),
    ("trainer.max_steps", "optimizer steps; wins over trainer.epochs when set"),
    ("trainer.global_batch_size", "rows per optimizer step over all workers"),
    ("trainer.micro_batch_size", "rows per worker per pass; null: the largest that fits the GPU"),
    ("peft.rank", "adapter rank (lora, dora, qlora)"),
    ("cluster.address", "an existing Ray cluster (auto, ray://host:10001); unset: an embedded local Ray"),
    ("cluster.gpus", "with cluster.nodes, cluster.gpu_memory_gb: plan for a cluster you do not have (dry run)"),
    ("cluster.cpu_workers", "workers where there is no GPU (default 2)"),
    ("cluster.in_process", "auto (default): a one-worker run on this machine trains in this process, Ray not "
                           "started (a faster start); false: always Ray Train's workers"),
    ("logger.mode", "W&B: online (needs WANDB_API_KEY), offline or disabled"),
    ("launcher", "local (Ray here or at cluster.address) or rayjob (a KubeRay RayJob: k8s/README.md)"),
    ("dry_run", "true: check the config and data, print the plan, start nothing"),
    ("resume", "auto (the newest complete checkpoint of this run's name), a checkpoint or a run directory"),
]
GROUPS = [  # config group, its heading, how it is chosen on the command line
    ("experiment", "experiments", "+experiment=NAME"),
    ("model", "models", "model=NAME"),
    ("data", "data sets", "data=NAME"),
    ("sweep", "sweeps", "+sweep=NAME"),
    ("logger", "loggers", "logger=NAME"),
]


def config_options(group: str) -> List[Tuple[str, str]]:
    """(option, its file's first sentence) for every <group>/<option>.yaml of the installed configs."""
    directory = package_dir("hydra_conf") / group
    if not directory.is_dir():
        return []
    return sorted((entry.name[:-len(".yaml")], first_sentence(entry.read_text(encoding="utf-8")))
                  for entry in directory.iterdir() if entry.name.endswith(".yaml"))


def first_sentence(text: str) -> str:
    """The first sentence of a config file's leading comment (after `# @package` lines; an indented comment line,
    such as an example command, ends it)."""
    words: List[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package"):
            continue
        if body.startswith("  ") and words:  # an example, not prose
            break
        words.append(body.strip())
    prose = " ".join(w for w in words if w)
    match = re.match(r"(.+?[.!?])(\s|$)", prose)
    return match.group(1) if match else prose


def strategies() -> List[Tuple[str, str]]:
    """(value, its comment in the schema) for every Strategy."""
    from orchestrator.config import Strategy

    comments = dict(re.findall(r"^\s+(\w+) = \"\w+\"\s+#\s*(.+)$", inspect.getsource(Strategy), re.MULTILINE))
    return [(s.value, comments.get(s.name, "")) for s in Strategy]


def readme_location() -> str:
    """The README of this checkout where there is one; else how to read the installed copy (the package's
    long description)."""
    checkout = Path(__file__).resolve().parents[1] / "README.md"
    if checkout.is_file():
        return str(checkout)
    return ("the project's README.md; installed, its text is the package description:\n  python -c \"import "
            "importlib.metadata as m; print(m.metadata('orchestrator').get_payload())\"")


def _rows(rows: List[Tuple[str, str]], indent: int = 2) -> List[str]:
    width = max((len(key) for key, _ in rows), default=0) + 2
    lines = []
    for key, text in rows:
        lines += textwrap.wrap(text, WIDTH, initial_indent=" " * indent + key.ljust(width),
                               subsequent_indent=" " * (indent + width)) or [" " * indent + key]
    return lines


def help_text() -> str:
    lines = textwrap.wrap(
        "orchestrator fine-tunes a language model on your data and your GPUs from one command: Hydra composes the "
        "run from the configs below, a planner picks the strategy and batch layout for the GPUs it finds (and "
        "says why), Ray Train starts one worker per GPU across the nodes, each trains with DeepSpeed ZeRO-3, and "
        "the run directory gets a Hugging Face model (export/), metrics, plots and a model card.", WIDTH)
    lines += ["", "usage: orchestrator [+experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...]",
              "       (the same as python -m orchestrator; with no arguments it runs the legal demo)",
              "       orchestrator train RUN.yaml [KEY=VALUE ...]    a run file of your own (--config RUN.yaml too)",
              "       orchestrator init [--model NAME] [--strategy S] [--out run.yaml]    writes a starter run file",
              "       orchestrator export RUN_OR_CHECKPOINT [--merge/--no-merge] [--dtype bf16|fp32] "
              "[--shard-size 5GB] [--out DIR]",
              "       orchestrator chat EXPORT [--once TEXT]    orchestrator predict EXPORT --input rows.jsonl", ""]
    for group, heading, how in GROUPS:
        options = config_options(group)
        if options:
            lines += [f"{heading} ({how}):", *_rows(options), ""]
    lines += ["strategies (strategy=NAME):", *_rows(strategies()), ""]
    lines += ["main keys (KEY=VALUE; every key: orchestrator --cfg job):", *_rows(MAIN_KEYS), ""]
    examples = [("orchestrator +experiment=legal_demo", "the demo, named legal_demo"),
                ("orchestrator +experiment=legal_full dry_run=true cluster.gpus=8 cluster.gpu_memory_gb=80", "plan"),
                ("orchestrator +experiment=legal_demo data.path=my.jsonl +sweep=auto", "the built-in tuner"),
                ("orchestrator +experiment=legal_demo --cfg job", "print the composed config")]
    width = max(len(command) for command, _ in examples) + 2
    lines += ["examples:", *(f"  {command.ljust(width)}# {what}" for command, what in examples), ""]
    lines += [f"README: {readme_location()}"]
    lines += ["Hydra's own options (--cfg, --info, -m, --multirun, ...): orchestrator --hydra-help"]
    return "\n".join(lines) + "\n"
