"""Run identity and the driver's checks on a resumed run (no Ray; the real runs: tests/integration/test_resume.py).

- a run directory that holds another run is continued only with resume=;
- resume=auto looks at this experiment's checkpoints only, also in a storage shared with other experiments;
- a restart takes only checkpoints of its own run;
- a resumed run keeps the workers, strategy and learning-rate schedule its checkpoint was written with, or stops
  with a UserError saying what to do;
- a malformed marker is a warning (resume=auto skips the checkpoint) or a UserError (resume= names it), never a
  traceback.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from orchestrator.checkpoint import check_resume_matches, newest_complete_checkpoint, resolve_resume
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


def saved_by(tmp_path, run, world_size=2, strategy="full", total_steps=20):
    return with_identity(fake_checkpoint(tmp_path / "first", "checkpoint_1", 10, world_size=world_size),
                         run_id="first", strategy=strategy, schedule=schedule_of(run, total_steps))


def plan(workers=2, strategy=Strategy.full, max_steps=20, use_gpu=False):
    return SimpleNamespace(num_workers=workers, strategy=strategy, max_steps=max_steps, use_gpu=use_gpu)


def test_resuming_as_the_checkpoint_was_written_passes(tmp_path):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))
    check_resume_matches(run, plan())
    run.resume = str(fake_checkpoint(tmp_path / "old", "checkpoint_1", 10))  # markers from before: nothing to check
    check_resume_matches(run, plan(workers=2, max_steps=99))


@pytest.mark.parametrize("change, message", [
    (dict(workers=1), r"was saved by 2 worker\(s\) and this run plans 1: .*resume on cluster.cpu_workers=2; "
                      r"resuming on another number of workers \(elastic resume\) is not supported"),
    (dict(workers=4, use_gpu=True), r"resume on 2 GPUs in all"),
    (dict(strategy=Strategy.lora), r"was trained with strategy=full and this run plans strategy=lora: resume with "
                                   r"strategy=full"),
    (dict(max_steps=40), r"schedule differs .*\(warmup_steps 2 -> 4, total_steps 20 -> 40\).*resume with "
                         r"trainer.max_steps=20"),
])
def test_resuming_with_other_workers_strategy_or_schedule_is_refused(tmp_path, change, message):
    run = a_run(tmp_path)
    run.resume = str(saved_by(tmp_path, run))
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
