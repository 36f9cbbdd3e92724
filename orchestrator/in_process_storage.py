"""The checkpoints of a run whose recipe runs in the driver's own process (cluster.in_process: launch/in_process.py).

Ray Train's local mode persists nothing: its report only remembers the checkpoint object, and
checkpoint.save_and_report's directory is removed after the report. So the run puts each checkpoint into its storage
itself, where and as Ray Train would (run_identity.run_storage): <storage root>/<name>/<run id>/checkpoint_<date and
time, microseconds>, under the name Ray Train gives it; keeps the newest trainer.keep_checkpoints, as Ray Train's
CheckpointConfig(num_to_keep) does; and reports the stored one, which becomes the Result's checkpoint: the export is
copied from it, and resume= and a restart (restarts.restart_checkpoint) find it as they find Ray's.

On this machine's filesystem (a path, file://) a checkpoint is written in <run storage>/.writing/ and renamed into
place once its marker is written: no copy, and a checkpoint_* directory is complete from the moment it appears. In
an object store (s3://, gs://) it is written in the temporary directory and uploaded, its marker last, so that it is
complete only once every file is there, as for Ray's uploads.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from dataclasses import dataclass
from typing import Optional

import pyarrow.fs
import ray.train

from orchestrator.checkpoint import MARKER_DIR, Place, check_checkpoint

WRITING_DIR = ".writing"  # in the run's storage: checkpoints being written, renamed into place when complete


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, on import: setting it to read it is not safe while other threads create files


def checkpoint_dir_name() -> str:
    """checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>, as Ray Train names the checkpoints it stores."""
    from ray.train.v2._internal.execution.storage import StorageContext

    return StorageContext.make_default_checkpoint_dir_name()


@dataclass
class InProcessStorage:
    place: Place  # the run's own storage directory (run_identity.run_storage)
    keep: int  # trainer.keep_checkpoints: the newest this many complete checkpoints stay

    @classmethod
    def of(cls, location: str, keep: int) -> "InProcessStorage":
        return cls(Place.of(location), keep)

    def staging_dir(self) -> Optional[str]:
        """Where save_and_report writes the next checkpoint: beside its final place on this machine's filesystem
        (publishing it is a rename), else the temporary directory (None; publishing uploads it)."""
        if not self.place.local:
            return None
        directory = os.path.join(self.place.path, WRITING_DIR)
        os.makedirs(directory, exist_ok=True)
        return directory

    def persist(self, directory: str) -> ray.train.Checkpoint:
        """A complete checkpoint directory (its marker written; from staging_dir() on this machine's filesystem) into
        the run's storage; older ones beyond `keep` removed. Returns the stored checkpoint, as Ray Train's report
        would have it."""
        target = self.place.child(checkpoint_dir_name())
        if self.place.local:
            os.chmod(directory, 0o777 & ~UMASK)  # mkdtemp's 0700 would keep the checkpoint from others who read it
            os.rename(directory, target.path)
            with contextlib.suppress(OSError):  # nothing else is being written: no empty folder left in the storage
                os.rmdir(os.path.join(self.place.path, WRITING_DIR))
        else:
            upload(directory, target)
        self.prune()
        return ray.train.Checkpoint(target.path, filesystem=target.fs)

    def prune(self) -> None:
        """Every complete checkpoint of the run but the newest `keep` (by name: the time it was stored) removed.
        Incomplete ones are left, as Ray Train leaves them (resuming skips them)."""
        found = [self.place.below(info) for info in self.place.listing()
                 if info.type == pyarrow.fs.FileType.Directory
                 and posixpath.basename(info.path).startswith("checkpoint_")]
        complete = sorted((place for place in found if check_checkpoint(place, verify=False)[0] is not None),
                          key=lambda place: posixpath.basename(place.path))
        for place in complete[:-self.keep]:
            place.fs.delete_dir(place.path)


def upload(directory: str, target: Place) -> None:
    """A local checkpoint directory to `target` on its filesystem: every file, then the marker. As Ray Train uploads
    (storage._pyarrow_fs_copy_files): in chunks of 64 MiB, and to S3 on one thread (pyarrow's threaded uploads to S3
    are not safe: apache/arrow#32372)."""
    local = pyarrow.fs.LocalFileSystem()
    options = {"chunk_size": 64 * 2**20,
               **({"use_threads": False} if isinstance(target.fs, getattr(pyarrow.fs, "S3FileSystem", ())) else {})}
    target.fs.create_dir(target.path)
    for name in sorted(os.listdir(directory), key=lambda entry: entry == MARKER_DIR):  # the marker last
        source = os.path.join(directory, name)
        if os.path.isdir(source):
            target.fs.create_dir(target.child(name).path)  # copy_files makes the directories below it, not it
        pyarrow.fs.copy_files(source, target.child(name).path, source_filesystem=local,
                              destination_filesystem=target.fs, **options)
