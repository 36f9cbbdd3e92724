"""The sweep summary from trial records (CSV, markdown, plot, best overrides) and the launcher's packing rule."""

from __future__ import annotations

import csv
import io
import json

import pytest

from launch import sweep_summary as summary
from launch.sweep import describe_failure, error_in_log, to_start
from orchestrator.errors import UserError

BASE = ["+experiment=legal_demo", "logger.mode=disabled"]


def record(num, lr, rank, value, status="completed", error=None):
    return {"num": num, "overrides": [*BASE, f"optim.lr={lr}", f"peft.rank={rank}", "hydra.launcher.max_concurrent=2"],
            "status": status, "error": error, "metric": "eval/macro_f1", "value": value,
            "tokens_per_s": 100.0 + num if status == "completed" else None, "started_at": 1000.0 + num,
            "finished_at": 1010.0 + num, "workers": 1, "strategy": "lora", "run_dir": f"/sweep/{num}"}


RECORDS = [record(0, "1e-5", 8, 0.41), record(1, "3e-5", 8, 0.52), record(2, "1e-5", 16, 0.47),
           record(3, "3e-5", 16, None, status="failed", error="CUDA out of memory | more\nlines")]


def test_swept_keys_are_the_overrides_that_differ():
    assert summary.swept_keys(RECORDS) == ["optim.lr", "peft.rank"]
    assert summary.swept_keys(RECORDS[:1]) == ["experiment", "logger.mode", "optim.lr", "peft.rank"]  # one trial: all


def test_best_trial_by_mode_ignores_failed_trials():
    assert summary.best_trial(RECORDS, "max")["num"] == 1
    assert summary.best_trial(RECORDS, "min")["num"] == 0
    assert summary.best_trial([RECORDS[3]], "max") is None


def test_csv_has_one_row_per_trial_with_swept_values_metric_speed_and_status():
    parsed = list(csv.DictReader(io.StringIO(summary.to_csv(summary.rows(RECORDS)))))
    assert [r["trial"] for r in parsed] == ["0", "1", "2", "3"]
    assert list(parsed[0])[:6] == ["trial", "optim.lr", "peft.rank", "eval/macro_f1", "tokens_per_s", "status"]
    assert (parsed[1]["optim.lr"], parsed[1]["peft.rank"], float(parsed[1]["eval/macro_f1"])) == ("3e-5", "8", 0.52)
    assert [r["status"] for r in parsed] == ["completed"] * 3 + ["failed"]
    assert parsed[3]["eval/macro_f1"] == "" and "CUDA out of memory" in parsed[3]["error"]
    assert float(parsed[0]["started_at"]) == 1000.0 and float(parsed[0]["seconds"]) == 10.0


def test_markdown_table_stars_the_best_and_keeps_cells_on_one_line():
    text = summary.to_markdown(summary.rows(RECORDS), best_num=1)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| trial | optim.lr | peft.rank | eval/macro_f1 | tokens_per_s | status |")
    assert lines[3].startswith("| 1 * | 3e-5 | 8 | 0.52 |")
    assert "CUDA out of memory \\| more lines" in lines[5] and "| failed |" in lines[5]


def test_best_overrides_leave_out_hydra_settings_and_run_a_sweep_file_once():
    line = summary.best_overrides_line(RECORDS[1])
    assert line == "+experiment=legal_demo logger.mode=disabled optim.lr=3e-5 peft.rank=8\n"
    trial = {**RECORDS[0], "overrides": ["optim.lr=1e-4", "+sweep=optuna_lr_rank_depth", "peft.rank=4"]}
    line = summary.best_overrides_line(trial)
    assert line == "optim.lr=1e-4 +sweep=optuna_lr_rank_depth peft.rank=4 hydra.mode=RUN\n"


def test_write_summary_writes_every_file_from_the_trial_records(tmp_path):
    for r in RECORDS:
        (tmp_path / str(r["num"])).mkdir()
        (tmp_path / str(r["num"]) / "trial.json").write_text(json.dumps(r))
    records = summary.read_records(str(tmp_path))
    assert [r["num"] for r in records] == [0, 1, 2, 3]
    written = summary.write_summary(str(tmp_path), records, "max")
    assert (tmp_path / "summary.csv").read_text().count("\n") == 5
    assert "| 1 * |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "best_overrides.txt").read_text().split() == [*BASE, "optim.lr=3e-5", "peft.rank=8"]
    assert set(written) == {"table", "csv", "markdown", "plot", "best"}


def test_no_completed_trial_means_no_best_file_and_no_plot(tmp_path):
    written = summary.write_summary(str(tmp_path), [RECORDS[3]], "max")
    assert "best" not in written and "plot" not in written
    assert "failed" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("needs,free,running,cap,expected", [
    ([{"GPU": 1}] * 9, {"GPU": 8, "CPU": 64}, 0, None, list(range(8))),  # eight one-GPU LoRA trials
    ([{"GPU": 4}] * 3, {"GPU": 8, "CPU": 64}, 0, None, [0, 1]),  # two four-GPU full runs
    ([{"GPU": 1}] * 8, {"GPU": 8, "CPU": 64}, 0, 3, [0, 1, 2]),  # the cap on concurrent trials
    ([{"GPU": 1}] * 8, {"GPU": 6, "CPU": 64}, 2, 3, [0]),  # two already running
    ([{"GPU": 4}, {"GPU": 2}, {"GPU": 1}], {"GPU": 3}, 1, None, [1, 2]),  # smaller ones pass a large one
    ([{"CPU": 1}] * 4, {"CPU": 3, "GPU": 0}, 0, None, [0, 1, 2]),  # CPU trials: a CPU per worker
    ([{"GPU": 1}], {"CPU": 8}, 0, None, []),  # no GPU at all
])
def test_trials_are_packed_by_the_resources_their_plans_need(needs, free, running, cap, expected):
    assert to_start(needs, free, running, cap) == expected


def test_a_failure_is_described_in_one_line():
    assert describe_failure(UserError("peft.rank=0 is not allowed")) == "peft.rank=0 is not allowed"
    assert describe_failure(RuntimeError("Traceback ...\n  File x\nValueError: bad value")) == "ValueError: bad value"
    assert describe_failure(KeyError("nope")) == "KeyError: 'nope'"


def test_a_failed_trial_command_is_explained_by_its_log(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text("data: 3 rows\n\x1b[36m(RayTrainWorker pid=1)\x1b[0m ValueError: inside a worker\n"
                   "Traceback (most recent call last):\n  File x\nRuntimeError: the driver's own\n")
    assert error_in_log(str(log), 1) == "RuntimeError: the driver's own"
    log.write_text("(RayTrainWorker pid=1) orchestrator.errors.UserError: x\nerror: data.path=/x does not exist\n")
    assert error_in_log(str(log), 2) == "data.path=/x does not exist"
    log.write_text("killed\n")
    assert error_in_log(str(log), -9).startswith("exit code -9")


def test_the_best_trials_export_is_linked_from_the_sweep_directory(tmp_path):
    records = [dict(r, run_dir=str(tmp_path / str(r["num"]))) for r in RECORDS]
    for r in records:
        (tmp_path / str(r["num"]) / "export").mkdir(parents=True)
    written = summary.write_summary(str(tmp_path), records, "max")
    link = tmp_path / "best_export"
    assert written["best_export"] == str(link) and link.resolve() == (tmp_path / "1" / "export").resolve()
    summary.write_summary(str(tmp_path), records, "min")  # a second summary moves the link
    assert link.resolve() == (tmp_path / "0" / "export").resolve()


@pytest.mark.parametrize("sweep,swept", [("auto", {"strategy_if_auto": "auto,full", "optim.lr_scale": "0.5,1",
                                                  "trainer.epochs_scale": "1,1.5"}),
                                         ("auto_imbalanced", {"optim.lr_scale": "0.5,1,2",
                                                              "optim.class_weighting": "balanced,sqrt_balanced"}),
                                         ("auto_lora", {"optim.lr_scale": "0.5,1,2", "peft.rank": "8,32"})])
def test_the_built_in_tuner_searches_around_the_strategys_defaults(sweep, swept):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import register_schema
    from tests.conftest import ROOT

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "hydra_conf")):
        cfg = compose("config", overrides=["+experiment=legal_demo", f"+sweep={sweep}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert {k: str(v) for k, v in cfg.hydra.sweeper.params.items()} == swept


def test_the_sweep_plot_has_a_log_lr_axis_with_readable_ticks_and_the_best_in_a_legend():
    """Learning rates 5e-5 .. 4e-4 (an 8x span, once on a linear axis with labels running together): a log axis,
    ticks at the swept values, no two tick labels overlapping, the best trial named in the legend."""
    lrs = ["5e-05", "0.0001", "0.0002", "0.0004"]
    records = [record(n, lr, 8 * (1 + n % 2), 0.4 + 0.05 * n) for n, lr in enumerate(lrs)]
    figure = summary.sweep_figure(records, best_num=3)
    lr_axes = next(a for a in figure.axes if a.get_xlabel() == "optim.lr")
    assert lr_axes.get_xscale() == "log"
    figure.canvas.draw()
    labels = [t for t in lr_axes.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["5e-05", "0.0001", "0.0002", "0.0004"]
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    legend = [t.get_text() for t in lr_axes.get_legend().get_texts()]
    assert "best: trial 3 (macro_f1 0.55)" in legend and "trial" in legend
