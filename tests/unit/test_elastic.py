"""trainer.elastic (issue 16): the config's checks, the worker counts a restart may continue on, the Ray Train
scaling policy that restarts only on those, and the worker adopting the plan for the number of workers Ray started."""

from __future__ import annotations

import os
import pickle
from unittest import mock

import cloudpickle
import pytest

from orchestrator.config import Precision, Strategy
from orchestrator.errors import UserError
from orchestrator.plan import Plan
from orchestrator.restarts import elastic_scaling_policy, elastic_worker_counts
from tests.conftest import compose_run


def a_plan(strategy=Strategy.full, workers=4, micro=2, accum=1) -> Plan:
    return Plan(strategy=strategy, num_workers=workers, use_gpu=False, micro_batch_size=micro, grad_accum=accum,
                global_batch_size=workers * micro * accum, precision=Precision.fp32, zero_stage=3, offload=False,
                gradient_checkpointing=False, predicted_gib_per_gpu=None, reason="test", max_steps=12)


def test_the_keys_are_checked(tmp_path):
    run = compose_run(["trainer.elastic=true", "trainer.min_workers=1"], tmp_path)
    assert (run.trainer.elastic, run.trainer.min_workers) == (True, 1)
    assert compose_run([], tmp_path).trainer.elastic is False
    with pytest.raises(UserError, match=r"^trainer.min_workers=0 is not allowed: an integer >= 1"):
        compose_run(["trainer.elastic=true", "trainer.min_workers=0"], tmp_path)
    with pytest.raises(UserError, match=r"^trainer.min_workers=1 is not allowed: null unless trainer.elastic=true"):
        compose_run(["trainer.min_workers=1"], tmp_path)
    with pytest.raises(UserError, match=r"^trainer.elastic=True is not allowed: true only with trainer.max_failures"):
        compose_run(["trainer.elastic=true", "trainer.max_failures=0"], tmp_path)
    with pytest.raises(UserError, match=r"^trainer.elastic=True is not allowed: false with strategy=lora: only "
                                        r"strategy=full and full_offload"):
        compose_run(["trainer.elastic=true", "strategy=lora"], tmp_path)
    assert compose_run(["trainer.elastic=true", "strategy=full_offload"], tmp_path).trainer.elastic


def test_the_worker_counts_keep_the_global_batch(tmp_path):
    run = compose_run(["trainer.elastic=true"], tmp_path)
    assert elastic_worker_counts(run, a_plan(workers=4, micro=2)) == [1, 2, 4]  # 3 x 2 rows do not divide 8
    assert elastic_worker_counts(run, a_plan(workers=3, micro=4)) == [1, 3]  # 2 x 4 rows do not divide 12
    run.trainer.min_workers = 2
    assert elastic_worker_counts(run, a_plan(workers=4, micro=2)) == [2, 4]
    run.trainer.min_workers = 3
    with pytest.raises(UserError, match=r"trainer.min_workers=3 is not allowed: the global batch of 8 rows cannot be "
                                        r"kept on any of 3-3 worker\(s\)"):
        elastic_worker_counts(run, a_plan(workers=4, micro=2))
    run.trainer.min_workers = 5
    with pytest.raises(UserError, match=r"trainer.min_workers=5 is not allowed: the plan has 4 worker\(s\)"):
        elastic_worker_counts(run, a_plan(workers=4))
    run.trainer.min_workers = None
    with pytest.raises(UserError, match=r"trainer.elastic=true is not allowed with strategy=lora \(the plan's\)"):
        elastic_worker_counts(run, a_plan(strategy=Strategy.lora))


def test_the_policy_restarts_on_a_count_that_keeps_the_global_batch():
    from ray.train import ScalingConfig

    policy = elastic_scaling_policy(ScalingConfig(num_workers=(1, 4)), [1, 2, 4])
    count = policy._count_possible_workers
    assert count({"a": {"CPU": 2}, "b": {"CPU": 2}}) == 4
    assert count({"a": {"CPU": 2}, "b": {"CPU": 1}}) == 2  # 3 can be placed; 3 workers cannot keep the batch
    assert count({"a": {"CPU": 1}}) == 1
    assert count({}) == 0  # below min_workers: Ray Train waits
    # pickled by value for Ray Train's controller, which need not import orchestrator
    again = pickle.loads(cloudpickle.dumps(policy))
    assert again._count_possible_workers({"a": {"CPU": 3}}) == 2


def test_a_restart_reads_the_cluster_as_it_is_now():
    """Deciding a restart, the policy has the coordinator re-read the nodes (recompute=True) rather than take its
    view of up to 20 s ago, which may still hold a lost node."""
    from ray.train import ScalingConfig

    policy = elastic_scaling_policy(ScalingConfig(num_workers=(1, 2)), [1, 2])
    policy._requester_id = "train-x"
    client = policy._coordinator_client = mock.Mock()
    with mock.patch("ray.get", return_value={"a": {"CPU": 1}}), \
            mock.patch.object(policy, "_maybe_send_resource_request"):
        decision = policy.make_decision_for_non_running_worker_group()
    client._autoscaling_coordinator.get_reserved_resources.remote.assert_called_once_with("train-x", recompute=True)
    assert decision.num_workers == 1
    policy.recomputed_at = float("-inf")
    with mock.patch("ray.get", return_value={}), mock.patch.object(policy, "_maybe_send_resource_request"), \
            mock.patch("time.sleep") as sleep:  # none can be placed: Ray Train waits, without a busy loop
        assert type(policy.make_decision_for_non_running_worker_group()).__name__ == "NoopDecision"
    sleep.assert_called_once_with(1)


def test_the_elastic_trainer_runs_the_policy_with_a_shorter_placement_wait():
    from ray.train import ScalingConfig

    from launch.local import ELASTIC_START_TIMEOUT_ENV, elastic_over

    class Trainer:  # Ray Train's DataParallelTrainer, as far as elastic_over uses it
        scaling_config = ScalingConfig(num_workers=(1, 4))

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            return os.environ.get(ELASTIC_START_TIMEOUT_ENV), controller_init_kwargs["scaling_policy"]

    assert elastic_over(Trainer, [4]) is Trainer
    with mock.patch.dict(os.environ):
        os.environ.pop(ELASTIC_START_TIMEOUT_ENV, None)
        timeout, policy = elastic_over(Trainer, [1, 2, 4])()._initialize_and_run_controller(scaling_policy=None)
        assert timeout == "20" and ELASTIC_START_TIMEOUT_ENV not in os.environ
        assert policy._count_possible_workers({"a": {"CPU": 3}}) == 2
        os.environ[ELASTIC_START_TIMEOUT_ENV] = "90"  # the user's own wins
        assert elastic_over(Trainer, [1, 2, 4])()._initialize_and_run_controller(scaling_policy=None)[0] == "90"


def test_the_worker_adopts_the_plan_for_the_workers_ray_started(tmp_path):
    """Recipe.setup_worker on 1 worker of a 2-worker plan: the accumulation doubles, the global batch stays."""
    import orchestrator.train_loop as train_loop
    from orchestrator.train_loop import Recipe, WorkerInput

    run = compose_run(["trainer.elastic=true", "cluster.cpu_workers=2"], tmp_path)
    plan = a_plan(workers=2, micro=2, accum=2)
    context = mock.Mock(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    with mock.patch.object(train_loop.ray.train, "get_context", return_value=context), \
            mock.patch.object(train_loop, "redirect_worker_output"), \
            mock.patch.object(train_loop, "forward_own_warnings"), \
            mock.patch.object(train_loop, "gather_nodes", return_value=[]), \
            mock.patch("deepspeed.init_distributed"), \
            mock.patch.object(train_loop.dist, "get_backend", return_value="gloo"), \
            mock.patch.object(train_loop.ray.train.torch, "get_device", return_value=train_loop.torch.device("cpu")):
        recipe = Recipe(WorkerInput(run, plan))
        recipe.setup_worker()
    assert (recipe.plan.num_workers, recipe.plan.grad_accum, recipe.plan.global_batch_size) == (1, 4, 8)
    assert recipe.resized == {"workers/planned": 2, "workers/ran": 1, "workers/grad_accum": 4}
