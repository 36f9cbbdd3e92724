"""Recipe.finish writes the export before the optional evaluations (forgetting check, generated answers): one
that fails is a warning on the console and costs only its own figures; what they measure reaches the driver
afterwards. The phases around them are replaced by recorders: no Ray, no model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from orchestrator import train_loop
from orchestrator.checkpoint_writer import CheckpointWriter
from orchestrator.config import Task
from orchestrator.progress import ProgressSender
from orchestrator.timing import PhaseTimer
from orchestrator.tracking import Tracker
from orchestrator.train_state import TrainState
from tests.conftest import compose_run, tiny_llama_run
from tests.unit.test_progress import FakeFeed


def recipe(tmp_path, save_final=True):
    run = compose_run([*tiny_llama_run(), f"trainer.save_final={str(save_final).lower()}"], tmp_path)
    feed, calls = FakeFeed(), []
    sender = ProgressSender(feed, wait=lambda ref: None)
    r = train_loop.Recipe.__new__(train_loop.Recipe)
    r.run_config, r.task, r.rank, r.world_size, r.device = run, Task.causal_lm, 0, 1, torch.device("cpu")
    r.nodes = [{"rank": 0, "node_id": "n0", "hostname": "h"}]  # setup_worker's (orchestrator/placement.py)
    r.started_at = 0.0  # __init__'s wall clock (the start-up account)
    r.plan = SimpleNamespace(micro_batch_size=1)
    r.state, r.last_metrics, r.timer = TrainState(step=2, loss=[2.0, 1.0]), {"train/loss": 1.0}, PhaseTimer()
    r.checkpoints = CheckpointWriter(asynchronous=False)  # setup_worker's: nothing in flight
    r.tracker = Tracker(run.logger, True, "t", str(tmp_path), 2, {}, sender=sender)
    r.engine = r.tokenizer = r.data = SimpleNamespace(validation=[])
    r.validate = lambda with_confusion=False: (calls.append("validate"), {"loss": 0.5})[1]
    r.choose_final_weights = lambda final_eval: {"select/exported_step": 2}
    r.save_checkpoint = lambda metrics, final=False: calls.append(("export", dict(metrics)))
    return r, feed, calls


def test_a_failing_optional_evaluation_is_a_warning_after_the_export(tmp_path, monkeypatch):
    r, feed, calls = recipe(tmp_path)

    def forgetting(when):
        calls.append(f"forgetting {when}")
        raise RuntimeError("reference set unreadable")

    def generation(*args):
        calls.append("generation")
        raise ModuleNotFoundError("No module named 'sacrebleu'")

    r.forgetting = forgetting
    monkeypatch.setattr(train_loop, "generated_answers", generation)
    r.finish()

    assert [c if isinstance(c, str) else c[0] for c in calls] == ["validate", "export", "forgetting after",
                                                                  "generation"]
    exported_with = calls[1][1]
    assert exported_with["eval/loss"] == 0.5 and exported_with["step"] == 2
    warnings = [e["text"] for e in feed.events if e["kind"] == "warning"]
    assert len(warnings) == 2
    assert warnings[0].startswith("the forgetting check (data.reference_path) failed after training, the export is "
                                  "kept: RuntimeError: reference set unreadable")
    assert "generation check" in warnings[1] and "No module named 'sacrebleu'" in warnings[1]
    late = [e["metrics"] for e in feed.events if e["kind"] == "metrics"]
    assert len(late) == 1 and "time/eval_s" in late[0] and not any(k.startswith("forgetting/") for k in late[0])


def test_optional_evaluations_that_work_reach_the_driver_after_the_metrics_only_report(tmp_path, monkeypatch):
    r, feed, calls = recipe(tmp_path, save_final=False)
    reported = []
    monkeypatch.setattr(train_loop, "report_metrics_only", lambda metrics, rank: reported.append(metrics))
    r.forgetting = lambda when: {f"forgetting/loss_{when}": 3.0}
    monkeypatch.setattr(train_loop, "generated_answers", lambda *args: {"eval/rougeL": 0.25})
    r.finish()

    assert len(reported) == 1 and "eval/rougeL" not in reported[0] and [c for c in calls] == ["validate"]
    late = [e["metrics"] for e in feed.events if e["kind"] == "metrics"]
    assert late[0]["forgetting/loss_after"] == 3.0 and late[0]["eval/rougeL"] == pytest.approx(0.25)
    assert not [e for e in feed.events if e["kind"] == "warning"]
