"""trainer.elastic (issue 16): a node lost for good, and the run finishes on the workers that remain.

One cluster for the module (ray.cluster_utils.Cluster on this host): a head node and a worker node, 1 CPU each, so
that a CPU worker (1 CPU) fits on each and, once one node is gone, only one worker can be placed. A 2-worker ZeRO-3
run (gloo, fp32, the tiny Llama without dropout, global batch 8 = 2 workers x micro-batch 4) with
trainer.elastic=true trainer.min_workers=1 and a checkpoint every 3 steps loses the node that is not the driver's
after step 4 (its Ray Train worker and its raylet killed, no node to replace it). Ray Train (elastic:
ScalingConfig(num_workers=(1, 2)), launch/local.py) restarts on the 1 worker it can place; that worker re-derives
the plan for 1 worker (Plan.for_workers: micro-batch 4 x 2 accumulation, the same global batch), re-partitions the
2-worker step-3 checkpoint through DeepSpeed's universal format (checkpoint.load_resharded) and trains steps 4-12.

The losses of the steps after the restart equal those of the same run on both nodes with nothing lost (the module's
first run) within 1e-5 relative: the tolerance of tests/integration/test_resume_world_size.py, whose docstring says
why (the same global batch summed in another order on another number of workers; between 2 workers and 1, in fact,
identical); all 12 also equal the single-process reference's (test_distributed_correctness) within 1e-5. Prints the
seconds from the kill to the restarted worker's first finished step.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from unittest import mock

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.placement import NODES_KEY
from tests.conftest import compose_run
from tests.integration.test_distributed_correctness import overrides, reference_losses
from tests.integration.test_multinode import run_losing_a_node
from tests.integration.test_resume_world_size import TOLERANCE

pytestmark = pytest.mark.ray
STEPS, CHECKPOINT_EVERY, LOST_AT = 12, 3, 4


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's embedded Ray: this module's run joins its own cluster
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray16e-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False, "temp_dir": temp_dir}
    # Ray's address file /tmp/ray/ray_current_cluster is left alone: other clusters on this host use `auto`
    with mock.patch("ray._private.utils.write_ray_address"), mock.patch("ray._common.utils.reset_ray_address"):
        cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_a": 1}})
        cluster.add_node(**node, resources={"node_b": 1})
        cluster.wait_for_nodes()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            with contextlib.suppress(Exception):
                cluster.global_state.disconnect()
            shutil.rmtree(temp_dir, ignore_errors=True)


def elastic_run(cluster, model_dir, run_dir):
    # checkpoints written synchronously: the test asserts which one the restart continues from (the newest before
    # the loss), and a node lost while one is written in the background (the default) restarts from the one before
    return compose_run([*[o for o in overrides(model_dir, workers=2, micro=4, accum=1) if "max_steps" not in o],
                        f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
                        "trainer.max_failures=1", "trainer.elastic=true", "trainer.min_workers=1",
                        "trainer.async_checkpoint=false", f"cluster.address={cluster.address}"], run_dir)


@pytest.fixture(scope="module")
def uninterrupted(two_nodes, tiny_llama_dir, tmp_path_factory):
    """The same run on both nodes, nothing lost: 2 workers throughout."""
    metrics = execute(elastic_run(two_nodes, tiny_llama_dir, tmp_path_factory.mktemp("uninterrupted")))
    assert len(metrics[NODES_KEY]) == 2 and "workers/ran" not in metrics
    return metrics["train/loss_history"]


def test_a_node_lost_for_good_is_survived_on_one_worker(two_nodes, uninterrupted, tiny_llama_dir, tmp_path):

    cluster = two_nodes
    run = elastic_run(cluster, tiny_llama_dir, tmp_path / "run")
    metrics, events = run_losing_a_node(cluster, run, LOST_AT)
    assert "error" not in events and events.get("killed_after_step", STEPS) < STEPS, events
    assert metrics["train/restarts"] == 1
    # it finished on the one worker that could be placed, with twice the accumulation: the same global batch
    assert [w["node_id"] for w in metrics[NODES_KEY]] != [events["lost"]] and len(metrics[NODES_KEY]) == 1
    assert (metrics["workers/planned"], metrics["workers/ran"], metrics["workers/grad_accum"]) == (2, 1, 2)
    assert metrics["resume/reshard_s"] > 0  # the 2 workers' shards were re-partitioned for 1
    losses, reference = metrics["train/loss_history"], reference_losses(run)
    assert len(losses) == STEPS and reference[-1] < reference[0]  # it trains, so equal losses mean equal updates
    restarted_at = CHECKPOINT_EVERY * (events["killed_after_step"] // CHECKPOINT_EVERY)
    assert losses[:restarted_at] == uninterrupted[:restarted_at]  # the checkpoint's history: the 2 workers' steps
    after, expected = torch.tensor(losses[restarted_at:]), torch.tensor(uninterrupted[restarted_at:])
    worst = ((after - expected).abs() / expected.abs()).max().item()
    print(f"\nafter the restart on 1 worker: {losses[restarted_at:]}\n"
          f"uninterrupted on 2:            {uninterrupted[restarted_at:]}")
    torch.testing.assert_close(after, expected, rtol=TOLERANCE, atol=0)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=TOLERANCE, atol=0)
    trace = [(events["killed_after_step"], events["killed_at"]), *events["trace"]]
    gaps = [(trace[i + 1][1] - trace[i][1], i + 1) for i in range(len(trace) - 1)]
    step, when = trace[max(gaps)[1]]
    print(f"\nlost a node for good after step {events['killed_after_step']}: the 1 remaining worker finished step "
          f"{step} {when - events['killed_at']:.1f} s after the kill (restarted from step {restarted_at}, "
          f"{metrics['train/repeated_steps']} step(s) repeated, reshard {metrics['resume/reshard_s']:.1f} s); "
          f"largest relative difference from the uninterrupted 2-worker run's losses after the restart {worst:.2e}")
