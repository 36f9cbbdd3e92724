"""The driver's progress (orchestrator/progress.py): the fields and ETA of a line, when a non-terminal console
gets one, the bar in a terminal, and what rank 0's Tracker sends."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from orchestrator.config import LoggerConfig, LoggerMode
from orchestrator.progress import ProgressSender, ProgressView, Status, format_duration
from orchestrator.tracking import Tracker


class FakeFeed:
    """The ProgressFeed actor's interface, in this process."""

    def __init__(self):
        self.events = []
        self.put = SimpleNamespace(remote=self.events.extend)


def step(n, t, loss=1.0, lr=1e-4, tokens_per_s=500.0, step_s=2.0):
    return {"kind": "step", "step": n, "t": t, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "step_s": step_s}


def test_durations():
    assert [format_duration(s) for s in (0, 45.4, 185, 7620, None, float("inf"), -1)] == \
        ["0s", "45s", "3m05s", "2h07m", "?", "?", "?"]


def test_line_fields_and_eta():
    status = Status()
    status.apply({"kind": "start", "t": 100.0, "total": 55, "step": 0, "steps_per_epoch": 11, "rows_per_step": 0})
    status.apply(step(1, 110.0, loss=2.19, lr=8e-5, tokens_per_s=233.4))
    # one step seen: its pace since the start (10 s a step) for the 54 left
    assert status.line() == "step 1/55, epoch 1/5, loss 2.1900, lr 8.00e-05, 233 tok/s, elapsed 10s, ETA 9m00s"
    status.apply(step(12, 132.0))  # 11 steps in 22 s since the first one seen: 2 s a step, 43 left
    assert status.epoch_text() == "epoch 2/5" and status.elapsed() == 32.0 and status.eta() == 86.0
    status.apply(step(55, 218.0))
    assert status.eta() == 0.0 and status.line().endswith("elapsed 1m58s, ETA 0s")


def test_classifier_shows_rows_per_second_and_no_epoch_without_epochs():
    status = Status()
    status.apply({"kind": "start", "t": 0.0, "total": 3, "step": 0, "steps_per_epoch": 0, "rows_per_step": 32})
    status.apply(step(1, 4.0, step_s=4.0))
    assert status.line() == "step 1/3, loss 1.0000, lr 1.00e-04, 8.0 rows/s, elapsed 4s, ETA 8s"


def test_a_resumed_run_counts_from_where_it_resumed():
    status = Status()
    status.apply({"kind": "start", "t": 0.0, "total": 100, "step": 90, "steps_per_epoch": 0})
    status.apply(step(91, 3.0))
    assert status.eta() == 27.0  # 3 s for its one step, 9 left


def view_with_clock(terminal=False):
    out = io.StringIO()
    now = [0.0]
    console = Console(file=out, width=80 if terminal else 200, force_terminal=terminal, color_system=None, highlight=False)
    view = ProgressView(FakeFeed(), terminal=terminal, console=console, line_every_s=30, clock=lambda: now[0])
    return view, out, now


def test_a_log_gets_the_first_step_a_line_every_30_s_and_the_last():
    view, out, now = view_with_clock()
    view.draw({"kind": "start", "t": 0.0, "total": 10, "step": 0})
    for n in range(1, 11):
        now[0] = n * 7.0  # a step every 7 s: lines at steps 1, 6 (42 s, 35 s after the last line) and 10 (the end)
        view.draw(step(n, n * 7.0))
    view.draw({"kind": "note", "text": "selection: exporting the weights of step [6]"})
    view.draw({"kind": "warning", "text": "the plots failed"})
    view.draw({"kind": "metrics", "metrics": {"eval/rougeL": 0.5}})
    view.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == ["step 1/10", "step 6/10", "step 10/10"]
    assert lines[0].endswith("elapsed 7s, ETA 1m03s") and lines[2].endswith("ETA 0s")
    assert lines[3:] == ["selection: exporting the weights of step [6]", "warning: the plots failed"]
    assert view.late_metrics == {"eval/rougeL": 0.5}


def test_a_terminal_gets_a_bar_with_the_same_fields():
    view, out, _ = view_with_clock(terminal=True)
    view.draw({"kind": "start", "t": 0.0, "total": 4, "step": 0, "steps_per_epoch": 2})
    for n in range(1, 5):
        view.draw(step(n, n * 3.0))
    view.close()
    text = out.getvalue()
    assert "4/4" in text and "epoch 2/2 loss 1.0000 lr 1.0e-04 500 tok/s elapsed 12s ETA 0s" in text
    assert "step 1/4" not in text  # no log lines besides the bar


def test_tracker_on_rank_0_sends_the_run_its_steps_notes_and_late_metrics():
    feed = FakeFeed()
    sender = ProgressSender(feed, clock=lambda: 5.0, wait=lambda ref: None)
    tracker = Tracker(LoggerConfig(mode=LoggerMode.disabled), True, "t", "/nonexistent", total_steps=2, config={},
                      sender=sender, steps_per_epoch=1, rows_per_step=8)
    tracker.start(0)
    tracker.log(0, {"eval_before/loss": 2.0})  # no training step: nothing to draw
    tracker.log(1, {"train/loss": 1.5, "train/lr": 0.1, "train/tokens_per_s": 100.0}, step_s=0.5)
    tracker.note("resumed at step 1")
    tracker.late_metrics({"eval/bleu": 3.0})
    assert [e["kind"] for e in feed.events] == ["start", "step", "note", "metrics"]
    assert feed.events[0] == {"kind": "start", "t": 5.0, "total": 2, "step": 0, "steps_per_epoch": 1,
                              "rows_per_step": 8}
    assert feed.events[1]["loss"] == 1.5 and feed.events[1]["step_s"] == 0.5

    quiet = Tracker(LoggerConfig(mode=LoggerMode.disabled), False, "t", "/nonexistent", 2, {}, sender=sender)
    quiet.start(0)
    quiet.note("x")
    assert len(feed.events) == 4  # other ranks send nothing


def test_a_start_that_waits_for_resources_is_said_once_with_what_it_needs():
    out = io.StringIO()
    now = [0.0]
    console = Console(file=out, width=200, force_terminal=False, color_system=None, highlight=False)
    state = {"pending": True}
    view = ProgressView(FakeFeed(), terminal=False, console=console, clock=lambda: now[0], needs={"GPU": 8},
                        placement=lambda: (state["pending"], {"GPU": 2.0, "CPU": 60.0}))
    now[0] = 20.0
    view.note_waiting()
    assert out.getvalue() == ""  # 20 s: not yet worth a word
    now[0] = 45.0
    view.note_waiting()
    view.note_waiting()
    assert out.getvalue().splitlines() == [
        "waiting: the workers have not started after 30 s; they need 8 GPU, and Ray has 2 GPU free now (another job "
        "may hold them; the run starts when they are free)"]


def test_a_slow_start_whose_workers_are_placed_is_no_wait():
    out = io.StringIO()
    now = [0.0]
    console = Console(file=out, width=200, force_terminal=False, color_system=None, highlight=False)
    asked = []
    placed = ProgressView(FakeFeed(), terminal=False, console=console, clock=lambda: now[0], needs={"CPU": 2},
                          placement=lambda: asked.append(1) or (False, {"CPU": 0.0}))
    now[0] = 500.0
    placed.note_waiting()
    assert asked  # it looked, and the placement was done
    started = ProgressView(FakeFeed(), terminal=False, console=console, clock=lambda: now[0], needs={"CPU": 2},
                           placement=lambda: (True, {}))
    started.draw({"kind": "start", "t": 0.0, "total": 3, "step": 0})
    now[0] = 900.0
    started.note_waiting()
    assert out.getvalue() == ""  # placed, or training already: nothing to say
