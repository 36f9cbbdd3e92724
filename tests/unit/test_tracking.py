"""W&B on rank 0: online falls back to offline without a key; the logged history lands in the run dir."""

from __future__ import annotations

from orchestrator.config import LoggerConfig, LoggerMode
from orchestrator.tracking import Tracker, wandb_mode


def test_online_without_a_key_logs_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(LoggerConfig(mode=LoggerMode.online)) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig(mode=LoggerMode.online)) == "online"
    assert wandb_mode(LoggerConfig(mode=LoggerMode.disabled)) == "disabled"


def test_offline_run_writes_history(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = Tracker(LoggerConfig(mode=LoggerMode.offline), True, "t", str(tmp_path), total_steps=2,
                      config={"optim": {"lr": 0.1}})  # its console lines: tests/unit/test_progress.py
    for step in (1, 2):
        tracker.log(step, {"train/loss": 1.0 / step, "train/lr": 0.1, "train/tokens_per_s": 100.0})
    tracker.finish({"eval/accuracy": 0.5})
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_other_ranks_do_nothing(tmp_path):
    tracker = Tracker(LoggerConfig(mode=LoggerMode.offline), False, "t", str(tmp_path), 2, {})
    tracker.log(1, {"train/loss": 1.0, "train/lr": 0.1, "train/tokens_per_s": 1.0})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
