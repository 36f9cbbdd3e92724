"""cluster.in_process: the key's values, where the plan puts the recipe (plan.choose_launch) and why, that such a run
starts no Ray, and the parts that stand in for Ray Train's worker (launch/in_process.py,
orchestrator/in_process_storage.py, progress.LocalFeed). The runs themselves: tests/integration/test_in_process.py."""

from __future__ import annotations

import io
import json
import os
import stat

import pyarrow.fs
import pytest
from rich.console import Console

import launch.local
from orchestrator.__main__ import execute, local_resources
from orchestrator.checkpoint import MARKER_DIR, Place, checkpoint_info
from orchestrator.config import in_process_mode
from orchestrator.errors import UserError
from orchestrator.in_process_storage import WRITING_DIR, InProcessStorage
from orchestrator.plan import ClusterResources, choose_launch, make_plan
from orchestrator.progress import LocalFeed, ProgressSender, ProgressView, nothing_to_place
from tests.conftest import compose_run

MINILM = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512}


def planned(tmp_path, *overrides, workers=1):
    run = compose_run([f"cluster.cpu_workers={workers}", *overrides], tmp_path)
    return run, make_plan(run, ClusterResources(nodes=1, gpus_per_node=0, gpu_memory_gb=None, cpus=4), MINILM)


# ---------------------------------------------------------------- the key


def test_the_key_takes_auto_true_false_and_refuses_anything_else(tmp_path):
    assert in_process_mode(compose_run([], tmp_path).cluster) == "auto"  # the default
    assert in_process_mode(compose_run(["cluster.in_process=true"], tmp_path).cluster) == "true"  # a bool to Hydra
    assert in_process_mode(compose_run(["cluster.in_process=false"], tmp_path).cluster) == "false"
    with pytest.raises(UserError, match=r"^cluster.in_process='bogus' is not allowed: auto .*true or false"):
        compose_run(["cluster.in_process=bogus"], tmp_path)


# ---------------------------------------------------------------- the plan's choice


def test_one_worker_on_the_embedded_cluster_runs_here(tmp_path):
    run, plan = planned(tmp_path)
    here, why = choose_launch(run, plan, fault_drill=False)
    assert here and why.startswith("in this process, without starting Ray (cluster.in_process=auto: one worker")


@pytest.mark.parametrize("overrides, workers, drill, reason", [
    ([], 2, False, "2 workers, a process each"),
    (["cluster.address=ray://head:10001"], 1, False, "the workers run on the Ray cluster at cluster.address"),
    (["trainer.elastic=true", "strategy=full"], 1, False, "trainer.elastic restarts on as many workers"),
    ([], 1, True, "the failure drill (ORCHESTRATOR_KILL_WORKER) kills the worker's process"),
])
def test_auto_uses_rays_workers_where_they_are_needed_and_true_refuses(tmp_path, overrides, workers, drill, reason):
    run, plan = planned(tmp_path, *overrides, workers=workers)
    here, why = choose_launch(run, plan, fault_drill=drill)
    assert not here and why.startswith(f"Ray Train's worker processes (cluster.in_process=auto: {reason}")
    run, plan = planned(tmp_path, "cluster.in_process=true", *overrides, workers=workers)
    with pytest.raises(UserError, match=r"^cluster.in_process=true is not allowed for this run: .*set "
                                        r"cluster.in_process=auto .* or false") as refused:
        choose_launch(run, plan, fault_drill=drill)
    assert reason in str(refused.value)


def test_false_always_uses_rays_workers(tmp_path):
    run, plan = planned(tmp_path, "cluster.in_process=false")
    assert choose_launch(run, plan, fault_drill=False) == (False, "Ray Train's worker processes "
                                                                  "(cluster.in_process=false)")


@pytest.fixture
def no_ray(monkeypatch):
    """start_ray records its calls and starts nothing; detect_resources with Ray "started" reports one node."""
    calls = []
    detect = launch.local.detect_resources
    monkeypatch.setattr(launch.local, "start_ray", calls.append)
    monkeypatch.setattr(launch.local, "detect_resources", lambda cluster, ray_started: detect(cluster, False))
    return calls


def test_a_one_worker_run_starts_no_ray_and_others_do(tmp_path, no_ray):
    local_resources(compose_run(["cluster.cpu_workers=1"], tmp_path))
    assert not no_ray  # planned without Ray: its recipe will run in this process
    local_resources(compose_run(["cluster.cpu_workers=1", "cluster.in_process=false"], tmp_path))
    local_resources(compose_run(["cluster.cpu_workers=2"], tmp_path))
    assert len(no_ray) == 2


def test_the_plan_says_where_the_recipe_runs_and_true_stops_a_run_that_cannot(tmp_path, no_ray, capsys):
    execute(compose_run(["dry_run=true", "cluster.cpu_workers=1"], tmp_path / "one"))
    assert "\nlaunch: in this process, without starting Ray" in capsys.readouterr().out
    assert json.loads((tmp_path / "one" / "plan.json").read_text())["in_process"] is True
    with pytest.raises(UserError, match="cluster.in_process=true is not allowed for this run: 2 workers"):
        execute(compose_run(["dry_run=true", "cluster.cpu_workers=2", "cluster.in_process=true"], tmp_path / "two"))


# ---------------------------------------------------------------- the checkpoints (in_process_storage.py)


def fake_checkpoint(directory, step: int, complete: bool = True) -> str:
    """A checkpoint's files in `directory` (a rank-0 marker listing them, where complete)."""
    os.makedirs(os.path.join(directory, "deepspeed"), exist_ok=True)
    with open(os.path.join(directory, "deepspeed", "shard.pt"), "wb") as handle:
        handle.write(b"x" * step)
    if complete:
        os.makedirs(os.path.join(directory, MARKER_DIR))
        with open(os.path.join(directory, MARKER_DIR, "rank_0.json"), "w", encoding="utf-8") as handle:
            json.dump({"rank": 0, "world_size": 1, "step": step, "files": {"deepspeed/shard.pt": step}}, handle)
    return directory


def written(storage: InProcessStorage, step: int) -> str:
    """A checkpoint written where save_and_report writes it, as it would."""
    import tempfile

    return fake_checkpoint(tempfile.mkdtemp(dir=storage.staging_dir()), step)


def test_on_this_machine_a_checkpoint_is_renamed_into_place_and_the_oldest_pruned(tmp_path):
    storage = InProcessStorage.of(str(tmp_path / "run-id"), keep=2)
    assert storage.staging_dir() == str(tmp_path / "run-id" / WRITING_DIR)  # beside its final place: one filesystem
    incomplete = fake_checkpoint(str(tmp_path / "run-id" / "checkpoint_0000-00-00_00-00-00.000000"), 1,
                                 complete=False)
    stored = [storage.persist(written(storage, step)) for step in (2, 4, 6)]
    assert [checkpoint_info(s.path).step for s in stored[1:]] == [4, 6] and not os.path.exists(stored[0].path)
    assert os.path.isdir(incomplete)  # not a checkpoint this run completed: left, as Ray Train leaves them
    assert sorted(os.listdir(tmp_path / "run-id")) == sorted(
        [os.path.basename(incomplete), *(os.path.basename(s.path) for s in stored[1:])])  # .writing gone
    assert all(os.path.basename(s.path).startswith("checkpoint_20") for s in stored)  # Ray Train's names
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(stored[2].path).st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_in_an_object_store_a_checkpoint_is_uploaded_its_marker_last(tmp_path, monkeypatch):
    """A filesystem that is not this machine's (a SubTreeFileSystem, as pyarrow serves s3:// or gs://), written to
    through pyarrow only."""
    store = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    os.makedirs(tmp_path / "bucket")
    storage = InProcessStorage(Place(store, "run/run-id", "s3://bucket/run/run-id"), keep=1)
    assert storage.staging_dir() is None  # the temporary directory
    copied = []
    copy_files = pyarrow.fs.copy_files
    monkeypatch.setattr(pyarrow.fs, "copy_files", lambda source, *a, **k: (copied.append(os.path.basename(source)),
                                                                            copy_files(source, *a, **k)))
    first = storage.persist(fake_checkpoint(str(tmp_path / "a"), 2))
    second = storage.persist(fake_checkpoint(str(tmp_path / "b"), 4))
    assert copied == ["deepspeed", MARKER_DIR] * 2
    assert second.filesystem is store and checkpoint_info(Place(store, second.path, second.path)).step == 4
    assert store.get_file_info(first.path).type == pyarrow.fs.FileType.NotFound  # trainer.keep_checkpoints=1


# ---------------------------------------------------------------- progress and the process group


def test_the_view_draws_a_local_feed_without_ray():
    feed, out = LocalFeed(), io.StringIO()
    view = ProgressView(feed, terminal=False, console=Console(file=out, width=200, color_system=None),
                        placement=nothing_to_place)
    sender = ProgressSender(feed)
    sender.send("start", total=2, step=0)
    sender.send("step", step=1, loss=1.5, lr=1e-3, tokens_per_s=10.0, step_s=1.0)
    sender.send("warning", text="a warning waits for the feed: here it is there at once")
    sender.send("metrics", metrics={"eval/rougeL": 0.25})
    view.take()
    view.note_waiting()  # nothing placed by Ray: no waiting note, and no call to Ray
    assert out.getvalue().splitlines()[0].startswith("step 1/2, loss 1.5000")
    assert "warning: a warning waits for the feed" in out.getvalue() and view.late_metrics == {"eval/rougeL": 0.25}
    assert feed.take.remote() == []


def test_the_process_group_of_one_is_set_up_and_given_back():
    import torch.distributed as dist

    from launch.in_process import TORCH_ENV, process_group_of_one

    before = {key: os.environ.get(key) for key in TORCH_ENV}
    with process_group_of_one(use_gpu=False):
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
        assert "LOCAL_WORLD_SIZE" not in os.environ  # else Ray Train's local mode would set up one of its own
    assert not dist.is_initialized()
    assert {key: os.environ.get(key) for key in TORCH_ENV} == before


def test_the_recipes_warning_hook_is_undone_after_each_attempt():
    """Rank 0 hooks warnings.showwarning (progress.forward_own_warnings); a restart in this process hooks in again,
    around the original, not around the failed attempt's hook (each warning would reach the console twice)."""
    import logging
    import warnings

    from launch.in_process import worker_hooks_undone
    from orchestrator.progress import forward_own_warnings

    shown, handlers = warnings.showwarning, list(logging.getLogger("orchestrator").handlers)
    for _ in range(2):
        with worker_hooks_undone():
            forward_own_warnings(ProgressSender(LocalFeed()))
            assert warnings.showwarning is not shown
        assert warnings.showwarning is shown and logging.getLogger("orchestrator").handlers == handlers
