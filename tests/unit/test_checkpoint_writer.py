"""Checkpoints written in the background (orchestrator/checkpoint_writer.py, trainer.async_checkpoint): the host
copy a checkpoint is written from is the state at the save, written to the same bytes; a checkpoint is published
only once its files and marker are written, while the training loop has gone on; a failure in the background is
raised in the training loop; what does not fit the host-memory budget is written at once. No Ray: publish is
replaced by a recorder, the engine is PlainEngine on a tiny module."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
import torch

from orchestrator import checkpoint
from orchestrator.checkpoint import MARKER_DIR, save_and_report
from orchestrator.checkpoint_writer import CheckpointWriter, HostBuffers, Staging, host_copy
from orchestrator.plain_engine import PlainEngine, TorchFiles

DELAY = 1.0  # seconds a slowed file write takes


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def a_state():
    """What DeepSpeed's state dicts hold: views sharing a storage, a Parameter, a tensor with an attribute of its own
    (ZeRO-3's fp32 partitions carry ds_id), an empty placeholder, nested containers and plain values."""
    flat = torch.arange(12, dtype=torch.float32)
    partition = torch.randn(5)
    partition.ds_id = 7
    weight = torch.nn.Parameter(torch.randn(2, 3))
    return {"flat": flat, "views": [flat[:4], flat[4:].view(2, 4)], "partition": partition, "weight": weight,
            "placeholder": torch.empty(0), "history": {"loss": [3.0, 2.5]}, "step": 5, "name": "zero"}


def test_a_host_copy_is_written_as_the_original_and_keeps_the_values_of_the_save():
    state = a_state()
    before = saved_bytes(state)
    copied, nbytes, added = host_copy(state, HostBuffers(), budget=1 << 20)
    assert saved_bytes(copied) == before  # the same storages, shared alike: the same file
    assert nbytes == added == (12 + 5 + 6) * 4
    assert copied["views"][0].untyped_storage()._cdata == copied["flat"].untyped_storage()._cdata
    assert type(copied["weight"]) is torch.nn.Parameter and copied["partition"].ds_id == 7
    # training goes on: the optimizer changes the tensors in place, the loop appends to the history
    state["flat"].add_(1)
    state["partition"].mul_(0)
    with torch.no_grad():
        state["weight"].zero_()
    state["history"]["loss"].append(2.0)
    assert saved_bytes(copied) == before


def test_over_the_budget_or_uncopyable_a_file_is_written_at_once(tmp_path):
    inner = TorchFiles()
    staging = Staging(inner, HostBuffers(), budget=100)
    staging.save({"small": torch.zeros(10)}, str(tmp_path / "small.pt"))  # 40 bytes: staged
    staging.save({"large": torch.zeros(100)}, str(tmp_path / "large.pt"))  # 400 bytes: over the budget
    staging.save({"sparse": torch.zeros(2, 2).to_sparse()}, str(tmp_path / "sparse.pt"))  # not a strided tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.pt", "sparse.pt"]
    assert staging.direct == [str(tmp_path / "large.pt"), str(tmp_path / "sparse.pt")]
    staging.write()
    assert torch.load(tmp_path / "small.pt")["small"].equal(torch.zeros(10))


def test_the_buffers_of_one_checkpoint_serve_the_next_and_cost_no_budget():
    buffers = HostBuffers()
    first = host_copy({"a": torch.randn(100), "b": torch.randn(7)}, buffers, budget=1 << 20)[0]
    pointers = sorted(t.untyped_storage().data_ptr() for t in first.values())
    del first
    buffers.release()  # the checkpoint is written
    buffers.release()  # (and the next one begins)
    second, _, added = host_copy({"a": torch.randn(100), "b": torch.randn(7)}, buffers, budget=0)
    assert sorted(t.untyped_storage().data_ptr() for t in second.values()) == pointers and added == 0
    del second
    buffers.release()
    # one free buffer of 400 bytes serves one of two; a new pinned block is a power of two (PyTorch's host allocator)
    assert buffers.new_bytes([(5 << 30, True), (400, False), (400, False)]) == (8 << 30) + 400


def tiny_engine() -> PlainEngine:
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = PlainEngine(module, optimizer, scheduler, grad_accum=1, grad_clip=0.0, autocast_dtype=None,
                         device=torch.device("cpu"))
    train(engine)
    return engine


def train(engine: PlainEngine) -> None:
    engine.backward(engine(input=torch.ones(2, 8)).sum())
    engine.step()


class Published:
    """Stands in for checkpoint.publish (ray.train.report): what the checkpoint's directory held when it was
    published, and when."""

    def __init__(self):
        self.calls = []

    def __call__(self, directory, metrics, *rest, **named):
        marker = json.loads(open(os.path.join(directory, MARKER_DIR, "rank_0.json")).read())
        sizes = {name: os.path.getsize(os.path.join(directory, name)) if os.path.exists(os.path.join(directory, name))
                 else None for name in marker["files"]}
        state = torch.load(os.path.join(directory, "deepspeed", "zero", "state.pt"), weights_only=True)
        self.calls.append({"at": time.perf_counter(), "marker": marker, "sizes": sizes, "metrics": metrics,
                           "state": state, "thread": threading.current_thread().name})


@pytest.fixture
def slow_files(monkeypatch):
    """Every checkpoint file takes DELAY seconds to write."""
    write = TorchFiles.save

    def slowly(self, state_dict, path):
        time.sleep(DELAY)
        write(self, state_dict, path)

    monkeypatch.setattr(TorchFiles, "save", slowly)


@pytest.fixture
def published(monkeypatch):
    recorder = Published()
    monkeypatch.setattr(checkpoint, "publish", recorder)
    return recorder


def test_a_checkpoint_is_published_only_once_written_while_training_goes_on(slow_files, published):
    engine, writer = tiny_engine(), CheckpointWriter(asynchronous=True)
    weights = engine.module.weight.detach().clone()
    started = time.perf_counter()
    save_and_report(engine, 5, {"step": 5}, {"history": {"loss": [1.0]}}, identity={"run_id": "r"}, writer=writer)
    returned = time.perf_counter()
    assert returned - started < DELAY / 2  # the training loop did not wait for the slowed write
    assert not published.calls  # nor was the checkpoint reported before its file was written
    train(engine)  # training goes on while it is written
    writer.wait()
    [call] = published.calls
    assert call["at"] - started >= DELAY and call["thread"].startswith("checkpoint-writer")
    assert call["marker"]["step"] == 5 and call["marker"]["run_id"] == "r"
    assert all(size == call["marker"]["files"][name] for name, size in call["sizes"].items())  # all there, whole
    assert call["state"]["trainable"]["weight"].equal(weights)  # the weights of step 5, not those trained since
    assert call["state"]["client_state"] == {"history": {"loss": [1.0]}, "step": 5}
    figures = writer.figures()
    assert figures["checkpoint/steps"] == [5] and figures["checkpoint/blocked_s"][0] < DELAY / 2
    assert figures["checkpoint/write_s"][0] >= DELAY and figures["checkpoint/complete_s"][0] >= DELAY


def test_the_next_checkpoint_waits_for_the_one_in_flight(slow_files, published):
    engine, writer = tiny_engine(), CheckpointWriter(asynchronous=True)
    save_and_report(engine, 5, {"step": 5}, {}, writer=writer)
    save_and_report(engine, 10, {"step": 10}, {}, writer=writer)
    assert [c["marker"]["step"] for c in published.calls] == [5]  # published before the next one started
    writer.close()
    assert [c["marker"]["step"] for c in published.calls] == [5, 10]
    figures = writer.figures()
    assert figures["checkpoint/blocked_s"][1] >= DELAY / 2 and figures["checkpoint/wait_s"][1] >= DELAY / 2
    assert figures["checkpoint/wait_s"][0] < DELAY / 2  # the loop waited for step 5's write, not for nothing


def test_async_and_sync_checkpoints_are_the_same_files(published):
    engine = tiny_engine()
    save_and_report(engine, 5, {}, {"history": {}}, writer=CheckpointWriter(asynchronous=False))
    writer = CheckpointWriter(asynchronous=True)
    save_and_report(engine, 5, {}, {"history": {}}, writer=writer)
    writer.close()
    synchronous, asynchronous = (c["marker"]["crc32"] for c in published.calls)
    assert synchronous == asynchronous and any(name.endswith("state.pt") for name in synchronous)


def test_a_synchronous_checkpoint_is_published_before_the_loop_goes_on(slow_files, published):
    engine = tiny_engine()
    started = time.perf_counter()
    save_and_report(engine, 5, {}, {}, writer=CheckpointWriter(asynchronous=False))
    assert time.perf_counter() - started >= DELAY and len(published.calls) == 1
    assert published.calls[0]["thread"] == threading.current_thread().name


def test_a_failed_background_write_publishes_nothing_and_is_raised_in_the_training_loop(monkeypatch, published,
                                                                                         tmp_path):
    monkeypatch.setattr(checkpoint.tempfile, "tempdir", str(tmp_path))

    def no_space(self, state_dict, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchFiles, "save", no_space)
    engine, writer = tiny_engine(), CheckpointWriter(asynchronous=True)
    save_and_report(engine, 5, {}, {}, writer=writer)  # the snapshot is taken; the write fails later
    with pytest.raises(RuntimeError, match="writing a checkpoint in the background failed: OSError.*No space"):
        save_and_report(engine, 10, {}, {}, writer=writer)
    assert not published.calls and not list(tmp_path.iterdir())  # nothing reported, no directory left behind
    writer.close(failing=True)  # nothing in flight any more: nothing to say


def test_close_while_failing_only_logs_the_background_failure(monkeypatch, published, caplog):
    def broken(self, state_dict, path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(TorchFiles, "save", broken)
    writer = CheckpointWriter(asynchronous=True)
    save_and_report(tiny_engine(), 5, {}, {}, writer=writer)
    writer.close(failing=True)  # the run's own exception is the one that propagates
    assert "could not be completed" in caplog.text
