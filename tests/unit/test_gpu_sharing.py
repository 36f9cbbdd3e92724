"""Small one-worker runs sharing a GPU: cluster.gpu_fraction (validated, planned for that share of the memory,
given to Ray Train as a fractional GPU) and the sweep's rule that hands it to trials whose plans fit together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launch.local import detect_resources, worker_resources
from launch.sweep import RayTrialLauncher, Trial, to_start
from orchestrator.config import ClusterConfig


def trial(num: int, predicted: float, workers: int = 1, use_gpu: bool = True, memory: float = 139.8,
          fraction=None) -> Trial:
    plan = SimpleNamespace(use_gpu=use_gpu, num_workers=workers, predicted_gib_per_gpu=predicted)
    run = SimpleNamespace(cluster=ClusterConfig(gpu_fraction=fraction))
    return Trial(num, [f"optim.lr_scale={num}"], f"/sweep/{num}", run=run, plan=plan, gpu_memory_gb=memory)


def test_six_small_trials_share_one_gpu_and_all_six_start_at_once():
    trials = [trial(n, predicted=2.5) for n in range(6)]
    RayTrialLauncher()._share_gpus(trials)
    assert {t.run.cluster.gpu_fraction for t in trials} == {0.1666}  # 1/6 rounded down to Ray's 4 decimals
    assert to_start([t.need for t in trials], {"GPU": 1, "CPU": 16}, 0, None) == list(range(6))


@pytest.mark.parametrize("trials,why", [
    ([trial(n, predicted=50.0, memory=80.0) for n in range(4)], "one 50 GiB plan fills most of an 80 GiB GPU"),
    ([trial(n, predicted=2.0, workers=2) for n in range(4)], "two-worker plans: NCCL needs a GPU per rank"),
    ([trial(n, predicted=2.0, use_gpu=False) for n in range(4)], "CPU trials"),
    ([trial(n, predicted=None) for n in range(4)], "no prediction to size a share by"),
    ([trial(0, predicted=2.0)], "a single trial has no one to share with"),
])
def test_no_sharing_where_it_cannot_help_or_would_not_fit(trials, why):
    RayTrialLauncher()._share_gpus(trials)
    assert all(t.run.cluster.gpu_fraction is None for t in trials), why
    assert all(t.need == {"GPU": t.plan.num_workers} for t in trials if t.plan.use_gpu)


def test_the_number_per_gpu_follows_memory_and_the_cap():
    by_memory = [trial(n, predicted=30.0) for n in range(6)]  # 0.9 x 139.8 // 30 = 4
    RayTrialLauncher()._share_gpus(by_memory)
    assert by_memory[0].run.cluster.gpu_fraction == 0.25
    capped = [trial(n, predicted=0.5) for n in range(12)]
    RayTrialLauncher()._share_gpus(capped)
    assert capped[0].run.cluster.gpu_fraction == 0.125  # at most 8 a GPU


def test_the_users_choice_wins():
    asked = [trial(n, predicted=2.0) for n in range(6)]
    RayTrialLauncher(trials_per_gpu=3)._share_gpus(asked)
    assert asked[0].run.cluster.gpu_fraction == 0.3333
    whole = [trial(n, predicted=2.0) for n in range(6)]
    RayTrialLauncher(trials_per_gpu=1)._share_gpus(whole)
    assert whole[0].run.cluster.gpu_fraction is None
    own = [trial(n, predicted=2.0, fraction=0.5) for n in range(6)]
    RayTrialLauncher()._share_gpus(own)
    assert {t.run.cluster.gpu_fraction for t in own} == {0.5}
    with pytest.raises(ValueError, match="hydra.launcher.trials_per_gpu=0"):
        RayTrialLauncher(trials_per_gpu=0)


def test_a_share_plans_one_gpu_of_that_share_of_its_memory():
    resources = detect_resources(ClusterConfig(gpus=4, nodes=2, gpu_memory_gb=80.0, gpu_fraction=0.25),
                                 ray_started=False)
    assert (resources.nodes, resources.gpus_per_node, resources.gpu_memory_gb) == (1, 1, 20.0)
    whole = detect_resources(ClusterConfig(gpus=4, nodes=2, gpu_memory_gb=80.0), ray_started=False)
    assert (whole.nodes, whole.gpus_per_node, whole.gpu_memory_gb) == (2, 4, 80.0)


def test_ray_train_gets_the_fraction_for_gpu_workers_only():
    gpu_plan, cpu_plan = SimpleNamespace(use_gpu=True), SimpleNamespace(use_gpu=False)
    shared = SimpleNamespace(cluster=ClusterConfig(gpu_fraction=0.1666))
    assert worker_resources(shared, gpu_plan) == {"GPU": 0.1666, "CPU": 1}
    assert worker_resources(shared, cpu_plan) is None
    assert worker_resources(SimpleNamespace(cluster=ClusterConfig()), gpu_plan) is None


def test_a_bad_fraction_names_the_key():
    from orchestrator.config import RunConfig, validate
    from orchestrator.errors import UserError

    run = RunConfig()
    run.cluster.gpu_fraction = 1.5
    with pytest.raises(UserError, match=r"cluster.gpu_fraction=1.5 .*\(0, 1\]"):
        validate(run)


def test_the_console_knows_what_the_workers_need_in_all():
    from launch.local import worker_needs

    cpu_plan, gpu_plan = SimpleNamespace(use_gpu=False, num_workers=2), SimpleNamespace(use_gpu=True, num_workers=8)
    whole = SimpleNamespace(cluster=ClusterConfig())
    assert worker_needs(whole, cpu_plan) == {"CPU": 2} and worker_needs(whole, gpu_plan) == {"GPU": 8}
    shared = SimpleNamespace(cluster=ClusterConfig(gpu_fraction=0.25))
    assert worker_needs(shared, SimpleNamespace(use_gpu=True, num_workers=1)) == {"GPU": 0.25, "CPU": 1}
