"""Training progress on the driver's console: rank 0 sends events, the driver draws them.

Rank 0 puts small events (the run's start, each step's loss and throughput, a note for the console, a warning,
metrics measured after the final checkpoint) into a `ProgressFeed`: a Ray actor of no CPUs that only holds
them. The driver's `ProgressView` takes them every half second and draws them on its own console: a bar in a
terminal; elsewhere (a log, CI) one line every LINE_EVERY_S seconds, with the first and the last step. Time-based
rather than every N%: a short run still shows a line every half minute, and an 8-hour one writes ~1000 lines,
not a line per hour. Lines printed here carry no `(RayTrainWorker pid=...)` prefix: they are the driver's.

Through Ray's object store, not a file: it works the same when the workers run on other machines than the
driver (cluster.address, a RayJob). A recipe in the driver's own process (cluster.in_process) puts its events into a
`LocalFeed` instead, which takes the same calls without Ray.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

LINE_EVERY_S = 30.0  # a non-terminal console: a progress line this often
POLL_S = 0.5  # the driver takes the feed's events this often
WAIT_NOTE_S = 30.0  # the workers' placement still pending after this long: say what the run waits for (once)


def format_duration(seconds: Optional[float]) -> str:
    """45s, 3m05s, 2h07m; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Status:
    """What the driver knows of the training: from the run's start event and the latest step events."""

    total: int = 0  # optimizer steps of the run
    steps_per_epoch: int = 0  # 0: not trained by epochs (or unknown)
    rows_per_step: int = 0  # a classifier's global batch: its throughput is shown in rows/s, else tokens/s
    step: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    tokens_per_s: float = float("nan")
    step_s: float = float("nan")  # the last step's seconds
    started_at: Optional[float] = None  # worker clock: the training phase began (after the evaluation before)
    first_step: int = 0  # the step counted from (a resumed run starts later)
    first_at: Optional[float] = None  # worker clock of the first step event seen
    first_seen_step: int = 0
    last_at: Optional[float] = None  # worker clock of the latest step event

    def apply(self, event: Dict[str, Any]) -> None:
        if event["kind"] == "start":
            self.total, self.steps_per_epoch = event["total"], event.get("steps_per_epoch") or 0
            self.rows_per_step = event.get("rows_per_step") or 0
            self.step = self.first_step = event.get("step", 0)
            self.started_at, self.first_at, self.last_at = event["t"], None, None
        elif event["kind"] == "step":
            self.step, self.loss, self.lr = event["step"], event["loss"], event["lr"]
            self.tokens_per_s, self.step_s = event["tokens_per_s"], event["step_s"]
            if self.first_at is None:
                self.first_at, self.first_seen_step = event["t"], event["step"]
            self.last_at = event["t"]

    def elapsed(self) -> Optional[float]:
        if self.started_at is None or self.last_at is None:
            return None
        return self.last_at - self.started_at

    def eta(self) -> Optional[float]:
        """Remaining steps at the mean pace since the first step seen (evaluations on the way included, as they
        recur); the first step's own time (warm-up) counts once, from the training's start, until a second comes."""
        if self.last_at is None or self.step >= self.total:
            return 0.0 if self.step >= self.total and self.total else None
        if self.step > self.first_seen_step:
            pace = (self.last_at - self.first_at) / (self.step - self.first_seen_step)
        elif self.started_at is not None and self.step > self.first_step:
            pace = (self.last_at - self.started_at) / (self.step - self.first_step)
        else:
            return None
        return pace * (self.total - self.step)

    def epoch_text(self) -> str:
        if not self.steps_per_epoch:
            return ""
        epochs = math.ceil(self.total / self.steps_per_epoch)
        return f"epoch {min(epochs, max(1, math.ceil(self.step / self.steps_per_epoch)))}/{epochs}"

    def throughput_text(self) -> str:
        if self.rows_per_step:
            rate = self.rows_per_step / self.step_s if self.step_s and math.isfinite(self.step_s) else float("nan")
            return f"{rate:.1f} rows/s"
        return f"{self.tokens_per_s:.0f} tok/s"

    def fields(self, compact: bool = False) -> List[str]:
        """What the bar shows beside its own count: epoch, loss, lr, throughput, elapsed, ETA (compact: to fit
        beside a bar in 80 columns)."""
        lr = f"lr {self.lr:.1e}" if compact else f"lr {self.lr:.2e}"
        return [f for f in (self.epoch_text(), f"loss {self.loss:.4f}", lr, self.throughput_text(),
                            f"elapsed {format_duration(self.elapsed())}", f"ETA {format_duration(self.eta())}") if f]

    def bar_text(self) -> str:
        return " ".join(self.fields(compact=True))

    def line(self) -> str:
        return ", ".join([f"step {self.step}/{self.total}", *self.fields()])


class ProgressSender:
    """Rank 0's end: events into the feed. Steps and notes never wait for the driver (a lost one costs a line, no
    time); warnings and metrics wait until the feed holds them, as the worker may end right after."""

    def __init__(self, feed, clock: Callable[[], float] = time.time, wait: Optional[Callable[[Any], Any]] = None):
        self.feed, self.clock, self.wait = feed, clock, wait or _wait

    def send(self, kind: str, **fields: Any) -> None:
        event = {"kind": kind, "t": self.clock(), **fields}
        if self.feed is None:  # no driver listening (a recipe run by hand): the line on this process's stdout
            text = fields.get("text")
            if text is not None:
                sys.stdout.write(("warning: " if kind == "warning" else "") + text + "\n")
                sys.stdout.flush()
            return
        put = self.feed.put.remote([event])
        if kind in ("warning", "error", "metrics"):
            self.wait(put)


def _wait(ref) -> None:
    _result(ref, timeout=60)


def _result(ref, timeout: float) -> Any:
    """A feed call's result: Ray's reference resolved; a LocalFeed's calls return theirs at once."""
    import ray

    return ray.get(ref, timeout=timeout) if isinstance(ref, ray.ObjectRef) else ref


def forward_own_warnings(sender: ProgressSender) -> None:
    """Warnings raised by orchestrator's own code (e.g. a checkpoint skipped on resume) and its loggers' warnings
    and errors also go to the driver's console; each still goes where it went (the worker's log)."""
    import logging
    import os
    import warnings

    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(ours):
            sender.send("warning", text=str(message))
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show

    class ToDriver(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sender.send("error" if record.levelno >= logging.ERROR else "warning", text=record.getMessage())

    own = logging.getLogger("orchestrator")
    own.handlers = [h for h in own.handlers if type(h).__name__ != "ToDriver"]
    own.addHandler(ToDriver(logging.WARNING))


def start_feed():
    """The actor that carries rank 0's events to the driver (no CPUs: it only holds a list)."""
    import ray
    import ray.util.scheduling_strategies

    @ray.remote(num_cpus=0, max_restarts=0)
    class ProgressFeed:
        def __init__(self):
            self.events: List[Dict[str, Any]] = []

        def put(self, events: List[Dict[str, Any]]) -> None:
            self.events.extend(events)

        def take(self) -> List[Dict[str, Any]]:
            events, self.events = self.events, []
            return events

    # on the driver's node, as Ray Train pins its controller: a lost worker node must not take the feed with it
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    return ProgressFeed.options(scheduling_strategy=here).remote()


class LocalFeed:
    """The feed of a recipe that runs in the driver's own process (cluster.in_process), where Ray may not be
    started: the actor's calls (`put.remote`, `take.remote`), done at once, so that the sender and the view are the
    same code for both."""

    def __init__(self):
        self.events: List[Dict[str, Any]] = []
        self.lock = threading.Lock()  # the recipe puts on the main thread, the view takes on its own
        self.put, self.take = SimpleNamespace(remote=self._put), SimpleNamespace(remote=self._take)

    def _put(self, events: List[Dict[str, Any]]) -> None:
        with self.lock:
            self.events.extend(events)

    def _take(self) -> List[Dict[str, Any]]:
        with self.lock:
            events, self.events = self.events, []
        return events


def nothing_to_place() -> Tuple[bool, Dict[str, float]]:
    """ProgressView's `placement` for a recipe in the driver's process: no workers wait for Ray's resources."""
    return False, {}


def _placement() -> Tuple[bool, Dict[str, float]]:
    """(a placement group of this Ray cluster still waits for resources, what Ray has free now)."""
    import ray
    from ray.util import placement_group_table

    pending = any(group.get("state") == "PENDING" for group in placement_group_table().values())
    return pending, ray.available_resources()


class ProgressView:
    """The driver's end: a thread takes the feed's events and draws them until `close()`, which draws the last
    ones. Notes and warnings are printed as they come; metrics events (measured after the final checkpoint) are
    collected in `late_metrics`."""

    def __init__(self, feed, terminal: bool, console=None, line_every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, needs: Optional[Dict[str, float]] = None,
                 placement: Optional[Callable[[], Tuple[bool, Dict[str, float]]]] = None):
        from rich.console import Console

        self.feed, self.terminal, self.line_every_s, self.clock = feed, terminal, line_every_s, clock
        # what the workers need from Ray, and what it has free: said once when their placement is still pending
        # after WAIT_NOTE_S, so that a run waiting for GPUs another job holds does not wait in silence
        self.needs, self.placement = needs or {}, placement or _placement
        self.opened_at, self.started, self.wait_noted = clock(), False, False
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.status = Status()
        self.late_metrics: Dict[str, Any] = {}
        self.bar = None  # rich Progress, in a terminal, from the start event on
        self.task = None
        self.last_line_at: Optional[float] = None
        self.lines_step = -1
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ProgressView":
        self.thread = threading.Thread(target=self._poll, name="progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _poll(self) -> None:
        while not self.stopping.wait(POLL_S):
            self.take()

    def take(self) -> None:
        try:
            events = _result(self.feed.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the feed is gone (Ray shut down): nothing more to draw
            return
        for event in events:
            self.draw(event)
        self.note_waiting()

    def note_waiting(self) -> None:
        if self.started or self.wait_noted or self.clock() - self.opened_at < WAIT_NOTE_S:
            return
        try:
            pending, free = self.placement()
        except Exception:  # noqa: BLE001 - Ray gone: nothing to say about its resources
            return
        if not pending:  # placed: the workers are starting (a slow start is not a wait)
            return
        self.wait_noted = True
        need = " and ".join(f"{amount:g} {kind}" for kind, amount in self.needs.items()) or "its workers"
        have = ", ".join(f"{free.get(kind, 0.0):g} {kind}" for kind in (self.needs or {"CPU": 0, "GPU": 0}))
        self.print(_escape(f"waiting: the workers have not started after {WAIT_NOTE_S:.0f} s; they need {need}, "
                           f"and Ray has {have} free now (another job may hold them; the run starts when they are "
                           "free)"))

    def close(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            self.thread.join()
            self.thread = None
            self.take()  # what rank 0 sent last
        if self.status.step and self.lines_step != self.status.step and not self.terminal:
            self._line()  # the last step's line
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def draw(self, event: Dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "metrics":
            self.late_metrics.update(event["metrics"])
        elif kind in ("note", "warning", "error"):
            prefix = {"warning": "[bold yellow]warning:[/] ", "error": "[bold red]error:[/] "}.get(kind, "")
            self.print(prefix + _escape(event["text"]))
        elif kind == "start":
            self.started = True
            self.status = Status()
            self.status.apply(event)
            self.last_line_at, self.lines_step = self.clock(), -1
            if self.terminal:
                self._start_bar()
        elif kind == "step":
            first = self.status.last_at is None
            self.status.apply(event)
            if self.bar is not None:
                self.bar.update(self.task, completed=self.status.step, total=self.status.total,
                                fields=self.status.bar_text())
            elif not self.terminal and (first or self.clock() - self.last_line_at >= self.line_every_s
                                        or self.status.step >= self.status.total):
                self._line()

    def print(self, text: str) -> None:
        (self.bar.console if self.bar is not None else self.console).print(text)

    def _line(self) -> None:
        self.console.print(_escape(self.status.line()))
        self.last_line_at, self.lines_step = self.clock(), self.status.step

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        if self.bar is not None:  # a restarted run: a new start event
            self.bar.stop()
        self.bar = Progress(TextColumn("{task.completed}/{task.total}"), BarColumn(bar_width=10),
                            TextColumn("{task.fields[fields]}"), console=self.console, transient=False,
                            redirect_stdout=False, redirect_stderr=False)
        self.task = self.bar.add_task("train", total=self.status.total, completed=self.status.step,
                                      fields="starting")
        self.bar.start()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
