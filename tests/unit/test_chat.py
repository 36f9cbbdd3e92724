"""`orchestrator chat EXPORT` and `orchestrator predict` (issue 17), on the tests' tiny causal export (the tiny Llama
of tests/conftest.py with the bundled WordPiece tokenizer: no chat template) and a copy of it given one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.chat import Chat, main
from orchestrator.data.formats import CHATML_TEMPLATE
from orchestrator.data.readers import Row
from orchestrator.predict import Predictor

CONSOLE_SCRIPT = Path(sys.executable).parent / "orchestrator"
ENV = {**os.environ, "WANDB_MODE": "disabled"}
QUESTION = "Can the provider end my account at any time?"


def expected(export_dir, fields, tokens):
    """What predict's greedy generation gives for the same prompt: the oracle for chat's answers."""
    return next(Predictor(str(export_dir)).predict([Row(fields, "input")], max_new_tokens=tokens))["prediction"]


@pytest.fixture(scope="module")
def templated_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny export with a ChatML chat template in its tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("templated") / "export"
    shutil.copytree(tiny_llama_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_chat_once_answers_with_the_tiny_model_through_the_cli(tiny_llama_dir):
    result = subprocess.run([str(CONSOLE_SCRIPT), "chat", str(tiny_llama_dir), "--once", QUESTION,
                             "--max-new-tokens", "6"], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = expected(tiny_llama_dir, {"text": QUESTION}, 6)  # no chat template: the text itself, continued
    assert answer and result.stdout == answer + "\n"


def test_chat_uses_the_exports_chat_template_and_keeps_the_conversation(templated_dir, capsys):
    assert main([str(templated_dir), "--once", QUESTION, "--max-new-tokens", "6"]) == 0
    first = expected(templated_dir, {"messages": [{"role": "user", "content": QUESTION}]}, 6)
    assert capsys.readouterr().out == first + "\n"

    chat = Chat(str(templated_dir), max_new_tokens=6)
    assert chat.templated and chat.reply(QUESTION) == first
    second = chat.reply("And without notice?")
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And without notice?"}]
    assert second == expected(templated_dir, {"messages": history}, 6)
    assert len(chat.messages) == 4
    chat.reset()
    assert chat.reply(QUESTION) == first


def test_chat_interactive_reads_turns_until_exit(tiny_llama_dir):
    result = subprocess.run([str(CONSOLE_SCRIPT), "chat", str(tiny_llama_dir), "--max-new-tokens", "4"],
                            input="hello\n/reset\n/exit\n", env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "plain text (it has no chat template)" in " ".join(result.stdout.split())  # rich wraps at 80
    assert result.stdout.count("model: ") == 1 and "(conversation reset)" in result.stdout


def test_chat_refuses_what_it_cannot_talk_to(tmp_path, capsys):
    from orchestrator.cli import run_command

    assert run_command("chat", [str(tmp_path / "nope"), "--once", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such export directory; give a run's " \
                                      "<run_dir>/export\n"


def test_predict_subcommand_is_the_module(tiny_llama_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Summarise the clause.", "input": QUESTION}) + "\n")
    args = [str(tiny_llama_dir), "--input", str(rows), "--max-new-tokens", "4"]
    sub = subprocess.run([str(CONSOLE_SCRIPT), "predict", *args], env=ENV, capture_output=True, text=True, timeout=300)
    module = subprocess.run([sys.executable, "-m", "orchestrator.predict", *args], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert sub.returncode == module.returncode == 0, sub.stderr + module.stderr
    assert sub.stdout == module.stdout and json.loads(sub.stdout)["prediction"]
