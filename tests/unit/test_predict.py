"""`python -m orchestrator.predict` and the export's model card, on tiny exports (no training): a classifier built
here and the tests' tiny Llama (tests/conftest.py), each saved as safetensors with the bundled WordPiece tokenizer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import DataConfig, ModelConfig, RunConfig, Task, config_dict
from orchestrator.data import encode_data, read_data
from orchestrator.data.formats import IGNORE_INDEX
from orchestrator.model import load_tokenizer
from orchestrator.model_card import write_model_card
from orchestrator.predict import Predictor, main

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["Arbitration", "Liability", "Other"]
CHAT = [{"role": "user", "content": "What does clause 4 say?"},
        {"role": "assistant", "content": "It limits liability."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path="minilm"))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("classifier")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label=dict(enumerate(LABELS)),
                        label2id={name: i for i, name in enumerate(LABELS)},
                        architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def causal_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir  # the tiny Llama with fixed random weights and the bundled tokenizer (tests/conftest.py)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_classification_predictions_are_the_models_argmax(classifier_dir, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    texts = ["We may terminate your account at any time.", "Disputes go to arbitration in Delaware.", "Hello."]
    source = write_jsonl(tmp_path / "rows.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out = tmp_path / "out.jsonl"
    assert main([str(classifier_dir), "--input", source, "--output", str(out), "--batch-size", "2"]) == 0
    results = read_jsonl(out)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        probabilities = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert [r["id"] for r in results] == [0, 1, 2] and [r["text"] for r in results] == texts
    assert [r["prediction"] for r in results] == [LABELS[i] for i in probabilities.argmax(-1).tolist()]
    assert [r["probability"] for r in results] == pytest.approx(probabilities.max(-1).values.tolist(), rel=1e-5)


def test_causal_predictions_for_alpaca_chat_and_text_rows(causal_dir, capsys, tmp_path):
    rows = [{"instruction": "Summarise the clause.", "input": "The seller is not liable.", "output": "No liability."},
            {"messages": CHAT}, {"conversations": [{"from": "human", "value": "Hi"}]}, {"text": "The lessee shall"}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main([str(causal_dir), "--input", source, "--max-new-tokens", "4"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 4
    assert results[0]["output"] == "No liability."  # input fields come back as they were
    assert all(isinstance(r["prediction"], str) for r in results)
    # greedy: the same prompt gives the same answer, and at most 4 new tokens
    predictor = Predictor(str(causal_dir))
    ids, _ = predictor.prompt_ids(rows[0])
    output = predictor.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert output.shape[1] - len(ids) <= 4
    expected = predictor.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
    assert results[0]["prediction"] == expected


@pytest.mark.parametrize("row", [
    {"instruction": "Summarise the clause.", "input": "The seller is not liable.", "output": "No liability."},
    {"messages": CHAT},
])
def test_prompt_is_exactly_the_untrained_part_of_the_training_example(causal_dir, tokenizer, tmp_path, row):
    """predict builds the prompt the way training masked it: the ids before the first trained token."""
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    raw = read_data(DataConfig(path=path, validation_path=path, cache=False), Task.causal_lm, 0)
    example = encode_data(raw, copy.deepcopy(tokenizer), 256).train[0]
    first_trained = next(i for i, t in enumerate(example.target) if t != IGNORE_INDEX)
    ids, _ = Predictor(str(causal_dir)).prompt_ids(row)
    assert ids == example.input_ids[:first_trained]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_missing_export_dir_is_one_line_and_exit_2(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    result = run_cli(str(tmp_path / "nowhere"), "--input", source)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such export directory; "
                                                  "give a run's <run_dir>/export"]


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', '{"text": "b"'], r"rows.jsonl:2: not valid JSON"),
    (['{"text": "a"}', '{"sentence": "b"}'], r"rows.jsonl:2: a classification export needs a non-empty 'text'"),
])
def test_malformed_input_is_one_line_and_exit_2(classifier_dir, tmp_path, capsys, lines, message):
    source = write_jsonl(tmp_path / "rows.jsonl", lines)
    assert main([str(classifier_dir), "--input", source]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and __import__("re").search(message, err)


def test_malformed_chat_row_for_a_causal_export(causal_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    assert main([str(causal_dir), "--input", source]) == 2
    assert "rows.jsonl:1: messages[0] has role 'wizard'" in capsys.readouterr().err


def test_directory_without_a_model_is_an_error(tmp_path, capsys):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    assert main([str(tmp_path), "--input", source]) == 2
    assert "no config.json" in capsys.readouterr().err


def run_config(task: Task, **data) -> dict:
    run = RunConfig()
    run.model.task = task
    run.name = "legal"
    run.optim.lr = 5e-5  # as the preflight resolves it (orchestrator/hyperparameters.py)
    for key, value in data.items():
        setattr(run.data, key, value)
    return config_dict(run)


def test_model_card_for_a_classifier(classifier_dir, tmp_path):
    import shutil

    export = tmp_path / "export"
    shutil.copytree(classifier_dir, export)
    metrics = {"eval/accuracy": 0.8125, "eval_before/accuracy": 0.25, "eval/loss": 0.5, "eval/confusion_matrix": [[1]],
               "train/loss_history": [1.0, 0.5]}
    path = write_model_card(str(export), run_config(Task.classification), metrics, strategy="full")
    text = Path(path).read_text(encoding="utf-8")
    front = text.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-classification" in front
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in front
    assert "| accuracy | 0.2500 | 0.8125 |" in text and "| loss | - | 0.5000 |" in text
    assert "confusion_matrix" not in text.split("<details>")[0]
    assert "Labels: `Arbitration`, `Liability`, `Other`." in text
    assert "python -m orchestrator.predict" in text and "vllm serve" not in text
    assert "learning rate | `5e-05`" in text
    assert not (export / "generation_config.json").exists()


def test_model_card_for_a_causal_lm_adds_generation_config_and_vllm(causal_dir, tmp_path):
    import shutil

    import yaml
    from transformers import GenerationConfig

    export = tmp_path / "export"
    shutil.copytree(causal_dir, export)
    (export / "generation_config.json").unlink(missing_ok=True)
    config = run_config(Task.causal_lm, path="sample:legal_instructions")
    config["model"]["path"] = "meta-llama/Llama-3.2-1B"
    text = Path(write_model_card(str(export), config, {"eval/perplexity": 12.5}, strategy="lora")).read_text()
    assert yaml.safe_load(text.split("---")[1])["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "vllm serve <this directory> --served-model-name legal" in text
    assert "| perplexity | - | 12.5000 |" in text and "LoRA rank / alpha | `16 / 32`" in text
    assert GenerationConfig.from_pretrained(export).eos_token_id == 102
    full_config = yaml.safe_load(text.split("```yaml")[1].split("```")[0])
    assert full_config["data"]["path"] == "sample:legal_instructions"


def test_score_classification_and_generation(classifier_dir, causal_dir, tmp_path, capsys):
    rows = [{"text": "We may terminate your account.", "label": "Liability"}, {"text": "Hello."}]
    out = tmp_path / "out.jsonl"
    assert main([str(classifier_dir), "--input", write_jsonl(tmp_path / "c.jsonl", rows), "--score",
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    first = read_jsonl(out)[0]
    accuracy = 1.0 if first["prediction"] == "Liability" else 0.0
    assert f'scored 1 of 2 rows: {{"accuracy": {accuracy}' in err

    rows = [{"instruction": "Summarise.", "input": "x", "output": "No liability."}, {"messages": CHAT},
            {"text": "no answer here"}]
    assert main([str(causal_dir), "--input", write_jsonl(tmp_path / "g.jsonl", rows), "--score",
                 "--max-new-tokens", "3", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scored 2 of 3 rows: " in err and '"rougeL"' in err and '"bleu"' in err
    assert "sample 2\n  prompt:" in err and "reference: It limits liability." in err
