"""`orchestrator --help` (issue 15): what the tool does, the main keys (each one a key of the schema), the
experiments, models, data sets, sweeps and strategies listed from the configs and the schema, and the README."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from orchestrator import cli_help
from orchestrator.config import RunConfig, Strategy
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def text() -> str:
    return cli_help.help_text()


def test_every_main_key_is_a_key_of_the_schema():
    schema = OmegaConf.structured(RunConfig)
    for key, line in cli_help.MAIN_KEYS:
        assert OmegaConf.select(schema, key, default="<missing>") != "<missing>", key
        assert line and "\n" not in line


def test_the_configs_and_strategies_available_are_all_listed(text):
    for group in ("experiment", "model", "data", "sweep"):
        names = sorted(p.stem for p in (ROOT / "hydra_conf" / group).glob("*.yaml"))
        assert names, group
        for name in names:
            assert f"\n  {name} " in text, (group, name)
    for strategy in Strategy:
        assert f"\n  {strategy.value} " in text
    assert "  lora          peft LoRA adapters on the frozen model" in text  # the schema's own comment


def test_the_help_says_what_the_tool_does_and_where_the_readme_is(text):
    assert text.startswith("orchestrator fine-tunes a language model")
    assert "usage: orchestrator [+experiment=NAME]" in text
    assert f"README: {ROOT / 'README.md'}" in text
    for key, _ in cli_help.MAIN_KEYS:
        assert f"\n  {key} " in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_a_config_file_is_described_by_its_first_sentence():
    assert cli_help.first_sentence("# @package _global_\n# Grid over lr: 8 trials. More here.\n#   python -m x\n"
                                   "key: 1\n") == "Grid over lr: 8 trials."
    assert cli_help.first_sentence("# Two lines\n# of prose, no stop\nkey: 1\n") == "Two lines of prose, no stop"


def test_cli_prints_our_help_without_composing(monkeypatch, capsys, text):
    import orchestrator.__main__ as entry

    monkeypatch.setattr(entry, "main", lambda: pytest.fail("Hydra ran for --help"))
    for flag in ("--help", "-h"):
        monkeypatch.setattr(sys, "argv", ["orchestrator", "+experiment=legal_demo", flag])
        entry.cli()
        assert capsys.readouterr().out == text
