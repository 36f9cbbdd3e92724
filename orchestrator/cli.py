"""The subcommands of `orchestrator` (and `python -m orchestrator`), in front of the Hydra entry point:

    orchestrator train [RUN.yaml] [key=value ...]   a run (RUN.yaml: orchestrator/runfile.py); without a file, as
                                                    `orchestrator [key=value ...]`; also `--config RUN.yaml`
    orchestrator init [--model NAME] [--strategy S] [--out run.yaml]   a commented starter run file
    orchestrator export RUN_OR_CHECKPOINT [--merge/--no-merge] [--dtype bf16|fp32] [--shard-size 5GB] [--out DIR]
    orchestrator chat EXPORT [--once TEXT]
    orchestrator predict EXPORT --input rows.jsonl [--score]   (= python -m orchestrator.predict)

Anything else is the Hydra command line, as before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Sequence

import yaml

from orchestrator.errors import UserError, report_user_error

COMMANDS = ("init", "export", "chat", "predict")


def route(argv: Sequence[str]) -> List[str]:
    """The Hydra arguments for this command line: `train [FILE]` and `--config FILE` become the file's overrides
    followed by the rest; init/export/chat/predict run here and exit."""
    from orchestrator import runfile

    runfile.ACTIVE.update(file=None, lines={})
    args = list(argv)
    if any(a.lstrip("+").startswith("data.columns=") for a in args):  # text=sentence,label=category as typed
        from orchestrator.data.sources import quote_columns_override

        args = [quote_columns_override(a) for a in args]
    if args and args[0] in COMMANDS:
        sys.exit(run_command(args[0], args[1:]))
    if args and args[0] == "train":
        args = args[1:]
        if args and is_file_argument(args[0]):
            return expand(args[0], args[1:])
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(args):
                    raise UserError("--config needs a run file: --config path/to/run.yaml")
                file, rest = args[i + 1], args[:i] + args[i + 2:]
            else:
                file, rest = arg.split("=", 1)[1], args[:i] + args[i + 1:]
            return expand(file, rest)
    return args


def is_file_argument(arg: str) -> bool:
    """A run file, not an override or a flag: no '=', not a flag, and a YAML name or an existing path."""
    return "=" not in arg and not arg.startswith(("-", "+", "~")) and (
        arg.endswith((".yaml", ".yml")) or Path(arg).exists())


def expand(file: str, rest: Sequence[str]) -> List[str]:
    from orchestrator.runfile import expand as expand_file

    if any(a in ("--help", "-h") for a in rest):
        return list(rest)
    return expand_file(file, rest)


def run_command(name: str, args: List[str]) -> int:
    try:
        if name == "init":
            return init(args)
        if name == "export":
            from orchestrator.export_cmd import main as export_main

            return export_main(args)
        if name == "chat":
            from orchestrator.chat import main as chat_main

            return chat_main(args)
        from orchestrator.predict import main as predict_main

        return predict_main(args) or 0
    except UserError as err:
        return report_user_error(str(err))


# ---------------------------------------------------------------- init

STARTER = """\
# {out}: a run of your own for orchestrator (the keys of its experiments: every key and its default is
# listed by `orchestrator train {out} --cfg job`; keys given on the command line win over this file).
#   orchestrator train {out} dry_run=true        # check the config and the data, print the plan, start nothing
#   orchestrator train {out}                     # train: runs/{name}/<date_time>/ gets export/, metrics, plots
#   orchestrator train {out} trainer.epochs=1    # any key=value on the command line wins over this file
name: {name}  # the run's name: its directory is runs/<name>/<date_time>/ (default: this file's name)

model:  # {model_comment}
{model}
data:
  # a JSONL/CSV file or a directory with train.* and validation.* (paths relative to where you run orchestrator),
  # or a bundled sample set (sample:legal_clauses, sample:legal_instructions)
  path: {data_path}
  format: {data_format}  # auto (from the first row), classification (text, label), alpaca, chat or text
  max_length: {max_length}  # tokens per row; longer rows are truncated and counted

# auto: the planner picks from the GPUs it finds (full ZeRO-3, or LoRA/QLoRA when full does not fit) and says
# why; or one of: {strategies}
strategy: {strategy}

trainer:
  epochs: {epochs}  # passes over the training rows (trainer.max_steps=N instead: optimizer steps)
  # global_batch_size: 64  # rows per optimizer step over all workers (default: micro-batch x workers)
  # checkpoint_every: 100  # steps between checkpoints (orchestrator export can turn any of them into a model)

# optim:
#   lr: 1e-5  # peak learning rate; unset: the strategy's own (the plan prints it and why)
"""


def init(args: List[str]) -> int:
    from orchestrator.config import Strategy, Task
    from orchestrator.package_files import package_dir

    conf = package_dir("hydra_conf")
    models = sorted(p.stem for p in (conf / "model").glob("*.yaml"))
    parser = argparse.ArgumentParser(prog="orchestrator init", description="Write a commented starter run file "
                                     "that trains as is: orchestrator train run.yaml.")
    parser.add_argument("--model", default="minilm", help=f"a model config ({', '.join(models)}), a Hugging Face "
                        "id or a local model directory (default: minilm, the bundled classifier)")
    parser.add_argument("--task", choices=[t.value for t in Task], help="for a model id or directory: its task "
                        "(default: causal_lm)")
    parser.add_argument("--strategy", default="auto", choices=[s.value for s in Strategy])
    parser.add_argument("--out", default="run.yaml", help="the file to write (default: run.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    opts = parser.parse_args(args)
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise UserError(f"{out} exists: choose another --out, or add --force to overwrite it")

    if opts.model in models:
        model_file = (conf / "model" / f"{opts.model}.yaml").read_text(encoding="utf-8")
        settings = yaml.safe_load(model_file) or {}
        from orchestrator.cli_help import first_sentence

        comment = first_sentence(model_file) or opts.model
        settings.setdefault("path", "minilm")
        settings.setdefault("task", Task.classification.value)
        if opts.task:
            settings["task"] = opts.task
    else:
        settings = {"path": opts.model, "task": opts.task or Task.causal_lm.value}
        comment = "a Hugging Face id (model.allow_download: true to fetch it) or a local model directory"
    task = Task(settings["task"])
    data_name = "legal_clauses" if task is Task.classification else "legal_instructions"
    data = yaml.safe_load((conf / "data" / f"{data_name}.yaml").read_text(encoding="utf-8"))
    model_lines = [f"  path: {settings.pop('path')}  # a Hugging Face id or a local directory",
                   f"  task: {settings.pop('task')}  # classification (a new classifier head) or causal_lm"]
    model_lines += [f"  {key}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                    for key, value in settings.items()]
    text = STARTER.format(
        out=out.name, name=out.stem, model_comment=comment, model="\n".join(model_lines),
        data_path=data["path"], data_format=data.get("format", "auto"), max_length=data.get("max_length", 256),
        strategies=", ".join(s.value for s in Strategy if s is not Strategy.auto), strategy=opts.strategy,
        epochs=5 if task is Task.classification else 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {out}: check it with `orchestrator train {out} dry_run=true`, train with "
                     f"`orchestrator train {out}`\n")
    return 0

