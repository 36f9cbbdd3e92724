"""Checkpoint storage given as a URI (cluster.storage_path=s3://..., gs://..., file://...): finding, checking and
verifying checkpoints read their markers, sizes and checksums through pyarrow's filesystem layer, as Ray Train writes
them, and hand back URIs that resume= takes.

Two stores that need no network: file:// (pyarrow's LocalFileSystem, reached through the URI path), and an
in-memory object store (fsspec's memory filesystem behind pyarrow.fs.PyFileSystem) whose paths are on no disk
(/bucket/...), so that anything still reading the storage with os.path, open() or glob fails here. That store lives
in one process: it stands in for an object store in these tests only, not across Ray workers (each would get its own).
"""

from __future__ import annotations

import json
import shutil

import pyarrow.fs
import pytest

import orchestrator.checkpoint as checkpoint
from orchestrator.checkpoint import (
    METRICS_ONLY,
    check_checkpoint,
    check_storage,
    checkpoint_info,
    copy_out,
    join,
    metrics_only,
    newest_complete_checkpoint,
    read_markers,
    resolve_resume,
)
from orchestrator.errors import UserError
from orchestrator.run_identity import run_storage, written_by
from tests.unit.test_bad_input import run_cli
from tests.unit.test_checkpoint import fake_checkpoint, overwrite
from tests.unit.test_run_identity import a_run


@pytest.fixture
def memory_store(monkeypatch):
    """memory://bucket/... → an in-memory filesystem of this process, resolved where pyarrow resolves URIs."""
    from fsspec.implementations.memory import MemoryFileSystem

    store = MemoryFileSystem()
    store.store.clear()
    store.pseudo_dirs.clear()
    store.pseudo_dirs.append("")
    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store))
    real = checkpoint._open_uri

    def open_uri(uri):
        if uri.startswith("memory://"):
            return filesystem, "/" + uri[len("memory://"):].partition("?")[0]  # fsspec's memory paths start at /
        return real(uri)

    monkeypatch.setattr(checkpoint, "_open_uri", open_uri)
    return filesystem


def upload(filesystem, local_dir, path):
    """What Ray Train does with a reported checkpoint directory: copy it to (filesystem, path)."""
    filesystem.create_dir(path)
    pyarrow.fs.copy_files(str(local_dir), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=filesystem)


def test_join_keeps_a_uris_query_at_the_end():
    assert join("s3://bucket/ckpt?region=eu-west-1", "legal", "run") == "s3://bucket/ckpt/legal/run?region=eu-west-1"
    assert join("file:///tmp/store/", "legal") == "file:///tmp/store/legal"
    assert join("/tmp/store", "legal") == "/tmp/store/legal"


def test_a_file_uri_storage_finds_checks_and_resumes_checkpoints(tmp_path):
    store = tmp_path / "store" / "legal" / "run-1"
    fake_checkpoint(store, "checkpoint_a", 5)
    fake_checkpoint(store, "checkpoint_b", 10)
    fake_checkpoint(store, "checkpoint_c", 15, ranks=[0])  # cut short
    uri = f"file://{tmp_path / 'store'}"
    run = a_run(tmp_path, **{"cluster.storage_path": uri})
    assert run_storage(run, "run-1") == f"{uri}/legal/run-1"
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint_c"):
        info = resolve_resume("auto", str(tmp_path / "runs" / "legal" / "x"), run_storage(run, None))
    assert info.step == 10 and info.path == f"{uri}/legal/run-1/checkpoint_b"  # named as the storage is
    named = f"{uri}/legal/run-1/checkpoint_a"
    assert resolve_resume(named, str(tmp_path), "").path == named  # a URI in, the same URI out (resume= takes it)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(f"{uri}/legal/run-1/checkpoint_c", str(tmp_path), "")
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(f"{uri}/legal/nothing", str(tmp_path), "")
    overwrite(store / "checkpoint_a")
    with pytest.raises(UserError, match="corrupted checkpoint: .*checkpoint_a/deepspeed/zero/.* does not match"):
        resolve_resume(named, str(tmp_path), "")


def test_an_object_store_checkpoint_is_checked_through_its_filesystem_only(tmp_path, memory_store):
    """Paths in the store are not paths of this machine: markers, sizes and checksums are read through pyarrow."""
    local = fake_checkpoint(tmp_path / "local", "checkpoint_x", 7)
    for marker in (local / "complete").glob("*.json"):
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "run_id": "run-1"}))
    (local / "hf").mkdir()
    (local / "hf" / "config.json").write_text("{}")
    upload(memory_store, local, "/bucket/ckpt/legal/run-1/checkpoint_x")
    shutil.rmtree(tmp_path / "local")  # nothing of it left on this machine
    uri = "memory://bucket/ckpt/legal/run-1/checkpoint_x"

    assert checkpoint_info(uri).step == 7 and checkpoint_info(uri).path == uri
    assert len(read_markers(uri)[0]) == 2 and written_by(uri) == "run-1" and not metrics_only(uri)
    assert newest_complete_checkpoint(["memory://bucket/ckpt/legal"]).path == uri
    ray_checkpoint = checkpoint.as_checkpoint(uri)  # what a restart hands Ray: the same filesystem and path
    assert ray_checkpoint.filesystem is memory_store and checkpoint_info(ray_checkpoint).step == 7
    # every rank of a node builds its own; they download into one directory, the same for all
    download = ray_checkpoint._get_temporary_checkpoint_dir()
    assert checkpoint.as_checkpoint(uri)._get_temporary_checkpoint_dir() == download
    with ray_checkpoint.as_directory() as directory:  # what checkpoint.restore reads a URI's checkpoint from
        assert directory == download and checkpoint_info(directory).step == 7
    copy_out(uri, "hf", str(tmp_path / "export"))
    assert (tmp_path / "export" / "config.json").read_text() == "{}"

    # same size, other bytes: the checksum read through the store catches it
    shard = "/bucket/ckpt/legal/run-1/checkpoint_x/deepspeed/zero/zero_pp_rank_1_mp_rank_00_model_states.pt"
    with memory_store.open_input_stream(shard) as handle:
        data = bytearray(handle.read())
    data[10:14] = b"\xde\xad\xbe\xef"
    with memory_store.open_output_stream(shard) as handle:
        handle.write(bytes(data))
    checkpoint._checksums.clear()
    info, why = check_checkpoint(uri)
    assert info is None and "zero_pp_rank_1" in why and "does not match the checksum" in why
    assert check_checkpoint(uri, verify=False)[0].step == 7  # sizes alone cannot tell
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint"):
        assert newest_complete_checkpoint(["memory://bucket/ckpt"]) is None

    # a rank's file cut short, and a metrics-only final report
    with memory_store.open_output_stream(shard) as handle:
        handle.write(bytes(data[:100]))
    assert check_checkpoint(uri) == (None, checkpoint.INCOMPLETE)
    memory_store.create_dir("/bucket/ckpt/legal/run-1/checkpoint_y")
    with memory_store.open_output_stream(f"/bucket/ckpt/legal/run-1/checkpoint_y/{METRICS_ONLY}") as handle:
        handle.write(b'{"step": 9}')
    assert metrics_only("memory://bucket/ckpt/legal/run-1/checkpoint_y")


def test_a_storage_uri_pyarrow_cannot_open_is_refused_naming_the_key(tmp_path):
    run = a_run(tmp_path, **{"cluster.storage_path": "nosuch://bucket/ckpt"})
    with pytest.raises(UserError, match=r"^cluster.storage_path=nosuch://bucket/ckpt: pyarrow's filesystem layer "
                                        r"cannot open it \(.*\); give a path every node sees, or a URI such as s3://"):
        check_storage(run)
    relative = a_run(tmp_path, **{"cluster.storage_path": "store"})
    check_storage(relative)  # a relative path: the workers run elsewhere, so it is made absolute here
    assert relative.cluster.storage_path.startswith("/") and relative.cluster.storage_path.endswith("/store")


def test_the_cli_stops_on_a_storage_uri_pyarrow_cannot_open_before_ray_starts(tmp_path, monkeypatch, capsys):
    code, stderr = run_cli(["cluster.storage_path=nosuch://bucket/ckpt", "dry_run=true", "cluster.gpus=0",
                            "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2, stderr
    assert stderr.startswith("error: cluster.storage_path=nosuch://bucket/ckpt: pyarrow's filesystem layer cannot "
                             "open it"), stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
