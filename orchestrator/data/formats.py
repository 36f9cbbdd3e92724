"""Turn rows of each supported format into token ids and training targets.

- classification: {"text", "label"} → input_ids + class index.
- alpaca: {"instruction", "input", "output"} → prompt + response tokens; the loss mask (-100) covers
  exactly the prompt, so the model learns to write responses, not to repeat instructions.
- chat: {"messages": [{"role", "content"}, ...]} (OpenAI) or {"conversations": [{"from", "value"}, ...]}
  (ShareGPT), rendered with a chat template; the loss covers the assistant turns only.
- text: {"text"} alone (continued pretraining): the loss covers every token; long documents are split
  into data.max_length pieces rather than cut.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from orchestrator.config import DataFormat, Task
from orchestrator.data.readers import Row
from orchestrator.errors import UserError

IGNORE_INDEX = -100  # positions the loss skips (PyTorch cross-entropy convention)

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

_FIELDS = {
    DataFormat.classification: ("text", "label"),
    DataFormat.alpaca: ("instruction", "output"),  # "input" is optional
    DataFormat.text: ("text",),
}
CHAT_FIELDS = ("messages", "conversations")  # OpenAI style, ShareGPT style
FORMAT_TASK = {DataFormat.classification: Task.classification, DataFormat.alpaca: Task.causal_lm,
               DataFormat.chat: Task.causal_lm, DataFormat.text: Task.causal_lm}

# ShareGPT speaker names (and OpenAI roles) → the roles chat templates know
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "model": "assistant", "bot": "assistant"}

# The fallback chat template (and data.chat_template=chatml): ChatML, as Qwen and many others use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_STOP = "<|im_end|>"  # where generation of an assistant turn ends under ChatML


@dataclass
class Example:
    input_ids: List[int]
    target: Any  # class index (classification) or per-token labels with IGNORE_INDEX on the prompt
    position_ids: Optional[List[int]] = None  # packed rows (data.packing): positions restart at each example


@dataclass
class DataReport:
    """What happened to the rows on the way to the model, shown before training."""

    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)  # reason → count
    label_counts: Dict[str, int] = field(default_factory=dict)
    examples: int = 0  # encoded examples (text: a long document gives several)
    split: int = 0  # text: documents longer than data.max_length, split into several examples
    trained_tokens: int = 0  # tokens the loss covers (causal LM: responses / assistant turns)
    cached: bool = False  # read from the tokenization cache, not tokenized now
    packed_rows: int = 0  # data.packing: rows the examples were packed into
    packed_length: int = 0  # data.packing: the most tokens a packed row holds (data.max_length)

    def describe(self, name: str) -> str:
        """One or two lines for the data report printed before training."""
        line = f"{name}: {self.rows} rows → {self.examples} examples, {self.tokens} tokens"
        if self.trained_tokens and self.trained_tokens != self.tokens:
            line += f" ({self.trained_tokens} trained)"
        line += f", {self.truncated} truncated"
        if self.split:
            line += f", {self.split} split"
        if self.dropped:
            line += ", dropped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        if self.cached:
            line += " (from cache)"
        if self.packed_rows:
            fill = self.tokens / (self.packed_rows * self.packed_length)
            line += f"\n  packed into {self.packed_rows} rows of up to {self.packed_length} tokens ({fill:.0%} full)"
        if self.label_counts:
            total = sum(self.label_counts.values())
            line += "\n  labels: " + ", ".join(f"{name} {n} ({n / total:.0%})"
                                               for name, n in sorted(self.label_counts.items()))
        return line


def detect_format(rows: Sequence[Row], requested: DataFormat) -> DataFormat:
    """The format from the first row's fields. Order matters: classification rows have "text" too, so
    "text" alone means plain text only when there is no "label"."""
    if requested is not DataFormat.auto:
        return requested
    keys = set(rows[0].fields)
    if keys & set(CHAT_FIELDS):
        return DataFormat.chat
    for fmt in (DataFormat.classification, DataFormat.alpaca, DataFormat.text):
        if set(_FIELDS[fmt]) <= keys:
            return fmt
    if rows[0].header:  # CSV: the field names are the header's
        raise UserError(f"{rows[0].header} (the header): cannot tell the data format from columns {sorted(keys)}; "
                        "expected classification (text, label), alpaca (instruction, input, output), chat (messages "
                        "or conversations) or text (text alone); or set data.format")
    raise UserError(f"{rows[0].where}: cannot tell the data format from fields {sorted(keys)}; expected "
                    "classification (text, label), alpaca (instruction, input, output), chat (messages or "
                    "conversations) or text (text alone); or set data.format")


def check_rows(rows: Sequence[Row], fmt: DataFormat) -> None:
    """Every row has the format's fields, as non-empty text (chat: a well-formed list of turns). A column that a
    CSV file's header lacks is named at the header; a field that no row has is named once for the file."""
    required = CHAT_FIELDS if fmt is DataFormat.chat else _FIELDS[fmt]
    if rows and rows[0].header:
        columns = set(rows[0].fields)
        missing = [k for k in required if k not in columns]
        if (fmt is DataFormat.chat and len(missing) == len(CHAT_FIELDS)) or (fmt is not DataFormat.chat and missing):
            raise UserError(f"{rows[0].header} (the header): no column {missing[0]!r}, which data.format={fmt.value} "
                            f"needs; the header names {sorted(columns)}")
    if len(rows) > 1 and fmt is not DataFormat.chat:
        for key in required:
            if all(_blank(row.fields.get(key)) for row in rows):
                raise UserError(f"{_file_of(rows)}: none of its {len(rows)} rows has a {key!r}, which "
                                f"data.format={fmt.value} needs in every row")
    for row in rows:
        if fmt is DataFormat.chat:
            chat_messages(row)
            continue
        for key in _FIELDS[fmt]:
            value = row.fields.get(key)
            if value is None:
                raise UserError(f"{row.where}: missing field {key!r} required by data.format={fmt.value}")
            if not isinstance(value, (str, int)) or not str(value).strip():
                raise UserError(f"{row.where}: field {key!r} must be non-empty text, got {value!r}")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def label_names(train: Sequence[Row], validation: Sequence[Row], held_out: bool = False) -> List[str]:
    """Class names in sorted order; a validation label that train never saw is an error. held_out: validation
    is the automatic split of the training file (data.validation_fraction), which the message then says."""
    names = sorted({str(r.fields["label"]) for r in train})
    known = set(names)
    for row in validation:
        if str(row.fields["label"]) not in known and held_out:
            raise UserError(f"{row.where}: label {row.fields['label']!r} occurs only in the rows held out for "
                            "validation (the automatic split, data.validation_fraction), never in the rows left to "
                            "train on; add training rows with it, or give a validation file (data.validation_path)")
        if str(row.fields["label"]) not in known:
            raise UserError(f"{row.where}: label {row.fields['label']!r} never occurs in the training data "
                            f"(train labels: {', '.join(names)})")
    return names


def encode_classification(rows: Sequence[Row], tokenizer, labels: List[str], max_length: int) -> tuple:
    index = {name: i for i, name in enumerate(labels)}
    report = DataReport(rows=len(rows))
    examples = []
    for row in rows:
        ids = tokenizer(str(row.fields["text"]), add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            report.truncated += 1
            ids = ids[: max_length - 1] + ids[-1:]  # keep the closing special token ([SEP] / </s>)
        label = str(row.fields["label"])
        examples.append(Example(ids, index[label]))
        report.tokens += len(ids)
        report.label_counts[label] = report.label_counts.get(label, 0) + 1
    report.examples = len(examples)
    return examples, report


def alpaca_prompt(fields: Dict[str, Any]) -> str:
    template = ALPACA_PROMPT if str(fields.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=str(fields["instruction"]).strip(), input=str(fields.get("input", "")).strip())


def encode_alpaca(rows: Sequence[Row], tokenizer, max_length: int) -> tuple:
    eos: Optional[int] = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    report = DataReport(rows=len(rows))
    examples = []
    dropped: Counter = Counter()
    for row in rows:
        # Prompt and response are tokenized apart so that the mask boundary is exact.
        prompt = tokenizer(alpaca_prompt(row.fields), add_special_tokens=True)["input_ids"]
        if tokenizer.sep_token_id is not None and prompt and prompt[-1] == tokenizer.sep_token_id:
            prompt = prompt[:-1]  # BERT-style tokenizers close every text with [SEP]: not inside a prompt
        response = tokenizer(str(row.fields["output"]), add_special_tokens=False)["input_ids"]
        response = response + ([eos] if eos is not None else [])
        add_example(examples, report, dropped, prompt + response, [IGNORE_INDEX] * len(prompt) + response,
                    max_length, "prompt longer than data.max_length")
    report.dropped = dict(dropped)
    report.examples = len(examples)
    if not examples:
        raise UserError(f"no usable rows in {rows[0].where.rsplit(':', 1)[0]}: every prompt is longer than "
                        f"data.max_length={max_length}; raise data.max_length")
    return examples, report


def add_example(examples: List[Example], report: DataReport, dropped: Counter, ids: List[int], targets: List[int],
                max_length: int, reason: str) -> None:
    """Cut a row at max_length (counted as truncated); a row left with nothing to train on is dropped and
    counted under `reason` (targets[0] never trains: a causal LM predicts each token from those before it)."""
    if len(ids) > max_length:
        report.truncated += 1
        ids, targets = ids[:max_length], targets[:max_length]
    if all(t == IGNORE_INDEX for t in targets[1:]):
        dropped[reason] += 1
        return
    examples.append(Example(ids, targets))
    report.tokens += len(ids)
    report.trained_tokens += sum(t != IGNORE_INDEX for t in targets[1:])


# ---------------------------------------------------------------- plain text (continued pretraining)

def encode_text(rows: Sequence[Row], tokenizer, max_length: int) -> tuple:
    """Every token is a target. A document longer than max_length becomes consecutive max_length pieces
    (nothing is thrown away); a last piece of a single token has nothing to predict and is left out."""
    eos: Optional[int] = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    report = DataReport(rows=len(rows))
    examples = []
    for row in rows:
        ids = tokenizer(str(row.fields["text"]), add_special_tokens=True)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]  # the end of a document is learned too
        pieces = [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
        pieces = [p for p in pieces if len(p) >= 2]
        if len(pieces) > 1:
            report.split += 1
        for piece in pieces:
            examples.append(Example(piece, list(piece)))
            report.tokens += len(piece)
            report.trained_tokens += len(piece)
    report.examples = len(examples)
    if not examples:
        raise UserError(f"no usable rows in {_file_of(rows)}: every text is empty after tokenization")
    return examples, report


# ---------------------------------------------------------------- chat (ShareGPT / OpenAI messages)

def chat_messages(row: Row) -> List[Dict[str, str]]:
    """The row's turns as [{"role", "content"}], roles normalised (ShareGPT human/gpt → user/assistant).
    In a CSV file the cell may hold the list as JSON text. A malformed row is an error naming file:line."""
    key = next((k for k in CHAT_FIELDS if k in row.fields), None)
    if key is None:
        raise UserError(f"{row.where}: missing field 'messages' (or 'conversations') required by data.format=chat")
    turns = row.fields[key]
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise UserError(f"{row.where}: field {key!r} is text but not a JSON list of turns ({err.msg})")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{row.where}: field {key!r} must be a non-empty list of turns, got {turns!r:.80}")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{row.where}: {key}[{number}] must be an object, got {turn!r:.80}")
        role_key, content_key = ("role", "content") if "role" in turn or "content" in turn else ("from", "value")
        role, content = turn.get(role_key), turn.get(content_key)
        if role is None or content is None:
            raise UserError(f"{row.where}: {key}[{number}] needs 'role' and 'content' (OpenAI) or 'from' and "
                            f"'value' (ShareGPT); it has {sorted(turn)}")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise UserError(f"{row.where}: {key}[{number}] has role {role!r}; allowed: "
                            f"{', '.join(sorted(ROLES))}")
        if not isinstance(content, str):
            raise UserError(f"{row.where}: {key}[{number}] content must be text, got {type(content).__name__}")
        messages.append({"role": ROLES[role.lower()], "content": content})
    return messages


def chat_template_for(tokenizer, name: str) -> str:
    """data.chat_template → the Jinja template: "auto" is the tokenizer's own, else ChatML."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        return own or CHATML_TEMPLATE
    if name == "chatml":
        return CHATML_TEMPLATE
    return name  # a Jinja template given in the config


def render_chat(tokenizer, messages: List[Dict[str, str]], template: str, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: List[Dict[str, str]], template: str, where: str = "") -> tuple:
    """The rendered conversation and the character spans of its assistant turns.

    Each assistant turn is found by rendering prefixes: the text up to and including the generation prompt
    before turn i (render(messages[:i], add_generation_prompt=True)) ends where the turn starts, and
    render(messages[:i + 1]) ends where it ends (trailing whitespace not included: the end-of-turn marker is
    learned, the newline after it is not). Needs a template whose renderings of prefixes are prefixes of the
    whole; one that rewrites earlier turns (e.g. drops past reasoning) is refused with advice.
    """
    try:
        full = render_chat(tokenizer, messages, template)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render_chat(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
            through = render_chat(tokenizer, messages[: i + 1], template)
            if i and not through.startswith(before):
                # some templates open the generation prompt differently from a finished turn (rare): fall back
                # to the end of the previous turn, so that the role header is (wrongly but harmlessly) trained
                before = render_chat(tokenizer, messages[:i], template)
            if not (full.startswith(through) and through.startswith(before)):
                raise UserError(f"{where}: the chat template renders earlier turns differently once later turns "
                                "follow, so assistant turns cannot be located; set data.chat_template=chatml")
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
    except UserError:
        raise
    except Exception as err:  # jinja2's TemplateError, or raise_exception() inside the template
        raise UserError(f"{where}: the chat template failed on this conversation ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); fix the row or set data.chat_template")
    return full, spans


def encode_chat(rows: Sequence[Row], tokenizer, max_length: int, template: str) -> tuple:
    """Targets are the tokens that start inside an assistant turn; all other positions are IGNORE_INDEX.

    A template that writes the start token itself ({{ bos_token }}, as Llama's and Mistral's do) is tokenized
    without adding special tokens; otherwise (ChatML, Qwen's) the tokenizer adds its usual start token, if it
    has one, as for alpaca prompts, and the closing [SEP] of BERT-style tokenizers is dropped.
    """
    start_token = tokenizer.bos_token or tokenizer.cls_token
    report = DataReport(rows=len(rows))
    examples = []
    dropped: Counter = Counter()
    for row in rows:
        messages = chat_messages(row)
        if not any(m["role"] == "assistant" for m in messages):
            dropped["no assistant turn"] += 1
            continue
        text, spans = assistant_spans(tokenizer, messages, template, row.where)
        if not spans:
            dropped["only empty assistant turns"] += 1
            continue
        add_special = not (start_token and text.startswith(start_token))
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if add_special and tokenizer.sep_token_id is not None and ids and ids[-1] == tokenizer.sep_token_id:
            ids, offsets = ids[:-1], offsets[:-1]
        targets = [token if end > start and any(s <= start < e for s, e in spans) else IGNORE_INDEX
                   for token, (start, end) in zip(ids, offsets)]
        add_example(examples, report, dropped, ids, targets, max_length, "assistant turns beyond data.max_length")
    report.dropped = dict(dropped)
    report.examples = len(examples)
    if not examples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        raise UserError(f"no usable rows in {_file_of(rows)} ({reasons}); check the data or raise data.max_length")
    return examples, report


def _file_of(rows: Sequence[Row]) -> str:
    return rows[0].where.rsplit(":", 1)[0] if rows else "the data"
