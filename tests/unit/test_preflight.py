"""orchestrator/preflight.py: one preflight for execute(), launcher=rayjob and the sweep launcher. A run that starts
here gets absolute paths, a printed and saved plan and the planner's micro-batch pick; a run planned for another
process stays as composed and plans the same."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import pytest

from orchestrator.errors import UserError
from orchestrator.model import resolve_model_path
from orchestrator.plan import ClusterResources
from orchestrator.preflight import DataCheck, preflight
from tests.conftest import compose_run

EIGHT_GPUS = ClusterResources(nodes=1, gpus_per_node=8, gpu_memory_gb=80, cpus=16)
# data.max_length within the tiny Llama's 512 positions (legal_full's 2048 is for its 8B model, and refused here)
LOCAL_MODEL = ["+experiment=legal_full", "model.path=./model", "data.max_length=512", "dry_run=true",
               "logger.mode=disabled"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory holding ./model (the tiny Llama's config.json): a path relative to it."""
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def quiet(run, **changed):
    """The sweep's call: only the plan, for packing."""
    arguments = dict(runs_here=False, data=DataCheck.skip, check_freeze=False, report=False, shape_only=False)
    return preflight(run, lambda: EIGHT_GPUS, **{**arguments, **changed})


def test_a_run_that_starts_here_is_checked_planned_printed_saved_and_holds_the_pick(here, capsys):
    run = compose_run(LOCAL_MODEL, here / "run")
    assert run.trainer.micro_batch_size is None  # left to the planner
    checked = preflight(run, lambda: EIGHT_GPUS, runs_here=True, data=DataCheck.read, check_freeze=True,
                        report=True, shape_only=run.dry_run)
    assert run.model.path == str(here / "model")  # made absolute: Ray's workers run elsewhere
    assert run.trainer.micro_batch_size == checked.plan.micro_batch_size
    assert checked.resources == EIGHT_GPUS and checked.model_config["num_hidden_layers"] == 2
    assert checked.raw_data is not None and len(checked.raw_data.train) > 0
    assert (here / "run" / "plan.json").read_text() == checked.plan.to_json()
    out = capsys.readouterr().out
    assert out.startswith("data: alpaca,") and f"strategy={checked.plan.strategy}" in out


def test_a_run_planned_for_another_process_stays_as_composed_and_plans_the_same(here, capsys):
    started_here = compose_run(LOCAL_MODEL, here / "run")
    expected = preflight(started_here, lambda: EIGHT_GPUS, runs_here=True, data=DataCheck.read, check_freeze=True,
                         report=True, shape_only=True).plan
    capsys.readouterr()
    run = compose_run(LOCAL_MODEL, here / "elsewhere")
    checked = quiet(run)
    # the same plan, but for the run's length, which the run's own preflight counts from the data it reads, and
    # for how it launches, which the process that runs it decides (plan.choose_launch)
    counted = ("max_steps", "steps_per_epoch", "steps_reason", "eval_every", "selection_reason", "in_process",
               "launch_reason")
    assert {k: v for k, v in asdict(checked.plan).items() if k not in counted} == \
        {k: v for k, v in asdict(expected).items() if k not in counted}
    assert run.model.path == "./model" and run.trainer.micro_batch_size is None
    assert checked.raw_data is None
    assert not (here / "elsewhere").exists()
    assert capsys.readouterr().out == ""


def test_data_where_present_reads_what_this_machine_has_and_notes_the_rest(here, capsys):
    checked = quiet(compose_run(LOCAL_MODEL, here / "run"), data=DataCheck.where_present)
    assert checked.raw_data is not None and capsys.readouterr().out.startswith("data: alpaca,")
    elsewhere = compose_run([*LOCAL_MODEL, "data.path=/in/the/cluster/train.jsonl"], here / "run")
    assert quiet(elsewhere, data=DataCheck.where_present).raw_data is None
    assert capsys.readouterr().out.strip() == ("data.path=/in/the/cluster/train.jsonl is not on this machine: "
                                               "the job reads it in the cluster")


def test_freeze_depth_and_the_model_config_as_the_caller_asks(here):
    too_deep = compose_run([*LOCAL_MODEL, "model.freeze_depth=3"], here / "run")
    quiet(too_deep)  # the sweep leaves the check to the trial's own command
    with pytest.raises(UserError, match="model.freeze_depth=3 is not allowed: ./model has 2 layers"):
        quiet(too_deep, check_freeze=True)

    missing = compose_run([*LOCAL_MODEL, "model.path=./no_model"], here / "run")
    with pytest.raises(UserError, match="model.path=./no_model does not exist"):
        quiet(missing)
    given = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    assert quiet(missing, model_config=given).model_config is given  # read by the caller (launcher=rayjob)
