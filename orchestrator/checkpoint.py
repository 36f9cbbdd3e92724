"""Sharded DeepSpeed checkpoints through Ray Train, resume, and the consolidated Hugging Face export.

Every rank writes its own ZeRO-3 shard, its RNG state and, last, a completion marker into a local
directory and hands it to `ray.train.report`; Ray merges the ranks' files into one checkpoint under the
run's storage path, registers it once every rank has reported, and keeps the newest K. A checkpoint on
disk counts as complete only when every rank's marker is there: one cut short by a crash (a missing
marker, shard or metadata file) is skipped with a warning when resuming. Each marker also holds a CRC-32 of every
file of its rank, which resuming verifies: a checkpoint whose bytes changed afterwards (same size, overwritten) is
skipped the same way, or refused when resume= names it.
The export gathers the full weights onto rank 0, which alone writes safetensors + config + tokenizer.

A ZeRO-3 checkpoint resumes on another number of workers than wrote it (`restore`): its shards are converted to
DeepSpeed's universal checkpoint format (one file per parameter for the fp32 weights and each Adam moment) in a
node-local temporary directory, which every rank then loads its own new partition from (the optimizer's step count
included); the learning-rate scheduler and the client state come from rank 0's model states as usual. The driver
keeps the checkpoint's global batch (keep_resumed_global_batch, check_resume_matches): more or fewer accumulation
steps per worker.

The storage (cluster.storage_path) is a path every node sees or a URI of a filesystem pyarrow opens (s3://, gs://,
hdfs://, file://), resolved as Ray Train resolves it (pyarrow.fs.FileSystem.from_uri). Markers travel with the
checkpoint (Ray uploads the ranks' directories); finding, checking and verifying a checkpoint read them, the sizes
(one listing) and the checksums (every byte) where the checkpoint is, through the same filesystem (`Place`); loading
one from a URI goes through Ray's Checkpoint.as_directory (a node-local download; a file:// URI is read in place).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow.fs
import ray.train
import torch

from orchestrator.config import Strategy
from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.checkpoint_writer import CheckpointWriter
    from orchestrator.in_process_storage import InProcessStorage

DEEPSPEED_DIR = "deepspeed"  # inside a checkpoint: every rank's ZeRO shards
EXPORT_DIR = "hf"  # inside the final checkpoint: the consolidated Hugging Face model
MARKER_DIR = "complete"  # rank_<r>.json per rank, written after everything else of that rank
RNG_DIR = "rng"  # rank_<r>.pt: Python, NumPy and torch (CPU and CUDA) generator states
TAG = "zero"
METRICS_ONLY = "metrics_only.json"  # a final report without weights (trainer.save_final=false)
SHARD_SIZE = "5GB"  # safetensors files of at most this size: easier to download, mmap and serve
CHECKSUM = "crc32"  # the marker's key for its files' checksums (markers written before it have none)
CHUNK = 1 << 20  # bytes read at a time while checksumming
UNIVERSAL_DIR = "orchestrator-universal"  # under the node's TMPDIR: a checkpoint converted for another world size
RESHARDABLE = (Strategy.full, Strategy.full_offload)  # strategies whose checkpoints resume on other worker counts


def file_checksum(path: str, filesystem: Optional[pyarrow.fs.FileSystem] = None) -> str:
    """CRC-32 of a file (on `filesystem`, else this machine's), read 1 MiB at a time, as 8 hex digits. It catches
    overwritten or flipped bytes (not tampering: it is no cryptographic hash), at the cost of one more read of every
    byte saved and resumed.
    Cost: 0.19 s per GiB (5.3 GiB/s) on the 2-core AMD EPYC CPU machine, a 1 GiB file in the page cache (as
    after a save; a cold read from storage adds the disk's time), one core per rank:
      python -c "import os,time;from orchestrator.checkpoint import file_checksum as c;p='/var/tmp/g';\
      open(p,'wb').write(os.urandom(1<<30));c(p);t=time.perf_counter();c(p);print(time.perf_counter()-t,'s/GiB')"
    The same loop there: blake2b 0.83 s/GiB, sha256 0.54, md5 1.25, adler32 0.31, reading alone 0.04
    (xxhash's xxh3 0.05, but only wandb installs it).
    """
    value = 0
    with open(path, "rb") if filesystem is None else filesystem.open_input_stream(path) as handle:
        while chunk := handle.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


_checksums: Dict[Tuple[Any, ...], str] = {}  # (path, inode, size, mtime) → checksum, this process


def _verified_checksum(file: "Place") -> str:
    """Once per file and version in a process (a restart looks at the same checkpoint twice, restarts.py). Files
    changed in the last seconds are not remembered: their mtime may not yet tell the next change from this one.
    In an object store the key is the object's path, size and modification time (no inode)."""
    if file.local:
        stat = os.stat(file.path)
        key: Tuple[Any, ...] = (os.path.realpath(file.path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        modified = stat.st_mtime
    else:
        info = file.info()
        key = (file.fs.type_name, file.path, info.size, info.mtime_ns)
        modified = info.mtime.timestamp() if info.mtime is not None else time.time()
    if key in _checksums:
        return _checksums[key]
    value = file_checksum(file.path) if file.local else file_checksum(file.path, file.fs)
    if time.time() - modified > 2:
        if len(_checksums) > 4096:
            _checksums.clear()
        _checksums[key] = value
    return value


def save_and_report(engine, step: int, metrics: Dict[str, Any], client_state: Dict[str, Any],
                    export: Optional[tuple] = None, identity: Optional[Dict[str, Any]] = None,
                    writer: Optional["CheckpointWriter"] = None, storage: Optional["InProcessStorage"] = None) -> None:
    """Collective: all ranks call it. `client_state` (step, history) travels with rank 0's shard.
    `export=(model, tokenizer, strategy, peft config)` adds the consolidated Hugging Face model.
    `identity` (run id, strategy, learning-rate schedule: Recipe.identity) goes into every rank's marker, where the
    driver reads it without loading a shard (check_resume_matches) and a restart tells its own run's checkpoints.
    `writer` (the worker's checkpoint_writer.CheckpointWriter) times the phases and, where asynchronous
    (trainer.async_checkpoint) and there is no export, takes the shards into host memory here and leaves writing
    them, the checksums, the marker and the report to its background thread; without one, all happens here.
    `storage`: the recipe runs in the driver's process (cluster.in_process), where Ray Train stores no checkpoint:
    it is written beside the run's storage and put there by publish (in_process_storage.py)."""
    from orchestrator.checkpoint_writer import CheckpointWriter

    writer = writer or CheckpointWriter(asynchronous=False)
    record = writer.begin(step)  # waits for the checkpoint in flight: reports stay in order, one snapshot at a time
    rank, world_size = engine.global_rank, _world_size()
    staging_dir = storage.staging_dir() if storage is not None else None  # None: the node's temporary directory
    directory = tempfile.mkdtemp(prefix="orchestrator-checkpoint-", dir=staging_dir)
    try:
        with writer.staged(engine, record, background=export is None) as staging:
            engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=TAG,
                                   client_state={**client_state, "step": step})
        if export is not None:
            export_hf(engine, *export, os.path.join(directory, EXPORT_DIR))
        os.makedirs(os.path.join(directory, RNG_DIR))
        torch.save(rng_state(), os.path.join(directory, RNG_DIR, f"rank_{rank}.pt"))
        # the global batch (rows per optimizer step): a resume on another number of workers keeps it
        batch = {"global_batch_size": engine.train_batch_size()} if hasattr(engine, "train_batch_size") else {}
        marker = {**(identity or {}), **batch, "step": step, "world_size": world_size, "rank": rank}
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise

    def complete() -> None:  # the directory written, marked last, then published; no collective in here
        try:
            with writer.timed(record, "write"):
                staging.write()
            with writer.timed(record, "checksum"):
                write_marker(directory, marker)
            with writer.timed(record, "publish"):
                publish(directory, metrics, storage)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    writer.submit(record, staging, complete)


def write_marker(directory: str, marker: Dict[str, Any]) -> None:
    """This rank's completion marker, after everything else of it: it lists the rank's files with their sizes (a
    copy cut short cannot pass for complete) and their checksums (nor one whose bytes changed since)."""
    paths = {os.path.relpath(os.path.join(root, name), directory): os.path.join(root, name)
             for root, _, names in os.walk(directory) for name in names}
    files = {name: os.path.getsize(file) for name, file in paths.items()}
    checksums = {name: file_checksum(file) for name, file in paths.items()}
    os.makedirs(os.path.join(directory, MARKER_DIR))
    with open(os.path.join(directory, MARKER_DIR, f"rank_{marker['rank']}.json"), "w", encoding="utf-8") as handle:
        json.dump({**marker, "files": files, CHECKSUM: checksums}, handle)


def publish(directory: str, metrics: Dict[str, Any], storage: Optional["InProcessStorage"] = None) -> None:
    """A complete checkpoint directory of this rank into the run's storage: Ray copies it there (every rank's into
    one checkpoint) and registers it once every rank has reported; in the driver's process, `storage` moves it there
    and Ray is handed the stored one. The caller removes `directory` afterwards (if it is still there)."""
    checkpoint = storage.persist(directory) if storage is not None else ray.train.Checkpoint.from_directory(directory)
    ray.train.report(metrics, checkpoint=checkpoint)


def report_metrics_only(metrics: Dict[str, Any], rank: int) -> None:
    """trainer.save_final=false: Ray Train hands the driver the metrics of reported checkpoints only, so
    rank 0 reports a checkpoint that holds just them (resume skips it: it has no weights)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, METRICS_ONLY), "w", encoding="utf-8") as handle:
            json.dump({"step": metrics.get("step")}, handle)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def metrics_only(path: "Location") -> bool:
    """A report_metrics_only checkpoint: metrics, no weights; nothing to resume or restart from."""
    return Place.of(path).child(METRICS_ONLY).is_file()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> Dict[str, Any]:
    """Generator states as tensors, numbers and strings only, so that loading needs no unpickling of code."""
    version, mt_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_hf(engine, model, tokenizer, strategy: Strategy, peft_config, directory: str) -> None:
    from orchestrator.adapters import export_adapted

    if Strategy(strategy).uses_adapters:
        with gathered(engine, model):  # adapters and base complete on every rank for the merge
            if engine.global_rank == 0:
                export_adapted(model, strategy, peft_config, directory)
                tokenizer.save_pretrained(directory)
        return
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0 only
    if engine.global_rank == 0:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(directory)


def gathered(engine, model):
    """ZeRO-3: gather every partitioned parameter (collective); without ZeRO: nothing to do."""
    if not hasattr(engine, "zero_optimization_stage") or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    # modifier_rank=None: the merge on rank 0 is written out, not kept, so nothing needs broadcasting back
    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def restore(engine, directory: Optional[str]) -> Dict[str, Any]:
    """Load model, optimizer, scheduler and this rank's RNG state from a local directory or a checkpoint's URI;
    returns the client state saved with the checkpoint (its "step" is where to continue), or {} without one. A ZeRO-3
    checkpoint written by another number of workers is converted and loaded as a universal checkpoint
    (load_resharded); the client state then also holds "resharded": {"from": saved workers, "to": these,
    "seconds": the conversion and load}."""
    if directory is None:
        return {}
    if is_uri(directory):  # resume= a URI (an object store): read from a node-local copy, as Ray's restarts are
        with as_checkpoint(directory).as_directory() as local:
            return restore(engine, local)
    deepspeed_dir = os.path.join(directory, DEEPSPEED_DIR)
    saved_workers, workers = saved_zero_world_size(deepspeed_dir), _world_size()
    if saved_workers and saved_workers != workers and _is_zero3(engine):
        client_state = load_resharded(engine, deepspeed_dir, saved_workers)
    else:
        _, client_state = engine.load_checkpoint(deepspeed_dir, tag=TAG)
    rng_file = os.path.join(directory, RNG_DIR, f"rank_{engine.global_rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more workers than saved the checkpoint
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def saved_zero_world_size(deepspeed_dir: str) -> int:
    """How many data-parallel ranks wrote a ZeRO checkpoint (its optimizer shards), 0 for none (PlainEngine's)."""
    return len(glob.glob(os.path.join(deepspeed_dir, TAG, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def _is_zero3(engine) -> bool:
    return hasattr(engine, "zero_optimization_stage") and engine.zero_optimization_stage() == 3


def load_resharded(engine, deepspeed_dir: str, saved_workers: int) -> Dict[str, Any]:
    """Collective. Resume a ZeRO-3 checkpoint of `saved_workers` ranks on this world size: local rank 0 of every
    node converts it with DeepSpeed's ds_to_universal into a directory of that node's TMPDIR (12 bytes per
    parameter: fp32 weights, exp_avg, exp_avg_sq), then every rank loads its new partition of weights and Adam
    moments from there (engine.load_checkpoint with the universal format), and the directory is removed. Returns
    the client state, with "resharded" added."""
    import torch.distributed as dist

    started = time.perf_counter()
    source = os.path.join(deepspeed_dir, TAG)
    # the same name on every rank of this process group (its rendezvous address), another for another run resuming
    # the same checkpoint on this node at the same time (sweep trials)
    group = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    digest = hashlib.sha1(f"{os.path.realpath(source)}|{group}".encode()).hexdigest()[:16]
    universal = os.path.join(tempfile.gettempdir(), UNIVERSAL_DIR, digest)
    converts = _local_rank() == 0
    failure = ""
    if converts:
        try:
            shutil.rmtree(universal, ignore_errors=True)  # what an earlier attempt may have left
            to_universal(source, os.path.join(universal, TAG))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait at the next collective
            failure = f"{type(err).__name__}: {err}"
    _all_ranks_agree(engine, not failure, f"converting {source} (written by {saved_workers} workers) to DeepSpeed's "
                                          f"universal checkpoint format failed on a node: {failure or 'see its log'}")
    try:
        engine._config.load_universal_checkpoint = True  # read only by load_checkpoint: the format of this load
        _, client_state = engine.load_checkpoint(universal, tag=TAG)
    finally:
        engine._config.load_universal_checkpoint = False
        dist.barrier()  # every rank of the node has read the converted files
        if converts:
            shutil.rmtree(universal, ignore_errors=True)
    return {**client_state, "resharded": {"from": saved_workers, "to": _world_size(),
                                          "seconds": round(time.perf_counter() - started, 3)}}


def to_universal(source: str, destination: str) -> None:
    """DeepSpeed's ds_to_universal (the script's main) in this process: a ZeRO-3 tag directory → a universal one,
    plus `latest_universal` beside it. One extraction and one merge process: no process pool inside a Ray worker."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=destination, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines; failures still raise
        ds_to_universal.main(args)


def _all_ranks_agree(engine, ok: bool, message: str) -> None:
    """Collective: raise `message` on every rank unless every rank is ok."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=getattr(engine, "device", "cpu"))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not flag.item():
        raise RuntimeError(message)


def _local_rank() -> int:
    try:
        return ray.train.get_context().get_local_rank()
    except Exception:  # noqa: BLE001 - outside a Ray Train worker
        return int(os.environ.get("LOCAL_RANK", 0))


# --- where checkpoints are: a path every node sees, or a URI of a filesystem pyarrow opens -------------------

Location = Union[str, "ray.train.Checkpoint"]  # a local path, a URI (s3://, gs://, file://), or Ray's checkpoint


def is_uri(location: str) -> bool:
    """A URI (scheme://...), which pyarrow's filesystem layer resolves as Ray Train does; else a local path."""
    return "://" in str(location)


def _open_uri(uri: str) -> Tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path on it) of a URI, as Ray Train resolves RunConfig(storage_path) (storage.get_fs_and_path)."""
    return pyarrow.fs.FileSystem.from_uri(uri)


def join(location: str, *parts: str) -> str:
    """`parts` under a local path or a URI (a URI's ?query stays at the end: s3://b/p?region=x)."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    base, sep, query = location.partition("?")
    return posixpath.join(base, *parts) + sep + query


@dataclass(frozen=True)
class Place:
    """A file or directory of the checkpoint storage: its filesystem, its path there, and its name (a local path or a
    URI, as the user gave the storage: what messages show and resume= takes back)."""

    fs: Any
    path: str
    name: str

    @classmethod
    def of(cls, location: Union[Location, "Place"]) -> "Place":
        if isinstance(location, Place):
            return location
        if isinstance(location, ray.train.Checkpoint):  # Ray's own: (filesystem, path), as it persisted it
            fs, path = location.filesystem, location.path
            local = isinstance(fs, pyarrow.fs.LocalFileSystem)
            return cls(fs, path, path if local else f"{fs.type_name}://{path.lstrip('/')}")
        location = str(location)
        if is_uri(location):
            fs, path = _open_uri(location)
            return cls(fs, path, location)
        return cls(pyarrow.fs.LocalFileSystem(), os.path.abspath(location), location)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def child(self, *parts: str) -> "Place":
        return Place(self.fs, posixpath.join(self.path, *parts), join(self.name, *parts))

    def info(self) -> pyarrow.fs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_dir(self) -> bool:
        return self.info().type == pyarrow.fs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pyarrow.fs.FileType.File

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as handle:
            return handle.read().decode("utf-8")

    def listing(self, recursive: bool = False) -> List[pyarrow.fs.FileInfo]:
        """What is under it (nothing where it does not exist)."""
        return self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True, recursive=recursive))

    def below(self, info: pyarrow.fs.FileInfo) -> "Place":
        """The place of an entry of its listing."""
        relative = posixpath.relpath(info.path.lstrip("/"), self.path.lstrip("/").rstrip("/") or ".")
        return self.child(relative)


def as_checkpoint(location: Location) -> "ray.train.Checkpoint":
    """Ray's Checkpoint of a local path or URI, on the filesystem resolved here: as_directory() is the directory
    itself on a local filesystem (file:// included), else a download to a node-local temporary directory."""
    if isinstance(location, ray.train.Checkpoint):
        return location
    place = Place.of(location)
    checkpoint = ray.train.Checkpoint(place.path, filesystem=place.fs)  # this filesystem: no second resolution
    if not place.local and hasattr(checkpoint, "_uuid"):
        # Ray downloads into a temporary directory named by the Checkpoint object's random id, shared by the processes
        # of a node that hold the same object (its file locks let one download and the last one delete it). Named by
        # the checkpoint instead, the ranks of a node that each build one here share one download, and the same local
        # path (load_resharded's conversion directory is named by it)
        checkpoint._uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"{place.fs.type_name}:{place.path}")
    return checkpoint


def copy_out(checkpoint: Location, inside: str, destination: str) -> None:
    """Copy one directory of a checkpoint (the export: EXPORT_DIR) to a local directory; from an object store only
    that directory is downloaded, not the shards."""
    source = Place.of(checkpoint).child(inside)
    if source.local:
        shutil.copytree(source.path, destination, dirs_exist_ok=True)
        return
    os.makedirs(destination, exist_ok=True)
    pyarrow.fs.copy_files(source.path, destination, source_filesystem=source.fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def storage_root(run) -> str:
    """Where Ray Train writes the runs' checkpoints: <root>/<name>/<run id>/checkpoint_* (run_identity.run_storage).
    cluster.storage_path: a path every node sees, or a URI (s3://, gs://, file://...); else the run directory."""
    return run.cluster.storage_path or os.path.join(run.run_dir, "checkpoints")


SCHEMES = "s3://bucket/path, gs://bucket/path, hdfs://host/path, file:///absolute/path"


def check_storage(run) -> None:
    """On the driver, before Ray starts: cluster.storage_path is an absolute path or a URI that pyarrow's filesystem
    layer opens (the one Ray Train writes through), else a UserError naming it. A relative path is made absolute
    (the workers run in another working directory)."""
    location = run.cluster.storage_path
    if not location:
        return
    if not is_uri(location):
        run.cluster.storage_path = os.path.abspath(os.path.expanduser(location))
        return
    try:
        _open_uri(location)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError...) are the user's to fix
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cluster.storage_path={location}: pyarrow's filesystem layer cannot open it ({reason}); "
                        f"give a path every node sees, or a URI such as {SCHEMES}") from None


# --- finding a checkpoint to resume from ---------------------------------------------------------------

@dataclass
class CheckpointInfo:
    path: str  # a local path or a URI
    step: int


INCOMPLETE = "a rank did not finish writing it"


def checkpoint_info(path: Location) -> Optional[CheckpointInfo]:
    """The checkpoint's step if every rank finished writing it and its files are as written, else None."""
    return check_checkpoint(path)[0]


def check_checkpoint(path: Location, verify: bool = True) -> Tuple[Optional[CheckpointInfo], str]:
    """(the checkpoint, "") if complete and (with verify) every file matches its rank's checksum, else
    (None, why not). Markers without checksums (written before they were added) are checked by size only.
    `path`: a local path, a URI or Ray's Checkpoint; the files are read where it is (an object store included)."""
    place = Place.of(path)
    info, markers, why = _complete(place)
    if info is None:
        return None, why
    if verify:
        corrupted = _corrupted_file(place, markers)
        if corrupted:
            return None, corrupted
    return info, ""


def _complete(place: Place) -> Tuple[Optional[CheckpointInfo], List[Dict[str, Any]], str]:
    """Every rank's marker there, for one step, and every file they list at its size: (the checkpoint, the markers,
    "") or (None, [], why not). A marker that is not what save_and_report writes is a reason, not a traceback."""
    contents, why = read_markers(place)
    if why:
        return None, [], why
    world_size, step = contents[0]["world_size"], contents[0]["step"]
    ranks = {c["rank"] for c in contents}
    if ranks != set(range(world_size)) or any(c["step"] != step for c in contents):
        return None, [], INCOMPLETE
    sizes = _file_sizes(place)  # one listing: one request to an object store, not one per file
    for content in contents:
        for name, size in content["files"].items():
            if sizes.get(posixpath.normpath(name)) != size:
                return None, [], INCOMPLETE
    return CheckpointInfo(place.name, step), contents, ""


def _file_sizes(place: Place) -> Dict[str, int]:
    """Every file under a checkpoint, by its path relative to it ("/"-separated), with its size in bytes."""
    base = place.path.lstrip("/").rstrip("/")
    return {posixpath.relpath(info.path.lstrip("/"), base): info.size for info in place.listing(recursive=True)
            if info.type == pyarrow.fs.FileType.File}


def read_markers(path: Location) -> Tuple[List[Dict[str, Any]], str]:
    """Every rank's marker of a checkpoint, parsed and checked for the keys save_and_report writes: (markers, "") or
    ([], why not): none there yet (INCOMPLETE), or one that cannot be read, is not JSON or lacks a key."""
    folder = Place.of(path).child(MARKER_DIR)
    names = sorted(posixpath.basename(info.path) for info in folder.listing()
                   if info.type == pyarrow.fs.FileType.File)
    files = [folder.child(name) for name in names if name.startswith("rank_") and name.endswith(".json")]
    if not files:
        return [], INCOMPLETE
    contents = []
    for file in files:
        try:
            content = json.loads(file.read_text())
        except OSError as err:
            return [], f"its marker {file.name} cannot be read ({err.strerror or err})"
        except ValueError:
            return [], f"its marker {file.name} is not valid JSON (cut short, or changed since it was written)"
        problem = _malformed(content)
        if problem:
            return [], f"its marker {file.name} is malformed ({problem})"
        contents.append(content)
    return contents, ""


def _malformed(content: Any) -> str:
    """What is wrong with a parsed marker, or "" if it has the shape save_and_report writes."""
    if not isinstance(content, dict):
        return f"a JSON {type(content).__name__}, not an object"

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for key in ("step", "world_size", "rank"):
        if not integer(content.get(key)):
            return f"{key}: expected an integer >= 0, found {content.get(key)!r}"
    files = content.get("files")
    if not isinstance(files, dict) or not all(isinstance(n, str) and integer(v) for n, v in files.items()):
        return "files: expected an object of file name -> size in bytes"
    checksums = content.get(CHECKSUM, {})
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        return f"{CHECKSUM}: expected an object of file name -> checksum"
    return ""


def _corrupted_file(place: Place, markers: List[Dict[str, Any]]) -> str:
    """Why the first file whose bytes differ from what its rank recorded fails, or "" if none does."""
    for content in markers:
        for name, expected in content.get(CHECKSUM, {}).items():
            file = place.child(name)
            if not file.is_file():
                return f"{file.name} is listed by rank {content['rank']}'s marker but missing"
            if _verified_checksum(file) != expected:
                return (f"{file.name} does not match the checksum rank {content['rank']} recorded when it wrote it "
                        "(its bytes changed since)")
    return ""


def _checkpoints_under(location: str) -> List[Tuple[Tuple[str, str], Place, int]]:
    """Every checkpoint_* directory at any depth under a local path or URI: (what tells it from the others, its place,
    its modification time in ns, 0 where the store gives none). Found under a URI, it is named by a URI."""
    root = Place.of(location)
    found = []
    for info in root.listing(recursive=True):
        if info.type == pyarrow.fs.FileType.Directory and posixpath.basename(info.path).startswith("checkpoint_"):
            place = root.below(info)
            # one search root may lie inside another, or be reached through a link: each checkpoint once
            key = (place.fs.type_name, os.path.realpath(place.path) if place.local else place.path)
            if place.local and not is_uri(location):
                place = Place(place.fs, key[1], key[1])
            found.append((key, place, info.mtime_ns or 0))
    return found


def newest_complete_checkpoint(search_dirs: List[str]) -> Optional[CheckpointInfo]:
    """The complete checkpoint with the highest step under any of `search_dirs` (local paths or URIs; newest on a
    tie); incomplete ones are skipped with a warning, and so are corrupted ones. Checksums are verified newest first,
    down to the first that passes: older checkpoints are not read."""
    found: List[Tuple[CheckpointInfo, int]] = []
    # one search root may lie inside another (the default storage is inside the runs directory): each once
    places = {key: (place, mtime) for directory in search_dirs for key, place, mtime in _checkpoints_under(directory)}
    for _, (place, mtime) in sorted(places.items()):
        if metrics_only(place):
            continue
        info, why = check_checkpoint(place, verify=False)
        if info is None:
            warnings.warn(f"skipping incomplete checkpoint {place.name} ({why})" if why == INCOMPLETE else
                          f"skipping corrupted checkpoint {place.name}: {why}", stacklevel=2)
            continue
        found.append((info, mtime))
    for info, _ in sorted(found, key=lambda pair: (pair[0].step, pair[1]), reverse=True):
        verified, why = check_checkpoint(info.path)
        if verified is not None:
            return verified
        warnings.warn(f"skipping corrupted checkpoint {info.path}: {why}", stacklevel=2)
    return None


def resolve_resume(resume: Optional[str], run_dir: str, storage_root: str) -> Optional[CheckpointInfo]:
    """resume=null → None; resume=auto → the newest complete checkpoint of this experiment (earlier runs
    of the same name, which share the parent of run_dir, or storage_root); resume=<dir or URI> → that checkpoint,
    or the newest complete one inside that run directory."""
    if not resume:
        return None
    if resume == "auto":
        runs_of_this_name = os.path.dirname(os.path.abspath(run_dir))
        return newest_complete_checkpoint([runs_of_this_name, storage_root])
    try:
        exists = Place.of(resume).is_dir()
    except Exception as err:  # noqa: BLE001 - a URI pyarrow cannot open
        raise UserError(f"resume={resume} cannot be opened ({(str(err).splitlines() or [''])[0]}): give a "
                        "checkpoint or run directory, a checkpoint's URI, or resume=auto") from None
    if not exists:
        raise UserError(f"resume={resume} does not exist: give a checkpoint or run directory, or resume=auto")
    if posixpath.basename(resume.partition("?")[0].rstrip("/")).startswith("checkpoint_"):
        info, why = check_checkpoint(resume)
        if why == INCOMPLETE:
            raise UserError(f"resume={resume} is an incomplete checkpoint ({INCOMPLETE}); "
                            "give an earlier one, or resume=auto to pick the newest complete one")
        if info is None:
            raise UserError(f"resume={resume} is a corrupted checkpoint: {why}; give an earlier one, "
                            "or resume=auto to pick the newest intact one")
        return info
    info = newest_complete_checkpoint([resume])
    if info is None:
        raise UserError(f"resume={resume} holds no complete checkpoint")
    return info


def keep_resumed_global_batch(run, plan) -> bool:
    """On the driver, after the first plan: a resumed run keeps the global batch (rows per optimizer step) its
    checkpoint was trained with, on however many workers it runs now, by more or less accumulation: the data order
    (GlobalBatchSchedule) and the loss curve go on as the same run's. Where the plan's global batch differs and
    trainer.global_batch_size is unset, it is set to the checkpoint's and True is returned: plan again, and the
    planner derives grad_accum = global batch / (workers x micro-batch). trainer.global_batch_size set to another
    value, or a global batch that workers x micro-batch does not divide, is a UserError saying what to set.
    Nothing to do for markers without the global batch (written before markers recorded it), for another strategy
    or for a worker count this strategy cannot change (check_resume_matches refuses those)."""
    from orchestrator import console

    saved = _saved_marker(run)
    if saved is None or "global_batch_size" not in saved:
        return False
    batch, saved_workers = saved["global_batch_size"], saved["world_size"]
    strategy = Strategy(plan.strategy).value
    if saved.get("strategy") not in (None, strategy) or (
            saved_workers != plan.num_workers and not _reshardable(saved.get("strategy"), plan.strategy)):
        return False
    if plan.global_batch_size == batch:
        return False
    where = f"resume={run.resume}"
    if run.trainer.global_batch_size is not None:
        raise UserError(f"{where} was trained with a global batch of {batch} rows per optimizer step and this run "
                        f"sets trainer.global_batch_size={run.trainer.global_batch_size}: a resumed run keeps its "
                        f"global batch (its data order and loss curve follow it); resume with "
                        f"trainer.global_batch_size={batch}, or leave it unset")
    workers, micro = plan.num_workers, plan.micro_batch_size
    if batch % (workers * micro):
        fitting = [m for m in range(1, batch // workers + 1) if batch % (workers * m) == 0]
        how = (f"set trainer.micro_batch_size to one of {', '.join(map(str, fitting))}" if fitting else
               f"resume on a number of workers that divides {batch}")
        raise UserError(f"{where} was trained with a global batch of {batch} rows per optimizer step (on "
                        f"{saved_workers} worker(s)), which a resumed run keeps; this run's {workers} worker(s) x "
                        f"trainer.micro_batch_size={micro} = {workers * micro} rows per pass do not divide it: {how}")
    run.trainer.global_batch_size = batch
    console.note(f"resume: keeping the checkpoint's global batch of {batch} rows per step: {workers} worker(s) x "
                 f"micro-batch {micro} x {batch // (workers * micro)} accumulation (it was trained on "
                 f"{saved_workers} worker(s))")
    return True


def _saved_marker(run) -> Optional[Dict[str, Any]]:
    """Rank 0's marker of the checkpoint resume= names (the driver has resolved it), or None."""
    if not run.resume:
        return None
    markers, _ = read_markers(run.resume)
    return markers[0] if markers else None


def _reshardable(saved_strategy: Optional[str], planned: Strategy) -> bool:
    """Whether a checkpoint of this strategy resumes on another number of workers: full fine-tuning under ZeRO-3
    (with or without offload), whose shards DeepSpeed's universal checkpoint format re-partitions. Adapters are
    not: on one worker they train without ZeRO (PlainEngine's own file), and on several, untested."""
    return saved_strategy is not None and Strategy(saved_strategy) in RESHARDABLE and Strategy(planned) in RESHARDABLE


def check_resume_matches(run, plan) -> None:
    """On the driver, before any worker starts: a checkpoint continues with the same strategy, the same
    learning-rate schedule and the same global batch as it was written with, and on the same number of workers
    unless its strategy can change that (full fine-tuning under ZeRO-3: `restore` re-partitions its shards). Its
    markers say which; markers written before they did are not checked. Anything else is a UserError saying what
    to do."""
    from orchestrator.optimization import schedule_of

    saved = _saved_marker(run)
    if saved is None:
        return
    where = f"resume={run.resume}"
    if saved.get("strategy") not in (None, Strategy(plan.strategy).value):
        raise UserError(f"{where} was trained with strategy={saved['strategy']} and this run plans "
                        f"strategy={Strategy(plan.strategy).value}: resume with strategy={saved['strategy']}, or "
                        "start a new run with the other strategy")
    if saved["world_size"] != plan.num_workers:
        how = (f"{saved['world_size']} GPUs in all (cluster.gpus, cluster.nodes)" if plan.use_gpu else
               f"cluster.cpu_workers={saved['world_size']}")
        start = f"{where} was saved by {saved['world_size']} worker(s) and this run plans {plan.num_workers}"
        if not _reshardable(saved.get("strategy"), plan.strategy):
            was = saved.get("strategy")
            raise UserError(f"{start}: a checkpoint of strategy={was or 'unknown (written before markers said)'} "
                            f"resumes only on the number of workers that wrote it (another number of workers is "
                            f"supported for strategy=full and strategy=full_offload), so resume on {how}")
        if "global_batch_size" not in saved:
            raise UserError(f"{start}: its markers were written before they recorded the global batch, which a "
                            f"resume on another number of workers must keep, so resume on {how}")
    if "global_batch_size" in saved and saved["global_batch_size"] != plan.global_batch_size:
        raise UserError(f"{where} was trained with a global batch of {saved['global_batch_size']} rows per optimizer "
                        f"step and this run plans {plan.global_batch_size}: resume with "
                        f"trainer.global_batch_size={saved['global_batch_size']}")
    wanted = schedule_of(run, plan.max_steps)
    if saved.get("schedule") not in (None, wanted):
        was = saved["schedule"]
        changed = ", ".join(f"{key} {was.get(key)} -> {wanted[key]}" for key in wanted if was.get(key) != wanted[key])
        raise UserError(f"{where}: this run's learning-rate schedule differs from the one the checkpoint was trained "
                        f"with ({changed}), and a resumed run keeps the schedule it started with: resume with "
                        f"trainer.max_steps={was.get('total_steps')} and the same optim.lr, optim.warmup_ratio and "
                        "optim.schedule; to train longer, start a new run from a finished run's export "
                        "(model.path=<run_dir>/export)")
