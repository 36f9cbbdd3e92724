"""Checkpoints that do not stall training (trainer.async_checkpoint, on by default; issue 18).

A checkpoint is taken in two parts (checkpoint.save_and_report drives them, CheckpointWriter times them):

  in the training loop   DeepSpeed's save_checkpoint runs as always (collective, every rank), but with the engine's
                         checkpoint engine swapped for `Staging` for the call: each file's state dict is copied into
                         host memory (pinned buffers kept from one checkpoint to the next when the state is on a GPU)
                         instead of being written. DeepSpeed's small files (`latest`, its recovery scripts) and the RNG
                         state are written at once. Then training goes on.
  on a background thread the staged files are written by the engine's own checkpoint engine (the same torch.save of
                         the same state dict: the same files), every file is checksummed, the marker is written last,
                         and the directory is published (ray.train.report: Ray copies it into the run's storage and
                         registers the checkpoint once every rank has reported it).

What stays as it was:
  - complete only when written: the marker follows every file and the report follows the marker, so Ray registers
    nothing that is not on disk; a worker that dies mid-write leaves a markerless directory under the node's TMPDIR
    that nobody reported (or, cut short in Ray's copy, one in storage that resuming skips).
  - one checkpoint in flight: the next save, the final one, a metrics-only report and the end of the training
    function (returning or raising) first wait for the one being written, and raise its failure. So every rank's
    reports reach Ray in the same order, and host memory holds one snapshot.
  - the final checkpoint (with the consolidated Hugging Face export) is written in the training loop, as before:
    the run ends with it, there is nothing to overlap.

Host memory: a file is staged only if the host memory its copy adds fits a budget of HOST_SHARE of the memory available
on the node when the checkpoint starts, shared by the node's workers (buffers kept from the last checkpoint are
reused and add nothing; a new pinned block counts as PyTorch allocates it, rounded up to a power of two); a file
that does not fit is written directly, as with trainer.async_checkpoint=false, and the log says so once.
ZeRO-3 writes one optimizer file per rank (its partition: 12 bytes a parameter, fp32 weights and both Adam moments),
so 8B on 8 GPUs stages ~14 GB per rank, ~112 GB on the node; where that does not fit, those checkpoints are
synchronous. With optimizer offload the state is in host memory already, and a snapshot would double it: the budget
decides the same way.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

HOST_SHARE = 0.5  # of the node's available host memory, for the snapshots of all its workers at once
PHASES = ("blocked", "wait", "save", "write", "checksum", "publish", "complete")  # `figures`, per checkpoint


class HostBuffers:
    """Host memory for the snapshots, kept from one checkpoint to the next: the shards have the same sizes every
    time, and allocating pinned memory (or faulting in fresh pages) costs more than the copy. Only the buffers the
    last checkpoint used are kept."""

    def __init__(self):
        self.free: Dict[Tuple[int, bool], List[torch.Tensor]] = {}
        self.used: List[torch.Tensor] = []

    def new_bytes(self, sizes: List[Tuple[int, bool]]) -> int:
        """Host memory that buffers of these (bytes, pinned) would add to what is held: a free buffer of the size is
        reused; PyTorch's pinned-memory allocator rounds a new block up to a power of two."""
        spare = {key: len(buffers) for key, buffers in self.free.items()}
        added = 0
        for nbytes, pinned in sizes:
            if spare.get((nbytes, pinned)):
                spare[(nbytes, pinned)] -= 1
            else:
                added += 1 << max(0, nbytes - 1).bit_length() if pinned else nbytes
        return added

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        spare = self.free.get((nbytes, pinned))
        buffer = spare.pop() if spare else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.used.append(buffer)
        return buffer

    def release(self) -> None:
        """After the checkpoint is written: what it used is free for the next one, anything it left unused is
        dropped (the shards' sizes changed); after one that used none, the free buffers stay as they are."""
        if not self.used:
            return
        self.free = {}
        for buffer in self.used:
            self.free.setdefault((buffer.numel(), buffer.is_pinned()), []).append(buffer)
        self.used = []


def _tensors(obj: Any, found: Dict[int, torch.Tensor]) -> None:
    """Every tensor in nested dicts, lists and tuples, by id."""
    if isinstance(obj, torch.Tensor):
        found[id(obj)] = obj
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, found)


def _plain(tensor: torch.Tensor) -> bool:
    """A tensor whose copy torch.save writes as it writes the original: a strided tensor or Parameter whose Python
    attributes (pickled with it: ZeRO-3's fp32 partitions carry their ds_id) hold no tensors."""
    held: Dict[int, torch.Tensor] = {}
    _tensors(list(tensor.__dict__.values()), held)
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
            and tensor.device.type != "meta" and not held)


def host_copy(state: Any, buffers: HostBuffers, budget: int) -> Optional[Tuple[Any, int, int]]:
    """(a copy of `state` whose tensors live in host memory, the bytes copied, the host memory added), or None where
    it holds a tensor that is not plain or its copy would add more than `budget` bytes of host memory. Storages are
    copied whole and once each, and every tensor is rebuilt on its storage's copy with its offset, shape and strides:
    torch.save then writes the copy as it would have written the original (the same storages, shared alike; a GPU
    tensor's storage is recorded as the host's). Copies from a GPU are queued without waiting (pinned memory); the
    caller synchronizes."""
    found: Dict[int, torch.Tensor] = {}
    _tensors(state, found)
    if not all(_plain(t) for t in found.values()):
        return None
    storages: Dict[int, torch.UntypedStorage] = {}
    for tensor in found.values():
        storages.setdefault(tensor.untyped_storage()._cdata, tensor.untyped_storage())
    nbytes = sum(s.nbytes() for s in storages.values())
    added = buffers.new_bytes([(s.nbytes(), s.device.type == "cuda") for s in storages.values()])
    if added > budget:
        return None
    copies: Dict[int, torch.UntypedStorage] = {}
    for key, storage in storages.items():
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        target = buffers.take(storage.nbytes(), pinned=storage.device.type == "cuda")
        target.copy_(source, non_blocking=True)
        copies[key] = target.untyped_storage()
    memo: Dict[int, Any] = {}
    for key, tensor in found.items():
        rebuilt = torch.empty(0, dtype=tensor.dtype).set_(copies[tensor.untyped_storage()._cdata],
                                                         tensor.storage_offset(), tensor.size(), tensor.stride())
        if type(tensor) is torch.nn.Parameter:
            rebuilt = torch.nn.Parameter(rebuilt, requires_grad=tensor.requires_grad)
        elif tensor.requires_grad:
            rebuilt.requires_grad_(True)
        rebuilt.__dict__.update(copy.deepcopy(tensor.__dict__))
        memo[key] = rebuilt
    # everything else (numbers, strings, the DeepSpeed config, the client state's history lists) is deep-copied:
    # training goes on changing the originals; the memo puts the host copies in the tensors' places
    return copy.deepcopy(state, memo), nbytes, added


class Staging:
    """Stands in for an engine's checkpoint engine during one save_checkpoint: `save` snapshots a file's state dict
    into host memory instead of writing it (or writes it at once where it does not fit the budget); `write` writes
    the snapshots later through the engine's own checkpoint engine. Everything else is the original's."""

    def __init__(self, inner, buffers: HostBuffers, budget: int):
        self.inner, self.buffers, self.budget = inner, buffers, budget
        self.files: List[Tuple[str, Any]] = []  # (path, host copy of its state dict)
        self.staged_bytes = 0  # copied
        self.added_bytes = 0  # host memory allocated for it (the rest reused from the last checkpoint)
        self.direct: List[str] = []  # files written at once: over the budget, or holding what cannot be copied

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        try:
            copied = host_copy(state_dict, self.buffers, self.budget - self.added_bytes)
        except (TypeError, RuntimeError, copy.Error) as err:  # an object deepcopy refuses: write it now instead
            logger.warning("checkpoint: %s is written synchronously (%s: %s)", path, type(err).__name__, err)
            copied = None
        if copied is None:
            self.inner.save(state_dict, path)
            self.direct.append(path)
            return
        state, nbytes, added = copied
        self.files.append((path, state))
        self.staged_bytes += nbytes
        self.added_bytes += added

    def write(self) -> None:
        for path, state in self.files:
            self.inner.save(state, path)
        self.files = []


def stageable(engine) -> bool:
    """Whether this engine's files can be staged: its checkpoint engine writes with a plain torch.save (DeepSpeed's
    default TorchCheckpointEngine, PlainEngine's own), nothing asynchronous of its own (the decoupled and DataStates
    engines) and no NVMe offload (save_checkpoint copies its swap files itself)."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None:
        return False
    try:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    except ImportError:  # PlainEngine without DeepSpeed installed
        TorchCheckpointEngine = ()  # noqa: N806
    from orchestrator.plain_engine import TorchFiles

    offloads_to_nvme = getattr(engine, "zero_nvme_offload_optimizer", lambda: False)()
    return isinstance(inner, (TorchCheckpointEngine, TorchFiles)) and not offloads_to_nvme


def node_budget(local_workers: int) -> int:
    """Bytes one worker may snapshot now: HOST_SHARE of the node's available memory, split among its workers."""
    import psutil

    return int(psutil.virtual_memory().available * HOST_SHARE / max(1, local_workers))


class Direct:
    """No staging: save_checkpoint writes the files itself (trainer.async_checkpoint=false, the final checkpoint)."""

    def __init__(self):
        self.files: List[Tuple[str, Any]] = []
        self.staged_bytes = 0

    def write(self) -> None:
        pass


class CheckpointWriter:
    """One per worker. Times every checkpoint's phases, and where `asynchronous`, runs the part after the snapshot
    on a background thread, one checkpoint at a time."""

    def __init__(self, asynchronous: bool, local_workers: int = 1):
        self.asynchronous, self.local_workers = asynchronous, local_workers
        self.buffers = HostBuffers()
        self.thread: Optional[threading.Thread] = None
        self.failure: Optional[BaseException] = None
        self.records: List[Dict[str, float]] = []
        self.said_synchronous = False

    # --- the training loop's side ------------------------------------------------------------------------------

    def begin(self, step: int) -> Dict[str, float]:
        """A checkpoint starts: the previous one is complete first (and its failure raised here)."""
        started = time.perf_counter()
        self.wait()
        self.buffers.release()  # (after a save that failed before its write: its snapshot is dropped)
        record = {"step": step, "started": started, "wait": time.perf_counter() - started}
        self.records.append(record)
        return record

    @contextlib.contextmanager
    def staged(self, engine, record: Dict[str, float], background: bool):
        """Around engine.save_checkpoint: yields the Staging (or Direct) whose `write` writes what it holds."""
        started = time.perf_counter()
        if not (self.asynchronous and background and stageable(engine)):
            yield Direct()
            record["save"] = time.perf_counter() - started
            return
        inner = engine.checkpoint_engine
        staging = Staging(inner, self.buffers, node_budget(self.local_workers))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the step's last kernels, on whatever stream, are done before copying
        engine.checkpoint_engine = staging
        try:
            yield staging
        finally:
            engine.checkpoint_engine = inner
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the copies are done before training changes the originals
        record["save"] = time.perf_counter() - started
        record["staged_gib"] = staging.staged_bytes / 2**30
        if staging.direct and not self.said_synchronous:
            self.said_synchronous = True
            logger.warning("checkpoint: %d file(s) did not fit the host-memory budget for a background write and "
                           "were written synchronously: %s", len(staging.direct), ", ".join(staging.direct))

    def submit(self, record: Dict[str, float], staging, complete: Callable[[], None]) -> None:
        """Run `complete` (write what was staged, checksums, marker, publish): on the background thread where
        something was staged, else here."""
        if staging.files:
            self.thread = threading.Thread(target=self._complete, args=(record, complete, True),
                                           name=f"checkpoint-writer-{record['step']}", daemon=True)
            self.thread.start()
        else:
            self._complete(record, complete)
        record["blocked"] = time.perf_counter() - record["started"]

    @contextlib.contextmanager
    def timed(self, record: Dict[str, float], phase: str):
        """Adds the seconds inside to record[phase] (also when it raises: a failed write's time is seen)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            record[phase] = record.get(phase, 0.0) + time.perf_counter() - started

    def wait(self) -> None:
        """Until the checkpoint in flight is complete; raises its failure."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise RuntimeError(f"writing a checkpoint in the background failed: {type(failure).__name__}: "
                               f"{failure}") from failure

    def close(self, failing: bool = False) -> None:
        """At the end of the training function: the checkpoint in flight is completed (a failed run keeps its last
        checkpoint). While another exception propagates (`failing`), this one's own failure is only logged."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001
            if not failing:
                raise
            logger.exception("checkpoint: the one in flight could not be completed")

    def figures(self) -> Dict[str, Any]:
        """Seconds per checkpoint and phase (rank 0's: the final metrics' checkpoint/*): blocked (the training
        loop's time in the checkpoint, waiting for the previous one included), wait (that wait: the previous one
        was not complete yet, checkpoints come faster than the background writes them), save (DeepSpeed's
        save_checkpoint: writing the shards, or staging them), write (the staged shards to files, in the
        background), checksum (and the marker), publish (ray.train.report: Ray's copy into storage; in the driver's
        process, the rename into it), complete (from the start to published)."""
        done = [r for r in self.records if "complete" in r]
        figures: Dict[str, Any] = {f"checkpoint/{phase}_s": [round(r.get(phase, 0.0), 4) for r in done]
                                   for phase in PHASES}
        figures["checkpoint/steps"] = [int(r["step"]) for r in done]
        figures["checkpoint/staged_gib"] = [round(r.get("staged_gib", 0.0), 4) for r in done]
        figures["checkpoint/asynchronous"] = self.asynchronous
        return figures

    # --- the background's side ---------------------------------------------------------------------------------

    def _complete(self, record: Dict[str, float], complete: Callable[[], None], background: bool = False) -> None:
        try:
            complete()
            record["complete"] = time.perf_counter() - record["started"]
        except BaseException as err:  # noqa: BLE001 - raised in the training loop by wait()
            if not background:
                raise
            self.failure = err
        finally:
            self.buffers.release()
