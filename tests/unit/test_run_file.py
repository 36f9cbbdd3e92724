"""A run file of the user's own (issue 17): `orchestrator init` writes one, `orchestrator train FILE` and
`python -m orchestrator --config FILE` compose it over our defaults with the command line winning; errors name the
file, the line and the key; launcher=rayjob and sweeps get the file's keys as overrides. Dry runs: no Ray starts."""

from __future__ import annotations

import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from orchestrator.runfile import quote, render
from tests.conftest import ROOT

CONSOLE_SCRIPT = Path(sys.executable).parent / "orchestrator"
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(args, monkeypatch, capsys):
    """`python -m orchestrator ARGS` in this process, as tests/unit/test_bad_input.py runs it."""
    monkeypatch.setattr(sys, "argv", ["orchestrator", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
    return exited.value.code, capsys.readouterr()


@pytest.mark.parametrize("text", ["plain", "x'y", "c:\\path\\", "a\\'b", "", "${model.path}", "a b, c=[d]", "\\",
                                  "true", "null", "1e-5", "3", "it's \\n", "sample:legal_clauses", "/a/b.jsonl"])
def test_values_read_back_as_the_same_string(text):
    parser = OverridesParser.create()
    for rendered in (quote(text), render(text)):
        assert parser.parse_override(f"k={rendered}").value() == text, rendered


def test_other_values_read_back_unchanged():
    parser = OverridesParser.create()
    for value in (None, True, False, 3, 1e-5, -2.5, [1, "b", None], {"x": 1, "y": "a b"},
                  [{"path": "p", "weight": 1.0}]):
        assert parser.parse_override(f"k={render(value)}").value() == value


def test_init_writes_a_starter_that_plans_and_the_command_line_wins(tmp_path):
    out = tmp_path / "conf" / "my_run.yaml"
    result = subprocess.run([str(CONSOLE_SCRIPT), "init", "--model", "tiny_llama", "--strategy", "lora", "--out",
                             str(out)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("# my_run.yaml: a run of your own")
    settings = yaml.safe_load(text)
    assert settings["model"]["path"] == "builtin:tiny-llama" and settings["model"]["task"] == "causal_lm"
    assert settings["data"]["path"] == "sample:legal_instructions" and settings["strategy"] == "lora"
    assert settings["trainer"]["epochs"] == 3

    again = subprocess.run([str(CONSOLE_SCRIPT), "init", "--out", str(out)], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr == f"error: {out} exists: choose another --out, or add --force " \
                                                     "to overwrite it\n"

    run_dir = tmp_path / "run"
    train = subprocess.run([str(CONSOLE_SCRIPT), "train", str(out), "dry_run=true", "cluster.gpus=0",
                            "trainer.epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["strategy"] == "lora"
    assert "strategy=lora was set in" in train.stdout + train.stderr and str(out) in train.stdout + train.stderr
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert composed["name"] == "my_run" and composed["model"]["path"] == "builtin:tiny-llama"
    assert composed["trainer"]["epochs"] == 1  # the command line wins over the file's 3
    assert composed["optim"]["eps"] == 1e-8 and composed["model"]["init"] == "random"  # our defaults, the file's
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.epochs=3" not in overrides and overrides[-1] == "trainer.epochs=1"
    assert "model.path=builtin:tiny-llama" in overrides  # the run repeats without the file

    # the --config form of python -m orchestrator, from another directory, gives the same composition
    printed = cli("--config", out, "trainer.epochs=1", "dry_run=true", "cluster.gpus=0", "--cfg", "job", cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    job = yaml.safe_load(printed.stdout)
    assert {k: v for k, v in job.items() if k != "run_dir"} == {k: v for k, v in composed.items() if k != "run_dir"}


def test_a_file_picks_configs_and_sets_dict_keys_as_an_experiment_does(tmp_path):
    (tmp_path / "exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny_llama\n  - override /data: legal_instructions\n"
        "  - _self_\nname: mine\nmodel:\n  config_overrides:\n    num_hidden_layers: 1\n"
        "data:\n  mix:\n    - {path: 'sample:legal_instructions', weight: 2}\n"
        "k8s:\n  env: {NCCL_DEBUG: INFO}\n")
    printed = cli("train", "exp.yaml", "--cfg", "job", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    job = yaml.safe_load(printed.stdout)
    assert job["name"] == "mine" and job["model"]["path"] == "builtin:tiny-llama"
    assert job["model"]["config_overrides"] == {"num_hidden_layers": 1} and job["data"]["format"] == "alpaca"
    assert job["data"]["mix"][0]["weight"] == 2 and job["k8s"]["env"] == {"NCCL_DEBUG": "INFO"}


ERRORS = [  # (file text, extra arguments, the message after "error: <file>")
    ("trainer:\n  epochs: 1\n  epoch: 3\n", [],
     ":3: trainer.epoch: no such key; allowed keys here: async_checkpoint, checkpoint_every"),
    ("trainer:\n  max_steps: abc\n", [], ":2: trainer.max_steps=abc is not allowed: expected integer"),
    ("model:\n  path: [x\n", [], ":3: not valid YAML: expected ',' or ']'"),
    ("logger:\n  mode: loud\n", [], ":2: logger.mode=loud is not allowed: expected one of online, offline, disabled"),
    ("defaults:\n  - override /model: nope\n", [], ":2: model=nope is not allowed: available options: "
     "gemma2_2b"),  # the first of the model entries, in order
    ("optim:\n  lr: -1\n", [], ":2: optim.lr=-1.0 is not allowed: a number > 0"),
    ("model: tiny_llama\n", [], ":1: model: expected a mapping of model.* keys, got 'tiny_llama' (a config name "
     "goes in the defaults list: '- override /model: tiny_llama')"),
    ("data:\n  path: /no/such.jsonl\n", [], ":2: data.path=/no/such.jsonl does not exist"),
    ("- a\n- b\n", [], ": a run file is a mapping of keys"),
    ("a: 1\na: 2\n", [], ":2: not valid YAML"),
]


@pytest.mark.parametrize("text,extra,message", ERRORS)
def test_errors_name_the_file_the_line_and_the_key(text, extra, message, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    run_dir = tmp_path / "run"
    code, captured = run_in_process(["train", path, *extra, "dry_run=true", "cluster.gpus=0",
                                     f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    assert code == 2, captured.err
    assert captured.err.startswith(f"error: {path}{message}"), captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert not (run_dir / "plan.json").exists()


def test_a_key_the_command_line_sets_is_not_blamed_on_the_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-4\n")
    code, captured = run_in_process(["--config", path, "optim.lr=-1", "dry_run=true", "cluster.gpus=0",
                                     f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2 and captured.err.startswith("error: optim.lr=-1.0 is not allowed"), captured.err
    code, captured = run_in_process(["train", tmp_path / "missing.yaml"], monkeypatch, capsys)
    assert code == 2 and captured.err == f"error: run file {tmp_path / 'missing.yaml'} does not exist\n"


def test_rayjob_renders_the_files_keys_for_the_pods(tmp_path):
    (tmp_path / "big.yaml").write_text("defaults:\n  - override /model: llama3_8b_instruct\n"
                                       "  - override /data: legal_instructions\ntrainer:\n  epochs: 2\n")
    run_dir = tmp_path / "run"
    result = cli("train", "big.yaml", "launcher=rayjob", "dry_run=true", "cluster.nodes=2", "cluster.gpus=8",
                 "cluster.gpu_memory_gb=80", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    docs = {d["kind"]: d for d in yaml.safe_load_all(result.stdout) if d}  # the claim, the ConfigMap, the RayJob
    command = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    # the pods read the run's config, composed and resolved here, from the job's ConfigMap (launch/rayjob.py)
    assert command[:5] == ["python", "-m", "orchestrator", "--config", "/etc/orchestrator/job/run.yaml"]
    assert not any("big.yaml" in part for part in command)  # the file itself is on this machine only
    shipped = yaml.safe_load(docs["ConfigMap"]["data"]["run.yaml"])
    assert shipped["model"]["path"] == "meta-llama/Llama-3.1-8B-Instruct"  # the file's model and data groups
    assert shipped["data"]["format"] == "alpaca"
    assert shipped["trainer"]["epochs"] == 2 and shipped["name"] == "big"


def test_a_sweep_in_the_file_runs_its_trials_with_the_files_keys(tmp_path):
    (tmp_path / "sweep.yaml").write_text(
        "model:\n  freeze_depth: 1\nhydra:\n  sweeper:\n    params:\n      optim.lr: 1e-5,3e-5\n"
        "      peft.rank: [8, 16]\n")
    sweep_dir = tmp_path / "sweep"
    # hydra/launcher=basic: the trials one after the other in this process, dry runs (no Ray)
    result = cli("train", "sweep.yaml", "peft.rank=4", "hydra/launcher=basic", "dry_run=true", "cluster.gpus=0",
                 "logger.mode=disabled", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(trials) == 2  # the command line's peft.rank=4 replaces the file's [8, 16]
    lrs = set()
    for trial in trials:
        assert (trial / "plan.json").is_file()
        job = yaml.safe_load((trial / ".hydra" / "config.yaml").read_text())
        assert job["model"]["freeze_depth"] == 1 and job["peft"]["rank"] == 4 and job["name"] == "sweep"
        lrs.add(job["optim"]["lr"])
    assert lrs == {1e-5, 3e-5}
