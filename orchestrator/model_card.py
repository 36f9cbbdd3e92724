"""The export's README.md (a Hugging Face model card) and, for causal LMs, its generation_config.json.

The card says what the model is (base model, task, strategy), how it was trained (the config's highlights,
the full config folded away), how well (validation metrics before and after), and how to use it: load it
with transformers, run `python -m orchestrator.predict`, serve it with vLLM.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Union

import yaml

from orchestrator.config import Strategy

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what model.path=minilm is
ADAPTER_DIR = "adapter"  # inside an export: the peft adapter (always written for adapter strategies)


def write_model_card(export_dir: str, config: Dict[str, Any], metrics: Dict[str, Any],
                     strategy: Union[Strategy, str, None] = None, plan: Union[Dict[str, Any], Any, None] = None) -> str:
    """Write <export_dir>/README.md from the run's config_dict() and final metrics; also make sure a causal
    LM export has a generation_config.json. `strategy`: the plan's (config says "auto" when the planner
    chose). `plan`: the Plan (or plan.json's dict) the run trained with, for the resolved batch layout,
    precision and hyperparameters; by default the run directory's plan.json (the export's parent), if any.
    Returns the README's path."""
    model, data = config.get("model", {}), config.get("data", {})
    task = model.get("task", "classification")
    plan = _plan_dict(plan, export_dir)
    strategy = Strategy(strategy or plan.get("strategy") or config.get("strategy", "auto"))
    has_full_model = os.path.isfile(os.path.join(export_dir, "config.json"))
    has_adapter = os.path.isfile(os.path.join(export_dir, ADAPTER_DIR, "adapter_config.json"))
    if has_full_model and task == "causal_lm":
        write_generation_config(export_dir)
    base = base_model_id(model.get("path", ""))
    name = config.get("name", "run")

    front = {"library_name": "transformers" if has_full_model else "peft",
             "pipeline_tag": "text-classification" if task == "classification" else "text-generation",
             "tags": ["orchestrator", "fine-tuned", strategy.value] + (["peft", "lora"] if has_adapter else [])}
    if base:
        front["base_model"] = base
    labels = _labels(export_dir) if task == "classification" else []

    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"{'Text classification' if task == 'classification' else 'Causal language model'} fine-tuned from "
             f"`{base or model.get('path', '?')}` with orchestrator (strategy: {strategy}) "
             f"on `{data.get('path', '?')}`."]
    if labels:
        lines += ["", "Labels: " + ", ".join(f"`{label}`" for label in labels) + "."]
    if not has_full_model and has_adapter:
        lines += ["", f"This export holds the adapter only (`{ADAPTER_DIR}/`, peft.merge=false or a strategy "
                      "that cannot be merged) and the tokenizer: load it on top of the base model."]

    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in _highlights(config, strategy, plan, metrics)]

    table = _metric_rows(metrics)
    if metrics.get("select/exported_step") is not None:
        lines += ["", f"These are the weights of step {metrics['select/exported_step']} of {metrics.get('step')}: the "
                      f"evaluation with the best validation {metrics.get('select/metric')} "
                      f"({metrics.get('select/best_value', float('nan')):.4f}). Being chosen on validation, its "
                      "validation figures below are optimistic; judge it on rows it never saw."]
    if table:
        lines += ["", "## Validation metrics", "", "| metric | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {key} | {before} | {after} |" for key, before, after in table]

    lines += ["", "## Use", "", "```python"] + _load_snippet(task, has_full_model, base) + ["```", "",
              "Quick local predictions on a JSONL/CSV file (classification: `text` rows; causal LM: alpaca, "
              "chat or `text` rows):", "", "```bash",
              "python -m orchestrator.predict <this directory> --input rows.jsonl --output predictions.jsonl",
              "```"]
    if task == "causal_lm" and has_full_model:
        lines += ["", "## Serve with vLLM", "", "An OpenAI-compatible server on port 8000:", "", "```bash",
                  "pip install vllm", "vllm serve <this directory> --served-model-name " + name, "```", "",
                  "```bash",
                  "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
                  f"  -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
                  "```", "",
                  "The chat endpoint renders prompts with the tokenizer's chat template (saved in this directory); "
                  "a model trained on alpaca or plain-text rows is better queried through `/v1/completions` with "
                  "the prompt format it was trained on."]

    lines += ["", "<details><summary>Full run config</summary>", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    path = os.path.join(export_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


def write_generation_config(export_dir: str) -> Optional[str]:
    """generation_config.json from the exported config (eos/bos/pad ids) where save_pretrained wrote none."""
    path = os.path.join(export_dir, "generation_config.json")
    if os.path.isfile(path):
        return path
    from transformers import AutoConfig, GenerationConfig

    generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(export_dir))
    generation.save_pretrained(export_dir)
    return path


def base_model_id(path: str) -> Optional[str]:
    """A hub id for the card's base_model field; None for a local directory or a built-in shape."""
    if path == "minilm":
        return MINILM_HUB_ID
    if not path or path.startswith(("builtin:", "/", ".", "~")) or os.path.exists(path):
        return None
    return path


def _labels(export_dir: str) -> List[str]:
    try:
        with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as handle:
            id2label = json.load(handle).get("id2label") or {}
        return [id2label[k] for k in sorted(id2label, key=int)]
    except (OSError, ValueError):
        return []


def _plan_dict(plan: Union[Dict[str, Any], Any, None], export_dir: str) -> Dict[str, Any]:
    """The plan as plan.json holds it: from a Plan, a dict, or <export_dir>/../plan.json; {} when there is none."""
    if plan is not None:
        return plan if isinstance(plan, dict) else json.loads(plan.to_json())
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(export_dir)), "plan.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _highlights(config: Dict[str, Any], strategy: Strategy, plan: Optional[Dict[str, Any]] = None,
                metrics: Optional[Dict[str, Any]] = None) -> List[tuple]:
    """The settings the run trained with, resolved: the plan's batch layout, precision, steps and the
    hyperparameters it filled in win over the config's auto / null; a row that cannot be resolved is left out."""
    model, data, optim = config.get("model", {}), config.get("data", {}), config.get("optim", {})
    trainer, peft = config.get("trainer", {}), config.get("peft", {})
    plan, metrics = plan or {}, metrics or {}
    filled = {key: row.get("value") for key, row in (plan.get("hyperparameters") or {}).items()}

    def value(section: Dict[str, Any], key: str) -> Any:
        resolved = filled.get(key, section.get(key.split(".", 1)[1]))
        return None if resolved == "auto" else resolved

    workers, micro = plan.get("num_workers"), plan.get("micro_batch_size") or trainer.get("micro_batch_size")
    accum = plan.get("grad_accum") or trainer.get("grad_accum")
    if plan.get("global_batch_size"):
        device = "GPU" if plan.get("use_gpu") else "CPU"
        global_batch = (f"{plan['global_batch_size']} = {workers} {device} worker(s) x {micro} micro-batch x "
                        f"{accum} accumulation")
    else:
        global_batch = trainer.get("global_batch_size")
    steps = plan.get("max_steps") or trainer.get("max_steps")
    if metrics.get("step") and steps and metrics["step"] != steps:
        steps = f"{metrics['step']} of {steps} planned"
    schedule, warmup = value(optim, "optim.schedule"), value(optim, "optim.warmup_ratio")
    rows = [("base model", model.get("path")), ("task", model.get("task")), ("strategy", strategy.value),
            ("data", data.get("path")), ("data format", data.get("format")), ("max length (tokens)",
                                                                              data.get("max_length")),
            ("epochs", value(trainer, "trainer.epochs")), ("optimizer steps", steps),
            ("micro-batch per worker", micro), ("global batch", global_batch),
            ("learning rate", value(optim, "optim.lr")),
            ("schedule", f"{schedule}, warmup {warmup}" if schedule is not None else None),
            ("precision", plan.get("precision") or value(trainer, "trainer.precision")),
            ("DeepSpeed", f"ZeRO stage {plan['zero_stage']}" + (", offload to host" if plan.get("offload") else "")
             if plan.get("zero_stage") is not None else None),
            ("seed", trainer.get("seed"))]
    if strategy.low_rank:
        rows += [("LoRA rank / alpha", f"{peft.get('rank')} / {peft.get('alpha')}"),
                 ("merged", peft.get("merge"))]
    if model.get("freeze_depth"):
        rows.append(("frozen bottom layers", model.get("freeze_depth")))
    return [(k, v) for k, v in rows if v is not None]


def _metric_rows(metrics: Dict[str, Any]) -> List[tuple]:
    rows = []
    for key in sorted(k.removeprefix("eval/") for k in metrics if k.startswith("eval/")):
        after, before = metrics[f"eval/{key}"], metrics.get(f"eval_before/{key}")
        if not _is_number(after):
            continue
        rows.append((key, f"{before:.4f}" if _is_number(before) else "-", f"{after:.4f}"))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_snippet(task: str, has_full_model: bool, base: Optional[str]) -> List[str]:
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    if not has_full_model:
        peft_auto = "AutoPeftModelForSequenceClassification" if task == "classification" else "AutoPeftModelForCausalLM"
        return [f"from peft import {peft_auto}", "from transformers import AutoTokenizer", "",
                f"model = {peft_auto}.from_pretrained(\"<this directory>/{ADAPTER_DIR}\")  "
                f"# loads the base model {base or '(adapter_config.json: base_model_name_or_path)'}",
                "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")"]
    if task == "classification":
        return ["from transformers import pipeline", "",
                "classify = pipeline(\"text-classification\", model=\"<this directory>\")",
                "print(classify(\"We may terminate your account at any time.\"))"]
    return [f"from transformers import {auto}, AutoTokenizer", "",
            f"model = {auto}.from_pretrained(\"<this directory>\")",
            "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")",
            "prompt = \"### Instruction:\\nSummarise the clause.\\n\\n### Response:\\n\"  # as in training",
            "inputs = tokenizer(prompt, return_tensors=\"pt\")",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))"]
