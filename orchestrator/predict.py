"""`python -m orchestrator.predict EXPORT_DIR --input rows.jsonl [--output out.jsonl] [--max-new-tokens N]`

Quick local inference with an export (a model directory written by a run):
- classification export: each row's "text" → the predicted label (config.id2label) and its probability;
- causal LM export: each alpaca row (instruction, input), chat row (messages / conversations: the answer to
  the conversation up to its last non-assistant turn) or text row (text: a continuation) → generated text,
  greedy, with the same prompt format as in training.
Every input row comes back with "prediction" (and "probability") added, as JSON lines on stdout or in
--output. With --score, rows that carry the answer (classification: "label"; alpaca: "output"; chat: a final
assistant turn) are scored: accuracy and macro-F1, or ROUGE-L and BLEU with a few samples, on stderr.
Weights load from safetensors only, and no code shipped with a model runs. A missing directory, an incomplete
export (no weights, config.json or tokenizer files, or a truncated weights file), a malformed row or --score on
rows without answers ends with one line on stderr and exit code 2. --output's directory is created if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

from orchestrator.errors import UserError, report_user_error

ADAPTER_DIR = "adapter"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("export_dir", help="an export directory (<run_dir>/export)")
    parser.add_argument("--input", required=True, help="rows to predict: .jsonl or .csv")
    parser.add_argument("--output", help="write predictions here as JSONL (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="causal LM: tokens to generate per row")
    parser.add_argument("--batch-size", type=int, default=16, help="classification: rows per forward pass")
    parser.add_argument("--max-length", type=int, default=None,
                        help="input tokens kept per row (default: a classifier's training data.max_length, which its "
                        "export's tokenizer holds as model_max_length; else 512)")
    parser.add_argument("--score", action="store_true", help="score the predictions against the rows' answers")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.batch_size < 1 or (args.max_length is not None and args.max_length < 8):
            raise UserError("--max-new-tokens and --batch-size must be >= 1, --max-length >= 8")
        task = export_task(args.export_dir)
        check_export(args.export_dir)  # complete (weights, config, tokenizer) before anything is read or loaded
        rows = read_input(args.input, task)  # a bad row fails before the model loads
        if args.score:
            check_scorable(rows, task, args.input)
        if args.output:
            prepare_output(args.output)
        predictor = Predictor(args.export_dir, max_length=args.max_length)
        results = predictor.predict(rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        if args.score:
            results = list(results)
        write_output(results, args.output)
        if args.score:
            sys.stderr.write(score(results, predictor) + "\n")
    except UserError as err:
        return report_user_error(str(err).splitlines()[0])
    if args.output:
        sys.stderr.write(f"wrote {len(rows)} predictions to {args.output}\n")
    return 0


def read_input(path: str, task: str):
    """Rows of a JSONL/CSV file, each checked for the fields the export's task needs (errors name file:line)."""
    from orchestrator.config import DataFormat
    from orchestrator.data.formats import CHAT_FIELDS, chat_messages
    from orchestrator.data.readers import read_rows

    rows = read_rows(path)
    for row in rows:
        fields = row.fields
        if task == "classification":
            if not isinstance(fields.get("text"), str) or not fields["text"].strip():
                raise UserError(f"{row.where}: a classification export needs a non-empty 'text' field per row")
        elif set(fields) & set(CHAT_FIELDS):
            chat_messages(row)
        elif "instruction" in fields:
            if not str(fields["instruction"]).strip():
                raise UserError(f"{row.where}: field 'instruction' must be non-empty text")
        elif not isinstance(fields.get("text"), str) or not fields["text"].strip():
            raise UserError(f"{row.where}: expected {DataFormat.alpaca.value} (instruction, input), chat "
                            f"(messages or conversations) or text (text) fields; got {sorted(fields)}")
    return rows


TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                          "sentencepiece.bpe.model")


def check_export(export_dir: str) -> None:
    """An export is complete or refused, naming what is missing: its config.json and safetensors weights (every
    shard an index names, each as long as its header says: a truncated copy is caught here), or an adapter-only
    export's adapter/; and its tokenizer (tokenizer_config.json and a vocabulary; without them transformers would
    build an empty tokenizer and predict garbage)."""
    missing = []
    weights: List[str] = []
    if os.path.isfile(os.path.join(export_dir, "config.json")):
        index = os.path.join(export_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            shards = sorted(set((_read_json(index).get("weight_map") or {}).values()))
            weights = [os.path.join(export_dir, shard) for shard in shards]
            missing += [shard for shard in shards if not os.path.isfile(os.path.join(export_dir, shard))]
        elif os.path.isfile(os.path.join(export_dir, "model.safetensors")):
            weights = [os.path.join(export_dir, "model.safetensors")]
        else:
            missing.append("model.safetensors (the weights; predict loads safetensors only)")
    else:  # an adapter-only export (export_task found adapter/adapter_config.json)
        adapter = os.path.join(export_dir, ADAPTER_DIR, "adapter_model.safetensors")
        if os.path.isfile(adapter):
            weights = [adapter]
        else:
            missing.append(f"{ADAPTER_DIR}/adapter_model.safetensors (the adapter's weights)")
    if not os.path.isfile(os.path.join(export_dir, "tokenizer_config.json")):
        missing.append("tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(export_dir, name)) for name in TOKENIZER_VOCABULARIES):
        missing.append(f"the tokenizer's vocabulary (one of {', '.join(TOKENIZER_VOCABULARIES)})")
    if missing:
        raise UserError(f"{export_dir}: incomplete export, missing {'; '.join(missing)}; export again, or copy the "
                        "whole <run_dir>/export directory")
    for path in weights:
        check_safetensors(path)


def check_safetensors(path: str) -> None:
    """A safetensors file is 8 bytes of header length, a JSON header, then the tensors' bytes: its size must be what
    the header says (a truncated copy would otherwise fail deep inside the loader, or load partly)."""
    import struct

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size:
                raise ValueError("header length beyond the file")
            header = json.loads(handle.read(header_length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{path}: not a valid safetensors file ({size} bytes); the export is damaged: export again")
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise UserError(f"{path}: truncated, {size} of {expected} bytes; the export is damaged (an interrupted copy?): "
                        "copy or export it again")
    if size > expected:
        raise UserError(f"{path}: {size - expected} bytes more than its header describes; the export is damaged: "
                        "export it again")


def check_scorable(rows, task: str, path: str) -> None:
    """--score needs rows that carry the answer (a classifier: "label"; a causal LM: alpaca "output" or a final
    assistant turn)."""
    if task == "classification":
        if not any(row.fields.get("label") not in (None, "") for row in rows):
            raise UserError(f"--score: none of the {len(rows)} rows of {path} has a 'label' to score against; "
                            "add labels or leave out --score")
    elif not any(reference_answer(row.fields) is not None for row in rows):
        raise UserError(f"--score: none of the {len(rows)} rows of {path} carries an answer to score against (alpaca "
                        "'output', or a final assistant turn); add answers or leave out --score")


def prepare_output(path: str) -> None:
    """--output: a file; its directory is created if missing (as a run creates its run directory)."""
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory; give a file name, e.g. "
                        f"{os.path.join(path, 'predictions.jsonl')}")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {path}: cannot create its directory {parent} ({err.strerror})")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output {path}: the directory {parent} is not writable")


def reference_answer(fields: Dict[str, Any]) -> Optional[str]:
    """The answer a row carries: alpaca "output", or the content of a chat's final assistant turn."""
    from orchestrator.data.formats import CHAT_FIELDS, chat_messages
    from orchestrator.data.readers import Row

    if set(fields) & set(CHAT_FIELDS):
        messages = chat_messages(Row(fields, "input"))
        return messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
    output = fields.get("output")
    return str(output) if output is not None and "instruction" in fields else None


def score(results: List[Dict[str, Any]], predictor: "Predictor") -> str:
    """Metrics of the predictions that have an answer to compare with (maintained libraries' metrics)."""
    from orchestrator.metrics import classification_metrics, format_samples, generation_metrics

    if predictor.task == "classification":
        label2id = {name: i for i, name in predictor.model.config.id2label.items()}
        scored = [r for r in results if r.get("label") not in (None, "")]
        unknown = sorted({str(r["label"]) for r in scored} - set(label2id))
        if unknown:
            raise UserError(f"--score: labels {unknown} are not among the model's labels {sorted(label2id)}")
        metrics = classification_metrics([label2id[r["prediction"]] for r in scored],
                                          [label2id[str(r["label"])] for r in scored])
        return f"scored {len(scored)} of {len(results)} rows: " + json.dumps(metrics)
    pairs = [(r, reference_answer(r)) for r in results]
    pairs = [(r, answer) for r, answer in pairs if answer is not None]
    metrics = generation_metrics([r["prediction"] for r, _ in pairs], [answer for _, answer in pairs])
    samples = format_samples([json.dumps({k: v for k, v in r.items() if k != "prediction"}, ensure_ascii=False)
                              for r, _ in pairs], [r["prediction"] for r, _ in pairs], [a for _, a in pairs])
    return f"scored {len(pairs)} of {len(results)} rows: {json.dumps(metrics)}" + (f"\n{samples}" if samples else "")


def write_output(results: Iterator[Dict[str, Any]], path: Optional[str]) -> None:
    handle = open(path, "w", encoding="utf-8") if path else sys.stdout
    try:
        for result in results:
            handle.write(json.dumps(result, ensure_ascii=False) + "\n")
            handle.flush()
    finally:
        if path:
            handle.close()


def export_task(export_dir: str) -> str:
    """"classification" or "causal_lm", from config.json's architectures (an adapter-only export: from
    adapter_config.json's task type)."""
    if not os.path.isdir(export_dir):
        raise UserError(f"{export_dir}: no such export directory; give a run's <run_dir>/export")
    config_path = os.path.join(export_dir, "config.json")
    adapter_config = os.path.join(export_dir, ADAPTER_DIR, "adapter_config.json")
    if not os.path.isfile(config_path):
        if os.path.isfile(adapter_config):
            return "classification" if _read_json(adapter_config).get("task_type") == "SEQ_CLS" else "causal_lm"
        raise UserError(f"{export_dir}: no config.json (nor {ADAPTER_DIR}/adapter_config.json); "
                        "is this an export directory?")
    architectures = _read_json(config_path).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    raise UserError(f"{config_path}: architectures {architectures} are neither a sequence classifier nor a causal LM")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})")


class Predictor:
    """An export loaded for inference: the task from config.json's architectures, weights from safetensors."""

    def __init__(self, export_dir: str, max_length: Optional[int] = None, device: Optional[str] = None):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # stderr keeps to one line on errors
        self.task = export_task(export_dir)
        check_export(export_dir)
        self.export_dir = export_dir
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self._load_model()
        self.tokenizer = self._load_tokenizer()
        if self.max_length is None:  # the length the classifier was trained on; a tokenizer's unset one is huge
            trained = getattr(self.tokenizer, "model_max_length", None) or 0
            self.max_length = trained if self.task == "classification" and 8 <= trained <= 100_000 else 512
        self.model.to(self.device).eval()

    def _load_model(self):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if not os.path.isfile(os.path.join(self.export_dir, "config.json")):
            return self._load_adapter(os.path.join(self.export_dir, ADAPTER_DIR))
        auto = AutoModelForSequenceClassification if self.task == "classification" else AutoModelForCausalLM
        try:
            return auto.from_pretrained(self.export_dir, use_safetensors=True, trust_remote_code=False,
                                              dtype="auto")
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, safetensors' and torch's errors on bad files
            raise UserError(f"{self.export_dir}: cannot load the model ({_first_line(err)})")

    def _load_adapter(self, adapter: str):
        """An adapter-only export: peft loads the base model named in adapter_config.json on top."""
        import peft

        adapter_config = _read_json(os.path.join(adapter, "adapter_config.json"))
        auto = peft.AutoPeftModelForSequenceClassification if self.task == "classification" else \
            peft.AutoPeftModelForCausalLM
        try:
            return auto.from_pretrained(adapter, use_safetensors=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{adapter}: cannot load the adapter and its base model "
                            f"{adapter_config.get('base_model_name_or_path')!r} ({_first_line(err)})")

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.export_dir, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{self.export_dir}: cannot load the tokenizer ({_first_line(err)})")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def predict(self, rows, batch_size: int = 16, max_new_tokens: int = 128) -> Iterator[Dict[str, Any]]:
        if self.task == "classification":
            return self._classify(rows, batch_size)
        return self._generate(rows, max_new_tokens)

    def _classify(self, rows, batch_size: int) -> Iterator[Dict[str, Any]]:
        import torch

        id2label = self.model.config.id2label
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            batch = self.tokenizer([str(r.fields["text"]) for r in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                probabilities = self.model(**batch).logits.float().softmax(-1)
            best = probabilities.max(-1)
            for row, index, probability in zip(chunk, best.indices.tolist(), best.values.tolist()):
                yield {**row.fields, "prediction": id2label.get(index, str(index)), "probability": probability}

    def _generate(self, rows, max_new_tokens: int) -> Iterator[Dict[str, Any]]:
        import torch

        for row in rows:
            ids, stop = self.prompt_ids(row.fields)
            ids = ids[-self.max_length:]  # keep the end of a long prompt: that is where the answer starts
            inputs = torch.tensor([ids], device=self.device)
            with torch.no_grad():
                output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                             max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            for marker in stop:
                text = text.split(marker)[0]
            yield {**row.fields, "prediction": text.strip()}

    def prompt_ids(self, fields: Dict[str, Any]) -> tuple:
        """Token ids of the row's prompt as training built it (formats.py), and text markers that end an answer."""
        from orchestrator.data.formats import CHAT_FIELDS, CHATML_STOP, CHATML_TEMPLATE, alpaca_prompt, chat_messages
        from orchestrator.data.readers import Row

        tokenizer = self.tokenizer
        if set(fields) & set(CHAT_FIELDS):
            messages = chat_messages(Row(fields, "input"))
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]  # a reference answer in the row is not part of the prompt
            template = tokenizer.chat_template or CHATML_TEMPLATE
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            start = tokenizer.bos_token or tokenizer.cls_token
            stop = [CHATML_STOP] if CHATML_STOP in template else []
            return self._encode(text, add_special=not (start and text.startswith(start))), stop
        if "instruction" in fields:
            return self._encode(alpaca_prompt(fields), add_special=True), ["### Instruction:"]
        return self._encode(str(fields["text"]), add_special=True), []

    def _encode(self, text: str, add_special: bool) -> List[int]:
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        sep = self.tokenizer.sep_token_id
        if add_special and sep is not None and ids and ids[-1] == sep:
            ids = ids[:-1]  # BERT-style tokenizers close every text with [SEP]: not inside a prompt
        return ids


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


if __name__ == "__main__":
    sys.exit(main())
