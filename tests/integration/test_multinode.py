"""Several Ray nodes on this host (ray.cluster_utils.Cluster), none of which can import the project.

One cluster for the module: a head node and a worker node, 1 CPU each, each started with a sitecustomize hook
(HIDE_HOOK) that makes `orchestrator` and `launch` unimportable from the checkout, so these nodes behave like
machines where the project is not installed (the editable install and the driver's working directory, which Ray
puts on its workers' path, would otherwise find it). The run joins through cluster.address=, as it would join a
remote cluster; the driver ships its code (launch/ship.py).

- a plain Ray task on either node fails to import orchestrator: the hook works, so the run below succeeding means
  the code was shipped;
- a 2-worker ZeRO-3 run (gloo, tiny Llama) has the per-step losses of the single-process reference
  (test_distributed_correctness), and its ranks ran on the two different nodes, as metrics.json says.

Placement: Ray Train's placement strategy is PACK (launch/local.py: one node's GPUs first, NCCL on NVLink); a CPU
worker asks for 1 CPU, so with 1 CPU per node PACK has to put the two workers on two nodes, as it does with two
nodes of one GPU each. The Train controller takes no CPU (num_cpus=0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from orchestrator.__main__ import execute
from orchestrator.placement import NODES_KEY
from tests.conftest import ROOT, compose_run
from tests.integration.test_distributed_correctness import STEPS, TOLERANCE, overrides, reference_losses

pytestmark = pytest.mark.ray

HIDE_HOOK = '''
import importlib.machinery, os, sys
_CHECKOUT = os.path.realpath(os.environ["ORCHESTRATOR_TEST_HIDDEN_CHECKOUT"])
_HIDDEN = ("orchestrator", "launch")

def _outside(entry):
    path = os.path.realpath(entry or os.getcwd())
    return path != _CHECKOUT and not path.startswith(_CHECKOUT + os.sep)

class _HideCheckout:
    """orchestrator and launch only from outside the checkout (a runtime env's py_modules): not installed here"""
    def find_spec(self, name, path=None, target=None):
        if name not in _HIDDEN:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if _outside(p)])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec

sys.meta_path.insert(0, _HideCheckout())
'''


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A 2-node cluster whose processes cannot import the project from the checkout; yields (cluster, what a
    plain task on each node found importing orchestrator)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's embedded Ray: this module's runs join its own cluster
        ray.shutdown()
    hook = tmp_path_factory.mktemp("hide-checkout")
    (hook / "sitecustomize.py").write_text(HIDE_HOOK)
    environment = {"PYTHONPATH": str(hook), "ORCHESTRATOR_TEST_HIDDEN_CHECKOUT": str(ROOT)}
    temp_dir = tempfile.mkdtemp(prefix="ray16-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False, "temp_dir": temp_dir}
    # Ray's address file /tmp/ray/ray_current_cluster is left alone: other clusters on this host use `auto`
    keep_address_file = (mock.patch("ray._private.utils.write_ray_address"),
                         mock.patch("ray._common.utils.reset_ray_address"))
    with contextlib.ExitStack() as stack:
        for patch in keep_address_file:
            stack.enter_context(patch)
        with mock.patch.dict(os.environ, environment):  # the nodes' processes inherit it as they start
            cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_a": 1}})
            cluster.add_node(**node, resources={"node_b": 1})
            cluster.wait_for_nodes()
        try:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)

            def importable_here() -> str:  # nested: pickled by value, not imported from this module on the node
                try:
                    import orchestrator
                except ImportError as err:
                    return f"ImportError: {err}"
                return orchestrator.__file__

            probe = ray.remote(num_cpus=0)(importable_here)
            found = {name: ray.get(probe.options(resources={name: 0.01}).remote(), timeout=120)
                     for name in ("node_a", "node_b")}
            ray.shutdown()
            yield cluster, found
        finally:
            ray.shutdown()
            cluster.shutdown()
            cluster.global_state.disconnect()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tiny_llama_dir, tmp_path_factory):
    cluster, _ = two_nodes
    run_dir = tmp_path_factory.mktemp("two-nodes")
    run = compose_run([*overrides(tiny_llama_dir, workers=2, micro=4, accum=1), f"cluster.address={cluster.address}"],
                      run_dir)
    return run, execute(run)


def test_the_nodes_cannot_import_the_project(two_nodes):
    _, found = two_nodes
    assert all(text.startswith("ImportError") for text in found.values()), found


def test_two_nodes_match_the_single_process_reference(two_node_run):
    run, metrics = two_node_run
    distributed = metrics["train/loss_history"]
    assert len(distributed) == STEPS
    torch.testing.assert_close(torch.tensor(distributed), torch.tensor(reference_losses(run)), rtol=TOLERANCE,
                               atol=0)


def test_the_ranks_ran_on_different_nodes(two_nodes, two_node_run):
    cluster, _ = two_nodes
    run, metrics = two_node_run
    saved = json.loads(Path(run.run_dir, "metrics.json").read_text())[NODES_KEY]
    assert [w["rank"] for w in saved] == [0, 1]
    node_ids = {w["node_id"] for w in saved}
    cluster_ids = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert len(node_ids) == 2 and node_ids == cluster_ids, (saved, cluster_ids)
    assert all(w["hostname"] == socket.gethostname() for w in saved)
