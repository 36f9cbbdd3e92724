"""Several Ray nodes on this host (ray.cluster_utils.Cluster), none of which can import the project.

One cluster for the module: a head node and a worker node, 1 CPU each, each started with a sitecustomize hook
(HIDE_HOOK) that makes `orchestrator` and `launch` unimportable from the checkout, so these nodes behave like
machines where the project is not installed (the editable install and the driver's working directory, which Ray
puts on its workers' path, would otherwise find it). The run joins through cluster.address=, as it would join a
remote cluster; the driver ships its code (launch/ship.py).

- a plain Ray task on either node fails to import orchestrator: the hook works, so the run below succeeding means
  the code was shipped;
- a 2-worker ZeRO-3 run (gloo, tiny Llama) has the per-step losses of the single-process reference
  (test_distributed_correctness), and its ranks ran on the two different nodes, as metrics.json says;
- last, with a spare third node joined: a node running a worker dies after step 4 and the run finishes unaided from
  its step-3 checkpoint with the same losses (it prints the seconds from the kill to the next step: bench/RESULTS.md).

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
from typing import Tuple
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
        cluster.node_args, cluster.node_environment = node, environment  # for test_a_lost_node_...
        try:
            found = where_the_project_imports(cluster.address)
            yield cluster, found
        finally:
            ray.shutdown()
            cluster.shutdown()
            cluster.global_state.disconnect()
            shutil.rmtree(temp_dir, ignore_errors=True)



def where_the_project_imports(address: str) -> dict:
    """On each node (custom resources node_a, node_b), what `import orchestrator` gives a task there: the file it
    came from, or the ImportError."""
    import ray

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)

    def importable_here() -> str:  # nested: pickled by value, not imported from this module on the node
        try:
            import orchestrator
        except ImportError as err:
            return f"ImportError: {err}"
        return orchestrator.__file__

    probe = ray.remote(num_cpus=0)(importable_here)
    try:
        return {name: ray.get(probe.options(resources={name: 0.01}).remote(), timeout=120)
                for name in ("node_a", "node_b")}
    finally:
        ray.shutdown()

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


LOST_STEPS, LOST_CHECKPOINT_EVERY, LOST_AT = 12, 3, 4


def train_workers_on(node) -> list:
    """The Ray Train worker processes that this node's raylet started."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return [p for p in psutil.Process(raylet).children() if "RayTrainWorker" in " ".join(p.cmdline())]


def run_losing_a_node(cluster, run, lost_at: int) -> Tuple[dict, dict]:
    """execute(run) while a watcher kills, once rank 0 has finished step `lost_at`, a node other than the driver's
    that runs a training worker (its workers at once, then its raylet: a machine lost). Returns (metrics, events):
    events has killed_after_step, lost (the node id), killed_at, trace (every (step, time) rank 0 finished after
    the kill) and error, where the watcher failed."""
    import threading
    import time

    import ray

    progress = Path(run.run_dir) / "progress.json"  # rank 0's last finished step and when (restarts.Progress)
    events: dict = {}
    finished = threading.Event()

    def last_progress():
        try:
            return json.loads(progress.read_text())
        except (OSError, ValueError):
            return None

    def lose_a_node():
        deadline = time.time() + 300
        while time.time() < deadline and (last_progress() or {}).get("step", 0) < lost_at:
            time.sleep(0.05)
        driver_node = ray.get_runtime_context().get_node_id()
        lost = next(n for n in cluster.worker_nodes if n.node_id != driver_node and train_workers_on(n))
        workers = train_workers_on(lost)
        events.update(killed_after_step=(last_progress() or {}).get("step"), lost=lost.node_id,
                      killed_at=time.time())
        for worker in workers:  # a machine lost: its processes die at once, the node's own ones with its raylet
            worker.kill()
        cluster.remove_node(lost, allow_graceful=False)
        trace = events["trace"] = []  # every step rank 0 finished after the kill: (step, when)
        while time.time() < deadline and not finished.is_set():
            record = last_progress()
            if record and record["time"] > events["killed_at"] and (not trace or trace[-1][1] != record["time"]):
                trace.append((record["step"], record["time"]))
            time.sleep(0.02)

    def watch():
        try:
            lose_a_node()
        except Exception as err:  # noqa: BLE001 - reported by the callers' assertions
            events["error"] = repr(err)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        metrics = execute(run)
    finally:
        finished.set()
        watcher.join(timeout=60)
    return metrics, events


def test_a_lost_node_is_survived_on_the_nodes_that_remain(two_nodes, two_node_run, tiny_llama_dir, tmp_path):
    """A third node joins first (a spare: Ray Train needs 2 workers' CPUs again after the loss). Once step LOST_AT
    is done, a node running a worker dies (its raylet and every process it started killed; never the driver's
    node, where Ray Train keeps its controller). The run finishes unaided from its newest complete checkpoint
    (trainer.max_failures, trainer.checkpoint_every), with the single-process reference's losses, on nodes that do
    not include the lost one. Runs last: it changes the module's cluster. Prints the seconds from the kill to the
    next finished step."""
    cluster, _ = two_nodes
    with mock.patch.dict(os.environ, cluster.node_environment):
        cluster.add_node(**cluster.node_args, resources={"node_c": 1})
    cluster.wait_for_nodes()
    run = compose_run([*[o for o in overrides(tiny_llama_dir, workers=2, micro=4, accum=1) if "max_steps" not in o],
                       f"trainer.max_steps={LOST_STEPS}", f"trainer.checkpoint_every={LOST_CHECKPOINT_EVERY}",
                       "trainer.max_failures=1", f"cluster.address={cluster.address}"], tmp_path / "run")
    metrics, events = run_losing_a_node(cluster, run, LOST_AT)
    assert "error" not in events and events.get("killed_after_step", LOST_STEPS) < LOST_STEPS, events
    assert metrics["train/restarts"] == 1
    losses = metrics["train/loss_history"]
    assert len(losses) == LOST_STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses(run)), rtol=TOLERANCE, atol=0)
    nodes_after = {w["node_id"] for w in metrics[NODES_KEY]}
    assert events["lost"] not in nodes_after and len(nodes_after) == 2, (metrics[NODES_KEY], events)
    # the restarted workers' first step: the one after the longest pause (a step in flight may end just after the kill)
    trace = [(events["killed_after_step"], events["killed_at"]), *events["trace"]]
    gaps = [(trace[i + 1][1] - trace[i][1], i + 1) for i in range(len(trace) - 1)]
    step, when = trace[max(gaps)[1]]
    print(f"\nlost node after step {events['killed_after_step']}: the restarted workers finished step {step} "
          f"{when - events['killed_at']:.1f} s after the kill; {metrics['train/repeated_steps']} step(s) repeated")
