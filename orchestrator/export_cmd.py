"""`orchestrator export RUN_OR_CHECKPOINT [--merge/--no-merge] [--dtype bf16|fp32] [--shard-size 5GB] [--out DIR]`:
a consolidated Hugging Face directory (safetensors, config, tokenizer; LoRA merged or as adapter/) from any complete
checkpoint of a run, not only the final one.

RUN_OR_CHECKPOINT is a run directory (its newest complete checkpoint is taken) or one checkpoint_* directory. The
model is rebuilt from the run's saved config (<run_dir>/.hydra/config.yaml: model, peft; the strategy from the
checkpoint's markers, else plan.json), its weights read from the checkpoint: every rank's ZeRO-3 shard merged by
DeepSpeed's zero_to_fp32 (fp32 master weights), or the trainable weights of a one-worker adapter run on top of the
base model. Classification runs read their data again for the label names (as the run did, relative paths from
the directory the run was started in).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from orchestrator.errors import UserError

DTYPES = ("bf16", "fp32")


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = __doc__.split("\n\n")[0].split(":\n", 1)[1]
    parser = argparse.ArgumentParser(prog="orchestrator export", description=description)
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest complete "
                        "checkpoint) or a checkpoint_* directory")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                        help="adapters: merged into full weights (default: the run's peft.merge), or --no-merge: "
                        "the adapter alone")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default: the run's precision: "
                        "bf16 where it trained in bf16, else fp32)")
    parser.add_argument("--shard-size", default=None, help="largest safetensors file, e.g. 5GB (the default) or "
                        "500MB: bigger models are split, with an index")
    parser.add_argument("--out", help="the directory to write (default: <run_dir>/export_step_<step>)")
    parser.add_argument("--run", help="the run directory, where the checkpoint is stored outside it "
                        "(cluster.storage_path)")
    opts = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed would say it is "setting accelerator to CPU", on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    location, step, run_dir = locate(Path(opts.source), Path(opts.run) if opts.run else None)
    out = Path(opts.out) if opts.out else run_dir / f"export_step_{step}"
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose another --out")
    with local_copy(location) as checkpoint:
        written = export_checkpoint(checkpoint, run_dir, out, merge=opts.merge, dtype=opts.dtype,
                                    shard_size=opts.shard_size)
    sys.stdout.write(f"export: {out} (step {step} of {run_dir}, {written})\n")
    return 0


def locate(source: Path, run_dir: Optional[Path]) -> Tuple[Path, int, Path]:
    """(checkpoint, its step, run directory) for a run or checkpoint directory; refuses incomplete checkpoints."""
    from orchestrator.checkpoint import check_checkpoint, is_uri, metrics_only, newest_complete_checkpoint

    if not source.is_dir():
        raise UserError(f"{source} does not exist: give a run directory (runs/<name>/<date_time>) or one of its "
                        "checkpoint_* directories" if not source.exists() else f"{source} is not a directory")
    if (source / ".hydra" / "config.yaml").is_file() and not (source / "complete").is_dir():
        run_dir = run_dir or source
        storage = run_storage(source)
        info = newest_complete_checkpoint([str(storage)])
        if info is None:
            raise UserError(f"{source} holds no complete checkpoint (in {storage}); was it trained with "
                            "trainer.save_final=false and no trainer.checkpoint_every?")
        return (info.path if is_uri(info.path) else Path(info.path)), info.step, run_dir
    if metrics_only(str(source)):
        raise UserError(f"{source} holds metrics only (trainer.save_final=false): no weights to export")
    info, why = check_checkpoint(str(source))
    if info is None:
        raise UserError(f"{source} is not a complete checkpoint ({why}): give another, or the run directory for "
                        "its newest complete one")
    if run_dir is None:
        run_dir = next((p for p in source.resolve().parents if (p / ".hydra" / "config.yaml").is_file()), None)
        if run_dir is None:
            raise UserError(f"{source}: no run directory above it (one with .hydra/config.yaml): give it with --run "
                            "DIR")
    return source, info.step, run_dir


def run_storage(run_dir: Path) -> str:
    """Where the run's checkpoints are: run.json's storage (a path or a URI: cluster.storage_path), else
    <run_dir>/checkpoints. A storage this machine cannot see is said, not replaced by the run directory."""
    from orchestrator.checkpoint import is_uri

    try:
        storage = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("storage")
    except (OSError, ValueError):
        storage = None
    if not storage:
        return str(run_dir / "checkpoints")
    if not is_uri(storage) and not Path(storage).is_dir():
        raise UserError(f"{run_dir}/run.json keeps the run's checkpoints in {storage}, which this machine does not "
                        "see: export where that storage is mounted, or give one of its checkpoint_* directories")
    return storage


@contextlib.contextmanager
def local_copy(location):
    """A checkpoint as a local directory: itself, or, in an object store (s3://, gs://), a download for the time
    of the export (Ray's Checkpoint.as_directory; a file:// checkpoint is read in place)."""
    from orchestrator.checkpoint import as_checkpoint, is_uri

    if not is_uri(str(location)):
        yield Path(location)
        return
    with as_checkpoint(str(location)).as_directory() as directory:
        yield Path(directory)


def load_run(run_dir: Path):
    """The run's config as it ran (.hydra/config.yaml over the schema)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config import RunConfig

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: no .hydra/config.yaml, the config the run was composed with")
    try:
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))
    except OmegaConfBaseException as err:
        raise UserError(f"{path}: not a config of this orchestrator: {str(err).splitlines()[0]}") from None
    run.run_dir = str(run_dir)
    return run


def checkpoint_strategy(checkpoint: Path, run_dir: Path):
    """The strategy the checkpoint was trained with: its markers say (newer runs), else plan.json."""
    from orchestrator.config import Strategy

    for marker in sorted((checkpoint / "complete").glob("rank_*.json")):
        strategy = json.loads(marker.read_text(encoding="utf-8")).get("strategy")
        if strategy:
            return Strategy(strategy)
    plan = run_dir / "plan.json"
    if plan.is_file():
        return Strategy(json.loads(plan.read_text(encoding="utf-8"))["strategy"])
    raise UserError(f"{checkpoint}: no strategy in its markers and no {plan}: cannot tell how the model was built")


def read_weights(checkpoint: Path) -> Tuple[Dict[str, "object"], bool]:
    """(state dict, complete): every parameter merged from the ZeRO shards (complete), or a one-worker adapter
    run's trainable weights (not complete: the base comes from model.path)."""
    import torch

    from orchestrator.checkpoint import DEEPSPEED_DIR, TAG

    directory = checkpoint / DEEPSPEED_DIR
    plain = directory / TAG / "state.pt"
    if plain.is_file():  # PlainEngine (orchestrator/plain_engine.py): our own file of tensors
        return torch.load(plain, map_location="cpu", weights_only=True)["trainable"], False
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints and bars
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG), True


def export_checkpoint(checkpoint: Path, run_dir: Path, out: Path, merge: Optional[bool] = None,
                      dtype: Optional[str] = None, shard_size: Optional[str] = None) -> str:
    """Rebuild, load, save. Returns what was written (merged / adapter, dtype)."""
    import torch
    import transformers

    from orchestrator.adapters import apply_adapter, export_adapted
    from orchestrator.checkpoint import SHARD_SIZE
    from orchestrator.config import Strategy, Task
    from orchestrator.model import build_model, load_tokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    shard_size = shard_size or SHARD_SIZE
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", shard_size, re.IGNORECASE):
        raise UserError(f"--shard-size {shard_size} is not allowed: a size such as 5GB or 500MB")
    run = load_run(run_dir)
    strategy = checkpoint_strategy(checkpoint, run_dir)
    if dtype is None:
        plan = run_dir / "plan.json"
        precision = json.loads(plan.read_text(encoding="utf-8")).get("precision") if plan.is_file() else "fp32"
        dtype = "bf16" if precision == "bf16" else "fp32"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    labels = run_labels(run) if run.model.task is Task.classification else None
    # QLoRA's base is rebuilt unquantized (the adapters are the same LoRA matrices): merged onto the bf16/fp32 base
    build_strategy = Strategy.lora if strategy.quantized else strategy
    torch.manual_seed(run.trainer.seed)  # model.init=random: the base a one-worker adapter run trained on (as setup)
    model = build_model(run.model, labels, torch.float32, build_strategy)
    if strategy.uses_adapters:
        model = apply_adapter(model, build_strategy, run.peft, run.model.task, run.model.freeze_depth)
    state, complete = read_weights(checkpoint)
    load(model, state, complete, checkpoint)
    model = model.to(torch_dtype)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    if strategy.uses_adapters:
        peft = type(run.peft)(**{**vars(run.peft), "merge": run.peft.merge if merge is None else merge})
        export_adapted(model, build_strategy, peft, str(out), max_shard_size=shard_size)
        what = "adapter/ and merged weights" if peft.merge and build_strategy.mergeable else "adapter/ only"
    else:
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=shard_size)
        what = "full weights"
    tokenizer = load_tokenizer(run.model)
    if run.model.task is Task.classification:  # as the run's export: truncates as training did
        tokenizer.model_max_length = run.data.max_length
    tokenizer.save_pretrained(str(out))
    return f"{what}, {dtype}"


def load(model, state: Dict[str, "object"], complete: bool, checkpoint: Path) -> None:
    """Load the checkpoint's weights; a checkpoint that does not fit the model rebuilt from the config is an error."""
    result = model.load_state_dict(state, strict=False)
    unexpected: List[str] = list(result.unexpected_keys)
    missing: List[str] = list(result.missing_keys) if complete else []
    tied = {name for name in missing if _tied(model, name)}
    missing = [name for name in missing if name not in tied]
    if unexpected or missing:
        raise UserError(f"{checkpoint}: its weights do not fit the model rebuilt from the run's config (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); was the run's config changed?")


def _tied(model, name: str) -> bool:
    """lm_head.weight tied to the embeddings: saved once."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")


def run_labels(run) -> List[str]:
    """A classification run's label names, as training read them (from its data)."""
    from orchestrator.data import read_data

    try:
        return read_data(run.data, run.model.task, run.trainer.seed).labels
    except UserError as err:
        raise UserError(f"{err} (export reads the run's data for its label names: run it from the directory the "
                        f"run was started in)") from None
