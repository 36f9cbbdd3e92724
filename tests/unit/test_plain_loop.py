"""bench/plain_loop.py (issue 13's baseline) on 40 bundled sample rows for one epoch at max_length 32: result.json
has its fields, the export loads and orchestrator.predict --score scores it as the loop did; bench/quality_summary.py
tabulates result files by group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import predict

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "orchestrator" / "data" / "samples" / "legal_clauses"
TRAIN_ROWS, MAX_LENGTH, EVAL_KNOWN = 40, 32, 32  # EVAL_KNOWN: a multiple of the eval batch (16)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One run: train on the sample's first 40 rows; eval on 32 rows of labels seen there, then every row of a label
    that is not (scored as wrong and listed)."""
    directory = tmp_path_factory.mktemp("plain-loop")
    train = read_jsonl(SAMPLES / "train.jsonl")
    seen = {row["label"] for row in train[:TRAIN_ROWS]}
    validation = read_jsonl(SAMPLES / "validation.jsonl")
    known = [row for row in validation if row["label"] in seen][:EVAL_KNOWN]
    unseen = [row for row in validation if row["label"] not in seen]
    assert len(known) == EVAL_KNOWN and unseen, "the bundled sample changed: pick other rows"
    for name, rows in (("eval.jsonl", known + unseen), ("known.jsonl", known)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = directory / "out"
    command = [sys.executable, str(ROOT / "bench" / "plain_loop.py"), "--train", str(SAMPLES / "train.jsonl"),
               "--eval", str(directory / "eval.jsonl"), "--seed", "0", "--out", str(out), "--device", "cpu",
               "--epochs", "1", "--limit", str(TRAIN_ROWS), "--max-length", str(MAX_LENGTH), "--threads", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"dir": directory, "out": out, "result": json.loads((out / "result.json").read_text()),
            "known": known, "unseen": unseen, "seen": sorted(seen)}


def test_result_has_the_fields(run):
    result = run["result"]
    for key in ("accuracy", "macro_f1", "seed", "epochs", "per_class_f1", "eval_labels_not_in_train",
                "wall_seconds", "timing", "recipe", "data", "environment", "export"):
        assert key in result, key
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    assert result["seed"] == 0 and result["wall_seconds"] > 0
    [epoch] = result["epochs"]
    assert epoch["epoch"] == 1 and epoch["steps"] == 3  # ceil(40 / 16): the last, shorter batch is kept
    assert (epoch["accuracy"], epoch["macro_f1"]) == (result["accuracy"], result["macro_f1"])
    assert epoch["train_loss"] > 0
    recipe = result["recipe"]
    assert recipe["labels"] == run["seen"] and recipe["num_labels"] == len(run["seen"])
    assert (recipe["lr"], recipe["batch_size"], recipe["epochs"], recipe["max_length"]) == (1e-4, 16, 1, MAX_LENGTH)
    assert recipe["grad_clip"] is None and recipe["warmup"] == 0 and recipe["schedule"] == "constant"
    counts = result["data"]["train_label_counts"]
    n, k = sum(counts.values()), len(counts)
    for name, weight in recipe["class_weights"].items():
        assert weight == pytest.approx((n / (k * counts[name])) ** 0.5)
    assert result["data"]["train_rows"] == TRAIN_ROWS and result["data"]["eval_rows"] == EVAL_KNOWN + len(run["unseen"])
    assert result["eval_labels_not_in_train"] == sorted({row["label"] for row in run["unseen"]})
    assert result["timing"]["steps"] == 3 and result["timing"]["seconds_per_step"] > 0
    env = result["environment"]
    assert env["device"] == "cpu" and env["threads"] == 2 and env["torch"]


def test_export_loads_and_predict_scores_it_alike(run, capsys):
    export = run["out"] / "export"
    config = json.loads((export / "config.json").read_text())
    assert sorted(config["id2label"].values()) == run["seen"]
    assert (export / "model.safetensors").is_file() and (export / "tokenizer_config.json").is_file()
    code = predict.main([str(export), "--input", str(run["dir"] / "known.jsonl"), "--score",
                         "--max-length", str(MAX_LENGTH), "--output", str(run["dir"] / "predictions.jsonl")])
    assert code == 0
    scored = capsys.readouterr().err.split("rows: ", 1)[1].splitlines()[0]
    # the loop's eval rows are the known ones in the same batches, then the unseen ones, all wrong
    correct = json.loads(scored)["accuracy"] * EVAL_KNOWN
    assert correct == pytest.approx(run["result"]["accuracy"] * (EVAL_KNOWN + len(run["unseen"])))


def test_quality_summary_groups(run, tmp_path):
    for name, seed, f1 in (("plain-seed1", 1, 0.5), ("other/seed0", 0, 0.25)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "result.json").write_text(json.dumps({"accuracy": 0.75, "macro_f1": f1, "seed": seed}))
    (tmp_path / "plain-seed0").mkdir()
    (tmp_path / "plain-seed0" / "result.json").write_text((run["out"] / "result.json").read_text())
    command = [sys.executable, str(ROOT / "bench" / "quality_summary.py"), str(tmp_path / "*" / "result.json"),
               f"labelled={tmp_path}/other/*/result.json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| group")}
    assert set(rows) == {"plain", "labelled"}
    assert rows["plain"][1:3] == ["2", "0, 1"]
    f1s = [run["result"]["macro_f1"], 0.5]
    assert rows["plain"][3] == f"{sum(f1s) / 2:.3f}" and rows["plain"][5] == f"{min(f1s):.3f}"
    assert rows["labelled"][1] == "1" and rows["labelled"][4] == "–"
