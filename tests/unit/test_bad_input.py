"""Bad input never gives a traceback or a half result: one line on stderr naming what is wrong, where and
what to do, exit code 2, and nothing in the run directory that could pass for a result.

The CLI runs in-process (one import of torch for all cases); the cases pass dry_run=true with a CPU-only
sizing (except the one checked only before a real run), so a case that wrongly got through would write
plan.json or metrics.json, which the test forbids.
"""

from __future__ import annotations

import runpy
import sys

import pytest

RESULT_FILES = ("plan.json", "metrics.json", "export", "checkpoints", "progress.json", "rayjob.yaml")


def jsonl(*lines: str) -> dict:
    return {"train.jsonl": "\n".join(lines) + "\n"}


GOOD = '{"text": "We may end your account at any time.", "label": "termination"}'
GOOD2 = '{"text": "Disputes go to arbitration.", "label": "arbitration"}'

# (case id, overrides, files written into the data directory (data.path points at it), message start)
CASES = [
    ("unknown key", ["model.foo=1"], None, "model.foo: no such key; allowed keys here: allow_download"),
    ("misspelt key", ["trainer.max_step=3"], None,
     "trainer.max_step: no such key; allowed keys here: async_checkpoint, checkpoint_every"),
    ("wrong type", ["trainer.max_steps=abc"], None, "trainer.max_steps=abc is not allowed: expected integer"),
    ("not a boolean", ["trainer.async_checkpoint=maybe"], None,
     "trainer.async_checkpoint=maybe is not allowed: expected true or false"),
    ("bad enum", ["logger.mode=loud"], None,
     "logger.mode=loud is not allowed: expected one of online, offline, disabled"),
    ("unknown strategy", ["strategy=bogus"], None, "strategy=bogus is not allowed: expected one of auto, full"),
    ("unknown experiment", ["+experiment=nope"], None,
     "experiment=nope is not allowed: available options: gemma2_2b_full"),
    ("zero steps", ["trainer.max_steps=0"], None, "trainer.max_steps=0 is not allowed: an integer >= 1"),
    ("negative lr", ["optim.lr=-1"], None, "optim.lr=-1.0 is not allowed: a number > 0"),
    ("lora rank 0", ["strategy=lora", "peft.rank=0"], None, "peft.rank=0 is not allowed: an integer >= 1"),
    ("freeze beyond layers", ["model.freeze_depth=9"], None,
     "model.freeze_depth=9 is not allowed: minilm has 6 layers (use 0..6)"),
    ("bad launcher", ["launcher=ssh"], None, "launcher=ssh is not allowed: expected one of local, rayjob"),
    ("missing model", ["model.path=/no/such/model"], None, "model.path=/no/such/model does not exist"),
    ("missing dataset", ["data.path=/no/such/file.jsonl"], None, "data.path=/no/such/file.jsonl does not exist"),
    ("unknown sample set", ["data.path=sample:nope"], None, "data.path=sample:nope: no such sample set"),
    ("missing resume", ["resume=/no/such/checkpoint"], None, "resume=/no/such/checkpoint does not exist"),
    ("batch not divisible", ["trainer.global_batch_size=33", "trainer.micro_batch_size=8"], None,
     "trainer.global_batch_size=33 is not allowed: it must be a multiple of workers x micro-batch = 2 x 8 = 16"),
    ("qlora without gpu", ["strategy=qlora"], None, "strategy=qlora needs a GPU"),
    ("prompt tuning a last-token classifier", ["model=tiny_llama", "model.task=classification", "strategy=prompt"],
     None, "strategy=prompt is not allowed for classification with builtin:tiny-llama (LlamaForSequenceClassification "
     "pools its last real token"),
    ("task mismatch", ["model=tiny_llama"], None,
     "data.path=sample:legal_clauses holds classification data, which needs model.task=classification"),
    ("malformed jsonl", [], jsonl(GOOD, '{"text": "oops", "label": '), "{data}/train.jsonl:2: not valid JSON"),
    ("row not an object", [], jsonl(GOOD, '["a", "b"]'), "{data}/train.jsonl:2: expected a JSON object, got list"),
    ("missing field", [], jsonl(GOOD, GOOD2, '{"text": "no label here"}'),
     "{data}/train.jsonl:3: missing field 'label' required by data.format=classification"),
    ("empty text", [], jsonl(GOOD, '{"text": "   ", "label": "termination"}'),
     "{data}/train.jsonl:2: field 'text' must be non-empty text"),
    ("unseen validation label", [], {**jsonl(GOOD, GOOD2), "validation.jsonl": '{"text": "x", "label": "venue"}\n'},
     "{data}/validation.jsonl:1: label 'venue' never occurs in the training data"),
    ("non-utf8 bytes", [], {"train.jsonl": GOOD.encode() + b'\n{"text": "caf\xe9", "label": "a"}\n'},
     "{data}/train.jsonl: not valid UTF-8"),
    ("csv extra cells", [], {"train.csv": "text,label\nfine clause,a\nbad,clause,b\n"},
     "{data}/train.csv:3: more values than the header has columns"),
    ("empty file", [], {"train.jsonl": "\n"}, "{data}/train.jsonl: the file has no rows"),
    ("over-long rows with overlong=fail", ["data.overlong=fail", "data.max_length=8", "dry_run=false"],
     jsonl(GOOD, GOOD2, GOOD, GOOD2), "data.path={data}: 1 train and 1 validation rows are longer than "
     "data.max_length=8 tokens; raise data.max_length, or set data.overlong=truncate"),
    ("too few rows", [], jsonl(GOOD), "data.path={data}: 1 rows are too few to hold out a validation split"),
    ("unknown fields", ["data.format=auto"],
     jsonl('{"question": "q", "answer": "a"}', '{"question": "r", "answer": "b"}'),
     "{data}/train.jsonl:1: cannot tell the data format from fields ['answer', 'question']"),
]


def run_cli(args, monkeypatch, capsys):
    """`python -m orchestrator ARGS`, in this process (as __main__, so Hydra finds hydra_conf as the CLI does)."""
    monkeypatch.setattr(sys, "argv", ["orchestrator", *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,files,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_no_result(overrides, files, message, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    if files:
        data.mkdir()
        for name, content in files.items():
            (data / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        overrides = [f"data.path={data}", "data.validation_fraction=0.5", *overrides]
    run_dir = tmp_path / "run"
    if not any(o.startswith("dry_run=") for o in overrides):
        overrides = [*overrides, "dry_run=true", "cluster.gpus=0"]
    code, stderr = run_cli([*overrides, "logger.mode=disabled",
                            f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    assert code == 2, stderr
    assert stderr.startswith(f"error: {message.format(data=data)}"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert not written & set(RESULT_FILES), written


def test_the_table_is_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_prompt_tuning_an_encoder_classifier_is_allowed():
    """BERT pools its first token, which prompt tuning leaves in place: only last-token classifiers are refused."""
    from orchestrator.config import ModelConfig, Strategy, Task
    from orchestrator.model import check_prompt_pooling

    check_prompt_pooling(ModelConfig(path="minilm", task=Task.classification), {"model_type": "bert"}, Strategy.prompt)
    check_prompt_pooling(ModelConfig(path="x", task=Task.classification), {"model_type": "llama"}, Strategy.prefix)
