"""The built-in tuner's grid (+sweep=auto): every trial composes as a run, strategy_if_auto swaps only the planner's
own pick, and a trial whose plan is another's runs once."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import yaml

from launch.sweep import RayTrialLauncher, Trial
from orchestrator.config import ClusterConfig, Strategy
from tests.conftest import ROOT, compose_run


def grid():
    params = yaml.safe_load((ROOT / "hydra_conf" / "sweep" / "auto.yaml").read_text())["hydra"]["sweeper"]["params"]
    values = [[f"{key}={v.strip()}" for v in str(choices).split(",")] for key, choices in params.items()]
    return [list(combo) for combo in itertools.product(*values)]


def test_every_trial_of_the_tuner_composes_as_a_run(tmp_path):
    trials = grid()
    assert len(trials) == 8
    strategies = {compose_run(["+experiment=legal_demo", *t], tmp_path).strategy for t in trials}
    assert strategies == {Strategy.auto, Strategy.full}  # auto: the planner picks at plan time


def test_strategy_if_auto_never_overrides_a_named_strategy(tmp_path):
    assert compose_run(["strategy_if_auto=full"], tmp_path).strategy is Strategy.full
    assert compose_run(["strategy=lora", "strategy_if_auto=full"], tmp_path).strategy is Strategy.lora


def planned(num, overrides, strategy):
    plan = SimpleNamespace(strategy=Strategy(strategy), num_workers=1, use_gpu=True, predicted_gib_per_gpu=1.0)
    return Trial(num, overrides, f"/sweep/{num}", run=SimpleNamespace(cluster=ClusterConfig()), plan=plan,
                 record={"num": num})


def test_a_pair_that_is_one_plan_runs_once(tmp_path, monkeypatch):
    monkeypatch.setattr(RayTrialLauncher, "_write", staticmethod(lambda trial: None))
    one_gpu = [planned(0, ["strategy_if_auto=auto", "optim.lr_scale=1"], "lora"),
               planned(1, ["strategy_if_auto=full", "optim.lr_scale=1"], "full")]
    RayTrialLauncher()._drop_duplicates(one_gpu)
    assert all(t.plan is not None for t in one_gpu)  # LoRA and full: two trials
    many_gpus = [planned(0, ["strategy_if_auto=auto", "optim.lr_scale=1"], "full"),
                 planned(1, ["strategy_if_auto=full", "optim.lr_scale=1"], "full"),
                 planned(2, ["strategy_if_auto=full", "optim.lr_scale=0.5"], "full")]
    RayTrialLauncher()._drop_duplicates(many_gpus)
    assert many_gpus[1].plan is None and many_gpus[1].record["status"] == "duplicate"
    assert "trial 0" in many_gpus[1].record["error"]
    assert many_gpus[0].plan is not None and many_gpus[2].plan is not None  # another rate: its own trial
