"""Run identity and the driver's checks on a resumed run (no Ray; the real runs: tests/integration/test_resume.py).

- a run directory that holds another run is continued only with resume=;
- resume=auto looks at this experiment's checkpoints only, also in a storage shared with other experiments;
- a restart takes only checkpoints of its own run;
- a resumed run keeps the strategy, learning-rate schedule and global batch its checkpoint was written with, and
  its workers unless the strategy is full fine-tuning (ZeRO-3 shards re-partitioned: the global batch then kept by
  more or less accumulation), or stops with a UserError saying what to do;
- a malformed marker is a warning (resume=auto skips the checkpoint) or a UserError (resume= names it), never a
  traceback.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from orchestrator.checkpoint import (
    check_resume_matches,
    keep_resumed_global_batch,
    newest_complete_checkpoint,
    resolve_resume,
)
from orchestrator.config import RunConfig, Schedule, Strategy
from orchestrator.errors import UserError
from orchestrator.optimization import schedule_of
from orchestrator.preflight import resume_from
from orchestrator.run_identity import RUN_FILE, check_run_dir, claim_run, new_run_id, ray_run_name, run_storage
from tests.unit.test_checkpoint import fake_checkpoint


def a_run(tmp_path, **fields) -> RunConfig:
    run = RunConfig()
    run.name, run.run_dir = "legal", str(tmp_path / "runs" / "legal" / "now")
    run.optim.lr, run.optim.warmup_ratio, run.optim.schedule = 3e-3, 0.1, Schedule.cosine
    for key, value in fields.items():
        section, name = key.split(".")
        setattr(getattr(run, section), name, value)
    return run


def with_identity(path, **identity):
    for marker in (path / "complete").glob("rank_*.json"):
        marker.write_text(json.dumps({**json.loads(marker.read_text()), **identity}))
    return path


def test_every_run_has_its_own_id_and_place_in_a_shared_storage(tmp_path):
    run = a_run(tmp_path, **{"cluster.storage_path": str(tmp_path / "store")})
    first, second = new_run_id(), new_run_id()
    assert first != second
    assert ray_run_name(run, first) == f"legal/{first}"
    assert run_storage(run, first) == str(tmp_path / "store" / "legal" / first) != run_storage(run, second)
    assert run_storage(run, None) == str(tmp_path / "store" / "legal")  # the experiment's runs, for resume=auto


def test_a_run_directory_holding_another_run_is_continued_only_with_resume(tmp_path):
    run = a_run(tmp_path)
    (tmp_path / "runs" / "legal" / "now").mkdir(parents=True)
    check_run_dir(run)  # empty: a new run starts here
    run_id = claim_run(run)
    assert json.loads((tmp_path / "runs" / "legal" / "now" / RUN_FILE).read_text())["run_id"] == run_id
    again = a_run(tmp_path)
    with pytest.raises(UserError, match=f"holds run {run_id}: add resume=auto to continue it, or give this run its "
                                        "own directory") as error:
        check_run_dir(again)
    assert "\n" not in str(error.value)
    again.resume = "auto"
    check_run_dir(again)  # asked for: continues


def test_a_run_directory_from_before_run_ids_counts_as_another_run(tmp_path):
    run = a_run(tmp_path)
    (tmp_path / "runs" / "legal" / "now").mkdir(parents=True)
    (tmp_path / "runs" / "legal" / "now" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds an earlier run \(metrics.json\)"):
        check_run_dir(run)


def test_claiming_removes_the_progress_of_the_run_it_resumes(tmp_path):
    run = a_run(tmp_path)
    (tmp_path / "runs" / "legal" / "now").mkdir(parents=True)
    (tmp_path / "runs" / "legal" / "now" / "progress.json").write_text(json.dumps({"step": 12}))
    run.resume = "auto"
    claim_run(run)  # else a restart would count steps of the resumed run as repeated by this one
    assert not (tmp_path / "runs" / "legal" / "now" / "progress.json").exists()


def test_resume_auto_takes_only_this_experiments_checkpoints_from_a_shared_storage(tmp_path):
    store = tmp_path / "store"
    run = a_run(tmp_path, **{"cluster.storage_path": str(store)})
    run.resume = "auto"
    fake_checkpoint(store / "other_experiment" / new_run_id(), "checkpoint_1", 50)
    ours = fake_checkpoint(store / "legal" / new_run_id(), "checkpoint_1", 5)
    resume_from(run)
    assert run.resume == str(ours)


def test_a_restart_takes_only_checkpoints_of_its_own_run(tmp_path, monkeypatch):
    import ray.train

    from orchestrator import restarts

    store = tmp_path / "store"
    run = a_run(tmp_path, **{"cluster.storage_path": str(store)})
    other = with_identity(fake_checkpoint(store / "legal" / "other", "checkpoint_1", 4), run_id="other")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(other)))
    with pytest.warns(UserWarning, match="run other wrote it, not this run"):
        assert restarts.restart_checkpoint(run, "mine") is None
    mine = with_identity(fake_checkpoint(store / "legal" / "mine", "checkpoint_1", 4), run_id="mine")
    newer = with_identity(fake_checkpoint(store / "legal" / "mine", "checkpoint_2", 8), run_id="mine")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(mine)))
    assert restarts.restart_checkpoint(run, "mine").path == str(newer)  # newest of this run, never "other"'s
    # a worker that died before Ray registered any checkpoint: this run's own directory still holds them
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert restarts.restart_checkpoint(run, "mine").path == str(newer)
    assert restarts.restart_checkpoint(run, None) is None  # without a run id, only Ray's word counts


def saved_by(tmp_path, run, world_size=2, strategy="full", total_steps=20, global_batch=4):
    batch = {} if global_batch is None else {"global_batch_size": global_batch}  # None: markers from before
    return with_identity(fake_checkpoint(tmp_path / "first", "checkpoint_1", 10, world_size=world_size),
                         run_id="first", strategy=strategy, schedule=schedule_of(run, total_steps), **batch)


def plan(workers=2, strategy=Strategy.full, max_steps=20, use_gpu=False, micro=2, global_batch=4):
    return SimpleNamespace(num_workers=workers, strategy=strategy, max_steps=max_steps, use_gpu=use_gpu,
                           micro_batch_size=micro, global_batch_size=global_batch)


def test_resuming_as_the_checkpoint_was_written_passes(tmp_path):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))
    check_resume_matches(run, plan())
    run.resume = str(fake_checkpoint(tmp_path / "old", "checkpoint_1", 10))  # markers from before: nothing to check
    check_resume_matches(run, plan(workers=2, max_steps=99))


def test_full_fine_tuning_resumes_on_another_number_of_workers_with_the_same_global_batch(tmp_path):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))  # 2 workers, global batch 4
    run.trainer.global_batch_size = None
    assert keep_resumed_global_batch(run, plan(workers=1, micro=2, global_batch=2))  # plan again with it
    assert run.trainer.global_batch_size == 4  # 1 worker x micro-batch 2 x 2 accumulation
    check_resume_matches(run, plan(workers=1, global_batch=4))
    check_resume_matches(run, plan(workers=4, micro=1, global_batch=4, use_gpu=True, strategy=Strategy.full))
    run.trainer.global_batch_size = None
    assert not keep_resumed_global_batch(run, plan(workers=2, global_batch=4))  # as written: nothing to change
    assert run.trainer.global_batch_size is None


@pytest.mark.parametrize("plan_change, message", [
    (dict(workers=1, micro=3, global_batch=3), r"global batch of 4 rows per optimizer step \(on 2 worker\(s\)\), which "
     r"a resumed run keeps; this run's 1 worker\(s\) x trainer.micro_batch_size=3 = 3 rows per pass do not divide "
     r"it: set trainer.micro_batch_size to one of 1, 2, 4"),
    (dict(workers=3, micro=1, global_batch=3), r"resume on a number of workers that divides 4"),
])
def test_a_global_batch_that_the_new_workers_cannot_keep_is_refused(tmp_path, plan_change, message):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))
    run.trainer.global_batch_size = None
    with pytest.raises(UserError, match=message):
        keep_resumed_global_batch(run, plan(**plan_change))
    run.trainer.global_batch_size = 8  # set by the user to another value
    with pytest.raises(UserError, match=r"sets trainer.global_batch_size=8: a resumed run keeps its global batch .*"
                                        r"resume with trainer.global_batch_size=4, or leave it unset"):
        keep_resumed_global_batch(run, plan(workers=1, micro=2, global_batch=8))


@pytest.mark.parametrize("saved, change, message", [
    (dict(global_batch=None), dict(workers=1),
     r"was saved by 2 worker\(s\) and this run plans 1: its markers were written before they recorded the global "
     r"batch, which a resume on another number of workers must keep, so resume on cluster.cpu_workers=2"),
    (dict(global_batch=None), dict(workers=4, use_gpu=True), r"resume on 2 GPUs in all"),
    (dict(strategy="lora"), dict(workers=1, strategy=Strategy.lora),
     r"a checkpoint of strategy=lora resumes only on the number of workers that wrote it \(another number of workers "
     r"is supported for strategy=full and strategy=full_offload\), so resume on cluster.cpu_workers=2"),
    (dict(), dict(global_batch=8), r"trained with a global batch of 4 rows per optimizer step and this run plans 8: "
                                   r"resume with trainer.global_batch_size=4"),
    (dict(), dict(strategy=Strategy.lora), r"was trained with strategy=full and this run plans strategy=lora: resume "
                                           r"with strategy=full"),
    (dict(), dict(max_steps=40), r"schedule differs .*\(warmup_steps 2 -> 4, total_steps 20 -> 40\).*resume with "
                                 r"trainer.max_steps=20"),
])
def test_resuming_with_other_workers_strategy_or_schedule_is_refused(tmp_path, saved, change, message):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run, **saved))
    with pytest.raises(UserError, match=message) as error:
        check_resume_matches(run, plan(**change))
    assert "\n" not in str(error.value)


def test_resuming_with_another_learning_rate_is_refused(tmp_path):
    """The scheduler's state holds the rate it started from: a new optim.lr would be silently ignored."""
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))
    run.optim.lr = 1e-3
    with pytest.raises(UserError, match=r"lr 0.003 -> 0.001"):
        check_resume_matches(run, plan())


MALFORMED = ["{bad", "[]", "{}", '{"step": 5}', '{"step": 5, "world_size": 2, "rank": 0, "files": []}',
             '{"step": 5, "world_size": "2", "rank": 0, "files": {}}', '{"step": 5, "world_size": 2, "rank": 0, '
             '"files": {}, "crc32": [1]}', '"\\u00ff"']


@pytest.mark.parametrize("content", MALFORMED)
def test_a_malformed_marker_is_a_warning_or_a_clear_error_never_a_traceback(tmp_path, content):
    intact = fake_checkpoint(tmp_path / "run", "checkpoint_1", 5)
    bad = fake_checkpoint(tmp_path / "run", "checkpoint_2", 10)
    (bad / "complete" / "rank_0.json").write_text(content)
    with pytest.warns(UserWarning, match=r"skipping corrupted checkpoint .*checkpoint_2: its marker .*rank_0.json is "
                                         r"(not valid JSON|malformed)"):
        assert newest_complete_checkpoint([str(tmp_path / "run")]).path == str(intact)
    with pytest.raises(UserError, match=r"resume=.*checkpoint_2 is a corrupted checkpoint: its marker .*rank_0.json"):
        resolve_resume(str(bad), str(tmp_path), str(tmp_path))


def test_a_launchers_retry_of_the_same_run_continues_it(tmp_path, monkeypatch):
    """ORCHESTRATOR_RUN_ID (a RayJob retried by k8s.backoff_limit runs the same command in the same directory): the
    same id continues that run in its own storage directory; another id is another run, refused as before."""
    run = a_run(tmp_path)
    (tmp_path / "runs" / "legal" / "now").mkdir(parents=True)
    monkeypatch.setenv("ORCHESTRATOR_RUN_ID", "legal-1201-120000-ab12")
    assert claim_run(run) == "legal-1201-120000-ab12"
    (tmp_path / "runs" / "legal" / "now" / "progress.json").write_text(json.dumps({"step": 12}))
    check_run_dir(a_run(tmp_path))  # the retry: allowed
    assert claim_run(a_run(tmp_path)) == "legal-1201-120000-ab12"
    assert (tmp_path / "runs" / "legal" / "now" / "progress.json").exists()  # its steps count as repeated
    monkeypatch.setenv("ORCHESTRATOR_RUN_ID", "legal-1201-130000-cd34")
    with pytest.raises(UserError, match="holds run legal-1201-120000-ab12: add resume=auto"):
        check_run_dir(a_run(tmp_path))
    monkeypatch.setenv("ORCHESTRATOR_RUN_ID", "../elsewhere")
    with pytest.raises(UserError, match="ORCHESTRATOR_RUN_ID=../elsewhere is not allowed"):
        claim_run(a_run(tmp_path))
