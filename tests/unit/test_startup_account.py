"""The console's account of the start-up: every phase from the command to the first step, and nothing for runs
that lack the marks (older metrics.json files)."""

from orchestrator.console import startup_account


def test_each_phase_is_named_with_its_seconds_and_the_rest_closes_the_sum():
    metrics = {"time/command_started_at": 100.0, "time/fit_started_at": 110.0, "time/worker_started_at": 118.0,
               "time/setup_worker_s": 3.0, "time/build_data_s": 1.0, "time/build_engine_s": 4.0,
               "time/restore_s": 0.01, "time/eval_before_s": 2.0, "time/first_step_at": 130.0}
    line = startup_account(metrics)
    assert line.startswith("start-up 30s: ")
    assert "imports, Ray and the plan 10.0s" in line
    assert "Ray Train starting the workers 8.0s" in line
    assert "model and engine 4.0s" in line and "evaluation before 2.0s" in line
    assert "checkpoint restore" not in line  # under 0.05 s: not worth a word
    assert "the rest 2.0s" in line  # 30 - (10 + 8 + 3 + 1 + 4 + 0.01 + 2)


def test_metrics_without_the_marks_give_no_line():
    assert startup_account({"time/command_started_at": 1.0, "time/first_step_at": 2.0}) == ""


def test_a_run_in_the_drivers_process_started_no_ray():
    """cluster.in_process: the recipe starts right after fit() (the second phase is ~0 and left out)."""
    metrics = {"time/command_started_at": 100.0, "time/fit_started_at": 105.0, "time/worker_started_at": 105.01,
               "time/setup_worker_s": 0.2, "time/build_data_s": 0.1, "time/build_engine_s": 3.0,
               "time/restore_s": 0.0, "time/eval_before_s": 1.0, "time/first_step_at": 109.5, "launch/in_process": True}
    line = startup_account(metrics)
    assert line.startswith("start-up 10s: imports and the plan 5.0s, worker setup 0.2s, data 0.1s, model and engine")
    assert "Ray" not in line
    # Ray Train's local controller may take a tenth of a second between fit() and the recipe: part of the plan's
    # phase, never a "Ray Train starting the workers" phase (which the console test refuses for such runs)
    slower = startup_account({**metrics, "time/worker_started_at": 105.3})
    assert slower.startswith("start-up 10s: imports and the plan 5.3s, worker setup 0.2s") and "Ray" not in slower
