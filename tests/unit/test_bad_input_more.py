"""More bad input, each caught before anything starts: one line on stderr, exit code 2, no traceback, nothing in the
run directory that could pass for a result (issue 14). Data that cannot train the task (one class, no validation
rows), a model that cannot take the data (data.max_length beyond its positions, config overrides that make no
model), CSV header problems named at the header, Kubernetes values Kubernetes would reject (launcher=rayjob), a
sweep of invalid trials, and `orchestrator.predict` on incomplete or damaged exports and unscorable rows.

The table runs the CLI in-process as tests/unit/test_bad_input.py does (dry_run=true with a CPU-only sizing, so
no Ray starts; the few cases caught only before a real run say dry_run=false and fail before Ray would start).
test_a_sample_through_the_real_cli runs some of them as `python -m orchestrator` subprocesses.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_bad_input import RESULT_FILES, run_cli

ROOT = Path(__file__).resolve().parents[2]


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def clause(text: str, label) -> dict:
    return {"text": text, "label": label}


ONE_CLASS = jsonl(*(clause(f"We may end your account, case {i}.", "termination") for i in range(6)))
TWO_CLASSES = jsonl(*(clause(f"Clause {i} of the terms.", "ab"[i % 2]) for i in range(6)))
CHAT_NO_ASSISTANT = jsonl(*({"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(4)))
LONG_PROMPTS = jsonl(*({"instruction": "explain " * 60, "output": "ok"} for i in range(4)))

# (case id, overrides ({data} is the data directory), files written into it, message start ({data} formatted)).
# data.path={data} and data.validation_fraction=0.5 are added where files are given, unless data.path is set.
CASES = [
    # ---- data that cannot train the task (these trained a meaningless model with perfect scores before)
    ("one class only", [], {"train.jsonl": ONE_CLASS},
     "data.path={data}: every training row has the label 'termination'; a classifier needs rows of at least two"),
    ("one class in train and validation files", [],
     {"train.jsonl": ONE_CLASS, "validation.jsonl": jsonl(clause("End.", "termination"))},
     "data.path={data}: every training row has the label 'termination'"),
    ("one class in a mix", ["data.mix=[{{path:{data}/train.jsonl,weight:1}}]", "data.path=unused"],
     {"train.jsonl": ONE_CLASS}, "data.mix[0].path={data}/train.jsonl: every training row has the label"),
    ("every label a single row: empty validation split", [],
     {"train.jsonl": jsonl(clause("a b", "x"), clause("c d", "y"), clause("e f", "z"))},
     "data.path={data}: no row can be held out for validation: each of the 3 labels of its 3 rows has a single row"),
    ("no row has a label", ["data.format=classification"],
     {"train.jsonl": jsonl(*(clause(f"clause {i}", None) for i in range(4)))},
     "{data}/train.jsonl: none of its 2 rows has a 'label', which data.format=classification needs in every row"),
    ("labels absent, format detected as text", ["data.format=auto"],
     {"train.jsonl": jsonl(*({"text": f"clause {i}"} for i in range(4)))},
     "data.path={data} holds text data, which needs model.task=causal_lm, but model.task=classification"),
    ("every row empty text", [], {"train.jsonl": jsonl(*(clause(" ", "ab"[i % 2]) for i in range(4)))},
     "{data}/train.jsonl: none of its 2 rows has a 'text'"),
    ("no validation rows", ["data.max_validation_rows=0"], None,
     "data.max_validation_rows=0 is not allowed: an integer >= 1"),
    ("label only in the automatic validation split", [], None, None),  # see test_label_only_in_the_held_out_rows
    ("chat rows without an assistant turn", ["model=tiny_llama", "data.format=auto", "dry_run=false"],
     {"train.jsonl": CHAT_NO_ASSISTANT}, "no usable rows in {data}/train.jsonl (2 no assistant turn)"),
    ("every alpaca prompt beyond max_length",
     ["model=tiny_llama", "data.format=auto", "data.max_length=16", "dry_run=false"],
     {"train.jsonl": LONG_PROMPTS}, "no usable rows in {data}/train.jsonl: every prompt is longer than"),
    # ---- the model cannot take the data, or the overrides make no model
    ("max_length beyond the model's positions", ["data.max_length=1024"], None,
     "data.max_length=1024 is not allowed: minilm has positions for 512 tokens (max_position_embeddings)"),
    ("max_length beyond a causal LM's positions", ["model=tiny_llama", "data=legal_instructions",
                                                   "data.max_length=4096"], None,
     "data.max_length=4096 is not allowed: builtin:tiny-llama has positions for 512 tokens"),
    ("hidden size not a multiple of heads", ["+model.config_overrides.hidden_size=100"], None,
     "model.config_overrides: hidden_size=100 is not a multiple of num_attention_heads=12"),
    ("misspelt config override", ["+model.config_overrides.num_hiden_layers=2"], None,
     "model.config_overrides.num_hiden_layers is not allowed: BertConfig (minilm) has no such setting"),
    ("zero layers", ["+model.config_overrides.num_hidden_layers=0"], None,
     "model.config_overrides.num_hidden_layers=0 is not allowed: an integer >= 1"),
    ("unknown activation", ["+model.config_overrides.hidden_act=nope"], None,
     "model.config_overrides={{'hidden_act': 'nope'}} make no model of minilm: KeyError: 'nope'"),
    ("heads not a multiple of kv heads", ["model=tiny_llama", "data=legal_instructions",
                                          "+model.config_overrides.num_key_value_heads=3"], None,
     "model.config_overrides: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("adapter target that names no module", ["strategy=lora", "peft.target_modules=[query,nope]"], None,
     "peft.target_modules: 'nope' names no module of minilm (BertForSequenceClassification); its linear layers are "
     "named classifier, dense, key, query, value"),
    ("misspelt adapter target of a causal LM", ["model=tiny_llama", "data=legal_instructions", "strategy=lora",
                                                "peft.target_modules=[q_proj,v_projj]"], None,
     "peft.target_modules: 'v_projj' names no module of builtin:tiny-llama (LlamaForCausalLM)"),
    # ---- metrics that validation never reports (selection then never chose, and patience stopped the run early)
    ("unknown selection metric", ["trainer.select_metric=f1", "trainer.patience=2"], None,
     "trainer.select_metric='f1' is not allowed: auto, or a metric the validation of model.task=classification "
     "reports: loss, accuracy, macro_f1"),
    ("selection by generated answers without generation", ["model=tiny_llama", "data=legal_instructions",
                                                           "trainer.select_metric=rougeL",
                                                           "trainer.eval_generate_rows=0"], None,
     "trainer.select_metric='rougeL' is not allowed: auto, or a metric the validation of model.task=causal_lm "
     "reports: loss, perplexity"),
    ("unknown early-stopping metric", ["trainer.early_stopping=true", "trainer.early_stopping_metric=eval/lose"], None,
     "trainer.early_stopping_metric='eval/lose' is not allowed: a metric the validation of model.task="),
    ("early stopping in the wrong direction", ["trainer.early_stopping=true", "trainer.early_stopping_metric=macro_f1"],
     None, "trainer.early_stopping_mode='min' is not allowed: max for trainer.early_stopping_metric=macro_f1 "
           "(higher is better)"),
    # ---- files: problems named where they are (a CSV header's at the header)
    ("csv header lacks the label column", ["data.format=classification"],
     {"train.csv": "text,category\n" + "".join(f"clause {i},x\n" for i in range(4))},
     "{data}/train.csv:1 (the header): no column 'label', which data.format=classification needs; the header "
     "names ['category', 'text']"),
    ("csv header misnamed, format detected from it", ["data.format=auto"],
     {"train.csv": "text,labels\n" + "".join(f"clause {i},x\n" for i in range(4))},
     "data.path={data} holds text data (by the columns of its header, {data}/train.csv:1: ['labels', 'text'])"),
    ("csv header of unknown columns", ["data.format=auto"],
     {"train.csv": "question,answer\n" + "".join(f"q {i},a\n" for i in range(4))},
     "{data}/train.csv:1 (the header): cannot tell the data format from columns ['answer', 'question']"),
    ("csv without a header", ["data.format=classification"],
     {"train.csv": "".join(f"clause {i},{'ab'[i % 2]}\n" for i in range(5))},
     "{data}/train.csv:1 (the header): no column 'text', which data.format=classification needs"),
    ("csv column named twice", [], {"train.csv": "text,label,label\nclause,a,b\nclause,b,a\n"},
     "{data}/train.csv:1 (the header): column 'label' is named more than once"),
    ("csv column without a name", [], {"train.csv": "text,,label\nclause,x,a\nclause,y,b\n"},
     "{data}/train.csv:1 (the header): column 2 has no name"),
    ("csv header only", [], {"train.csv": "text,label\n"}, "{data}/train.csv: the file has no rows"),
    ("pretty-printed JSON", [], {"train.json": json.dumps([clause("a", "x"), clause("b", "y")], indent=1)},
     "{data}/train.json:1: not valid JSON (Expecting value); this looks like one JSON document over several lines"),
    ("JSON array on one line", [], {"train.jsonl": json.dumps([clause("a", "x"), clause("b", "y")]) + "\n"},
     "{data}/train.jsonl:1: expected a JSON object, got list: write one JSON object per line (JSON Lines)"),
    ("a list as label", [], {"train.jsonl": jsonl(clause("a", "x"), clause("b", "y"), clause("c", ["x"]),
                                                  clause("d", "y"))},
     "{data}/train.jsonl:3: field 'label' must be non-empty text, got ['x']"),
    ("directory without a train file", [], {"validation.jsonl": TWO_CLASSES},
     "data.path={data}: the directory has no train.jsonl or train.csv"),
    ("unsupported data file type", ["data.path={data}/train.txt"], {"train.txt": "text\n"},
     "{data}/train.txt: unsupported file type '.txt'"),
    ("missing validation file", ["data.validation_path=/no/such/validation.jsonl"], {"train.jsonl": TWO_CLASSES},
     "data file /no/such/validation.jsonl does not exist"),
    ("missing reference set", ["model=tiny_llama", "data=legal_instructions", "data.reference_path=/no/such.txt"],
     None, "data.reference_path=/no/such.txt does not exist"),
    ("model directory without config.json", ["model.path={data}"], {"notes.txt": "not a model"},
     "model.path={data}: the directory has no config.json"),
    ("mix of different label sets", ["data.mix=[{{path:{data}/a.jsonl,weight:1}},{{path:{data}/b.jsonl,weight:1}}]",
                                     "data.path=unused"],
     {"a.jsonl": TWO_CLASSES, "b.jsonl": jsonl(*(clause(f"c {i}", "cd"[i % 2]) for i in range(6)))},
     "data.mix[1].path={data}/b.jsonl has labels ['c', 'd'], but data.mix[0].path={data}/a.jsonl has ['a', 'b']"),
    # ---- launcher=rayjob: values Kubernetes would reject, refused at render time
    ("service account not DNS-1123", ["launcher=rayjob", "k8s.service_account=Ray_Pods"], None,
     "k8s.service_account=Ray_Pods is not allowed: a Kubernetes object name (DNS-1123"),
    ("claim name not DNS-1123", ["launcher=rayjob", "k8s.pvc=runs-"], None,
     "k8s.pvc=runs- is not allowed: a Kubernetes object name"),
    ("W&B secret not DNS-1123", ["launcher=rayjob", "k8s.wandb_secret=WandB"], None,
     "k8s.wandb_secret=WandB is not allowed"),
    ("HF secret too long", ["launcher=rayjob", f"k8s.hf_secret={'a' * 254}"], None,
     f"k8s.hf_secret={'a' * 254} is not allowed"),
    ("ttl beyond int32", ["launcher=rayjob", "k8s.ttl_seconds_after_finished=2147483648"], None,
     "k8s.ttl_seconds_after_finished=2147483648 is not allowed: at most 2147483647 (the RayJob's int32 field)"),
    ("backoff limit beyond int32", ["launcher=rayjob", "k8s.backoff_limit=99999999999"], None,
     "k8s.backoff_limit=99999999999 is not allowed: at most 2147483647"),
    ("deadline beyond int32", ["launcher=rayjob", "k8s.active_deadline_seconds=4294967296"], None,
     "k8s.active_deadline_seconds=4294967296 is not allowed: at most 2147483647"),
    ("name climbing out of the claim", ["launcher=rayjob", "name=../../etc"], None,
     "name=../../etc is not allowed with launcher=rayjob: the run directory is /mnt/runs/<name>/<job> on the claim"),
    ("name with a slash", ["launcher=rayjob", "name=team/run"], None,
     "name=team/run is not allowed with launcher=rayjob"),
    ("mount path with ..", ["launcher=rayjob", "k8s.mount_path=/mnt/runs/../etc"], None,
     "k8s.mount_path=/mnt/runs/../etc is not allowed: a normalised absolute path"),
]
CASES = [c for c in CASES if c[3] is not None]


def run_case(overrides, files, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in (files or {}).items():
        (data / name).write_text(content, encoding="utf-8")
    overrides = [o.format(data=data) for o in overrides]
    if files and not any(o.startswith("data.path=") for o in overrides):
        overrides = [f"data.path={data}", "data.validation_fraction=0.5", *overrides]
    if not any(o.startswith("dry_run=") for o in overrides):
        overrides = [*overrides, "dry_run=true", "cluster.gpus=0"]
    run_dir = tmp_path / "run"
    code, stderr = run_cli([*overrides, "logger.mode=disabled", f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    return code, stderr, data, run_dir


def assert_one_line_error(code, stderr, message):
    assert code == 2, stderr
    assert stderr.startswith(f"error: {message}"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("overrides,files,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_no_result(overrides, files, message, tmp_path, monkeypatch, capsys):
    code, stderr, data, run_dir = run_case(overrides, files, tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, stderr, message.format(data=data))
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert not written & set(RESULT_FILES), written


def test_two_classes_pass_where_one_class_fails(tmp_path, monkeypatch, capsys):
    """The guard is on the data, not on small data: the same rows with two labels plan (dry run, exit 0)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(TWO_CLASSES, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["orchestrator", f"data.path={data}", "data.validation_fraction=0.5",
                                      "dry_run=true", "cluster.gpus=0", "logger.mode=disabled",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    import runpy

    runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)  # no SystemExit: exit 0
    assert (tmp_path / "run" / "plan.json").is_file()


def test_label_only_in_the_held_out_rows():
    """The automatic split keeps every label a training row; should a label still end up only in the held-out
    rows, the message says it is the automatic split, not a validation file, that holds it."""
    from orchestrator.data.formats import label_names
    from orchestrator.data.readers import Row
    from orchestrator.errors import UserError

    train = [Row({"text": "a", "label": "x"}, "t.jsonl:1"), Row({"text": "b", "label": "y"}, "t.jsonl:2")]
    held = [Row({"text": "c", "label": "z"}, "t.jsonl:3")]
    with pytest.raises(UserError, match=r"^t.jsonl:3: label 'z' occurs only in the rows held out for validation "
                                        r"\(the automatic split, data.validation_fraction\)"):
        label_names(train, held, held_out=True)
    with pytest.raises(UserError, match=r"^t.jsonl:3: label 'z' never occurs in the training data"):
        label_names(train, held)


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    """Spreadsheets write a BOM: the first column is still "text", not "\\ufefftext" (which looked like a missing
    column before)."""
    from orchestrator.data.readers import read_rows

    path = tmp_path / "train.csv"
    path.write_bytes("\ufefftext,label\nclause,a\n".encode("utf-8"))
    assert read_rows(str(path))[0].fields == {"text": "clause", "label": "a"}


def test_rendering_refuses_what_kubernetes_would_reject(tmp_path):
    """render() itself checks (tests and tools call it without launch_rayjob)."""
    from launch.rayjob import check_k8s_values
    from orchestrator.config import RunConfig
    from orchestrator.errors import UserError

    run = RunConfig()
    check_k8s_values(run)  # the defaults are valid
    run.k8s.pvc = "a.b-c"
    check_k8s_values(run)  # a dotted DNS-1123 subdomain is valid
    run.k8s.backoff_limit = 2**31
    with pytest.raises(UserError, match=r"^k8s.backoff_limit=2147483648 is not allowed"):
        check_k8s_values(run)


# ---------------------------------------------------------------- a sweep whose trials are all invalid

def test_a_sweep_of_invalid_trials_is_one_clear_error(tmp_path):
    """Before: every trial failed composing, then the launcher asked a Ray that was never started for its resources
    (RaySystemError traceback). Now one line, exit 2, and no Ray."""
    result = subprocess.run([sys.executable, "-m", "orchestrator", "-m", "trainer.max_steps=0,-1",
                             "logger.mode=disabled", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("[")]  # Hydra's log lines
    assert lines == [f"error: every trial of the sweep is invalid (2 of 2; each one's error is in its trial.json "
                     f"under {tmp_path / 'sweep'}); trial 0: trainer.max_steps=0 is not allowed: an integer >= 1, "
                     "or null (trainer.epochs decides)"], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert json.loads((tmp_path / "sweep" / "1" / "trial.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt during the run → exit code 130 and one line naming the newest complete checkpoint and the
    command that resumes from it (the checkpoint being written when Ctrl-C came is incomplete and not named)."""
    import launch.local
    import orchestrator.preflight
    from orchestrator.checkpoint import MARKER_DIR

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator.preflight, "preflight", lambda *a, **k: type("P", (), {"plan": None})())
    monkeypatch.setattr(launch.local, "run_training", interrupted)
    run_dir = tmp_path / "run"
    storage = run_dir / "checkpoints" / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        checkpoint = storage / f"checkpoint_{step}"
        (checkpoint / MARKER_DIR).mkdir(parents=True)
        (checkpoint / "weights.bin").write_bytes(b"x" * step)
        if complete:
            (checkpoint / MARKER_DIR / "rank_0.json").write_text(json.dumps(
                {"rank": 0, "world_size": 1, "step": step, "files": {"weights.bin": step}}))
    code, stderr = run_cli(["trainer.max_steps=8", "logger.mode=disabled", f"hydra.run.dir={run_dir}"],
                           monkeypatch, capsys)
    assert code == 130, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted: kept the last complete checkpoint, step 4, at {storage / 'checkpoint_4'}; resume with: "
        f"python -m orchestrator trainer.max_steps=8 logger.mode=disabled resume={storage / 'checkpoint_4'}"]


def test_ctrl_c_inside_ray_trains_fit_is_a_keyboard_interrupt():
    """Ray Train's fit() installs its own SIGINT handler, which aborts the workers and raises SystemExit(0): the run
    would have ended with exit code 0. launch/local.py notes the signal and raises KeyboardInterrupt instead."""
    import signal

    from launch.local import fit, interrupt_noting

    class LikeRayTrain:  # what TorchTrainer.fit does with SIGINT (ray/train/v2/api/data_parallel_trainer.py)
        def _register_sigint_handler(self, controller):
            signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(0))

        def fit(self):
            self._register_sigint_handler(None)
            signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C while training
            return "finished"

    class Finishes(LikeRayTrain):
        def fit(self):
            self._register_sigint_handler(None)
            return "finished"

    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(interrupt_noting(LikeRayTrain)())
        assert fit(interrupt_noting(Finishes)()) == "finished"
        with pytest.raises(SystemExit):  # a SystemExit without a Ctrl-C is not turned into one
            fit(type("Exits", (), {"fit": lambda self: sys.exit(3)})())
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ray_train_still_registers_its_sigint_handler_where_we_hook_in():
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))


def test_ctrl_c_before_any_checkpoint(tmp_path, monkeypatch, capsys):
    import launch.local
    import orchestrator.preflight

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrator.preflight, "preflight", lambda *a, **k: type("P", (), {"plan": None})())
    monkeypatch.setattr(launch.local, "run_training", interrupted)
    code, stderr = run_cli(["logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 130
    assert stderr.strip().splitlines() == ["interrupted: no checkpoint was complete yet, nothing was kept; run the "
                                           "command again to start over"]


# ---------------------------------------------------------------- predict: complete exports, scorable rows, output

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A complete tiny classifier export (config, safetensors weights, the bundled WordPiece tokenizer)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from orchestrator.config import ModelConfig
    from orchestrator.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path="minilm"))
    directory = tmp_path_factory.mktemp("export")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1},
                        architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def damaged_copy(export_dir: Path, tmp_path: Path, damage: str) -> Path:
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    weights = copy / "model.safetensors"
    if damage == "no tokenizer":
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (copy / name).unlink(missing_ok=True)
    elif damage == "no vocabulary":
        (copy / "tokenizer.json").unlink()
        (copy / "vocab.txt").unlink(missing_ok=True)
    elif damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "weights with extra bytes":
        weights.write_bytes(weights.read_bytes() + b"\0" * 10)
    elif damage == "weights not safetensors":
        weights.write_bytes(b"PK\x03\x04 a zip file, not safetensors")
    elif damage == "header truncated":
        header_length = struct.unpack("<Q", weights.read_bytes()[:8])[0]
        weights.write_bytes(weights.read_bytes()[: 8 + header_length // 2])
    elif damage == "missing shard":
        os.rename(weights, copy / "model-00001-of-00002.safetensors")
        (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return copy


@pytest.mark.parametrize("damage,message", [
    ("no tokenizer", "{export}: incomplete export, missing tokenizer_config.json; the tokenizer's vocabulary (one of "
                     "tokenizer.json, vocab.txt"),
    ("no vocabulary", "{export}: incomplete export, missing the tokenizer's vocabulary"),
    ("no weights", "{export}: incomplete export, missing model.safetensors (the weights; predict loads safetensors"),
    ("missing shard", "{export}: incomplete export, missing model-00002-of-00002.safetensors"),
    ("truncated weights", "{export}/model.safetensors: truncated, "),
    ("header truncated", "{export}/model.safetensors: not a valid safetensors file"),
    ("weights with extra bytes", "{export}/model.safetensors: 10 bytes more than its header describes"),
    ("weights not safetensors", "{export}/model.safetensors: not a valid safetensors file"),
])
def test_predict_refuses_an_incomplete_or_damaged_export(damage, message, export_dir, tmp_path, capsys):
    """Before: without tokenizer files transformers built an empty tokenizer and predict wrote garbage with exit 0;
    a truncated weights file ended in a safetensors traceback."""
    from orchestrator.predict import main

    export = damaged_copy(export_dir, tmp_path, damage)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(jsonl({"text": "We may end your account."}))
    output = tmp_path / "out.jsonl"
    assert main([str(export), "--input", str(rows), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err, message.format(export=export))
    assert not output.exists()


@pytest.mark.parametrize("args,rows,message", [
    (["--score"], [{"text": "a"}, {"text": "b"}],
     "--score: none of the 2 rows of {rows} has a 'label' to score against; add labels or leave out --score"),
    (["--score"], [{"text": "a", "label": ""}], "--score: none of the 1 rows of {rows} has a 'label'"),
    (["--output", "{tmp}"], [{"text": "a"}], "--output {tmp} is a directory; give a file name"),
    (["--output", "{tmp}/rows.jsonl/out.jsonl"], [{"text": "a"}],
     "--output {tmp}/rows.jsonl/out.jsonl: cannot create its directory {tmp}/rows.jsonl"),
    (["--batch-size", "0"], [{"text": "a"}], "--max-new-tokens and --batch-size must be >= 1"),
    ([], [{"sentence": "a"}], "{rows}:1: a classification export needs a non-empty 'text' field per row"),
])
def test_predict_bad_arguments(args, rows, message, export_dir, tmp_path, capsys):
    from orchestrator.predict import main

    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(*rows))
    args = [a.format(tmp=tmp_path) for a in args]
    assert main([str(export_dir), "--input", str(path), *args]) == 2
    assert_one_line_error(2, capsys.readouterr().err, message.format(rows=path, tmp=tmp_path))


def test_predict_score_on_unlabelled_rows_of_a_causal_export(tiny_llama_dir, tmp_path, capsys):
    from orchestrator.predict import main

    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl({"instruction": "Summarise."}, {"messages": [{"role": "user", "content": "hi"}]}))
    assert main([str(tiny_llama_dir), "--input", str(path), "--score"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, f"--score: none of the 2 rows of {path} carries an answer")


def test_predict_creates_the_output_directory(export_dir, tmp_path, capsys):
    """--output into a directory that does not exist yet: created, as a run creates its run directory."""
    from orchestrator.predict import main

    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl({"text": "a", "label": "a"}, {"text": "b"}))
    output = tmp_path / "new" / "deeper" / "out.jsonl"
    assert main([str(export_dir), "--input", str(path), "--output", str(output), "--score"]) == 0
    assert [json.loads(line)["prediction"] in ("a", "b") for line in output.read_text().splitlines()] == [True, True]
    assert "scored 1 of 2 rows" in capsys.readouterr().err


def test_predict_loads_a_complete_export(export_dir):
    from orchestrator.predict import Predictor, check_export

    check_export(str(export_dir))
    assert Predictor(str(export_dir), device="cpu").tokenizer.vocab_size > 1000


# ---------------------------------------------------------------- the real CLI, for a sample

SAMPLE = ["one class only", "every label a single row: empty validation split", "max_length beyond the model's "
          "positions", "hidden size not a multiple of heads", "csv header lacks the label column",
          "name climbing out of the claim", "ttl beyond int32"]


def test_a_sample_through_the_real_cli(tmp_path):
    """`python -m orchestrator ... dry_run=true cluster.gpus=0` as a user runs it (no Ray starts in a dry run sized
    for cluster.gpus): exit code 2, one line on stderr, no traceback, for a sample of the table."""
    cases = {c[0]: c for c in CASES}
    for number, name in enumerate(SAMPLE):
        _, overrides, files, message = cases[name]
        data = tmp_path / f"data{number}"
        data.mkdir()
        for file, content in (files or {}).items():
            (data / file).write_text(content, encoding="utf-8")
        args = [o.format(data=data) for o in overrides]
        if files:
            args = [f"data.path={data}", "data.validation_fraction=0.5", *args]
        result = subprocess.run([sys.executable, "-m", "orchestrator", *args, "dry_run=true", "cluster.gpus=0",
                                 "logger.mode=disabled", f"hydra.run.dir={tmp_path / f'run{number}'}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert_one_line_error(result.returncode, result.stderr, message.format(data=data))
        assert "Traceback" not in result.stdout


def test_the_table_is_at_least_thirty_cases():
    assert len(CASES) >= 30  # and 15 predict cases, the sweep, and Ctrl-C's exit code 130 beside it
