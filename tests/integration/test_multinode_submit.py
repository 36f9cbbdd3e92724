"""The README's other two ways onto a running cluster whose nodes cannot import the project (issue 16):

- the job API, exactly as documented: `ray job submit --address http://<head>:8265 --working-dir . -- python -m
  orchestrator ... cluster.address=auto`, run from a clone of the project (the tracked files of this checkout,
  copied to a temporary directory: what a user submits from); the job's driver runs on the head node and its
  working_dir carries the code to the driver and the workers (launch/ship.py adds nothing then);
- Ray Client: `python -m orchestrator ... cluster.address=ray://127.0.0.1:<port>` on this side, which ships its own
  `orchestrator` and `launch` packages as py_modules (launch/ship.py).

One cluster for the module (ray.cluster_utils.Cluster, as tests/integration/test_multinode.py builds it): a head
node and a worker node of 1 CPU each, every process of theirs started with test_multinode's HIDE_HOOK (a
sitecustomize that makes `orchestrator` and `launch` unimportable from the checkout and its editable install, so
the nodes behave like machines without the project), plus the job server (dashboard) and the Ray Client server
on the head, on free ports of 127.0.0.1. The nodes' `python` is this venv's (PATH), as every node must have the
same Python and dependencies. A CPU worker asks for 1 CPU, so the 2 workers of each run land on the 2 nodes.

Each run: the tiny Llama on the bundled instructions, 2 CPU workers over gloo, 3 steps, W&B off, its run
directory (hydra.run.dir) on a path both nodes see (a temporary directory of this host).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
from ray._private.utils import write_ray_address as write_address_file

from orchestrator.placement import NODES_KEY
from tests.conftest import ROOT
from tests.integration.test_multinode import HIDE_HOOK, where_the_project_imports
from tests.integration.test_rayjob_submit import free_ports

pytestmark = pytest.mark.ray

STEPS = 3
JOB_TIMEOUT_S = 240
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's python, not the interpreter it links to


def client_env() -> dict:
    """This side's environment for the `ray` CLI and the Ray Client driver: the project importable (cwd / the
    checkout), no RAY_ADDRESS of someone else's cluster, no token authentication (the module's cluster has none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node cluster that cannot import the project, with the job server and the Ray Client server on its head;
    yields (cluster, dashboard URL, Ray Client port, what a plain task on each node found importing orchestrator)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's embedded Ray: this module joins its own cluster
        ray.shutdown()
    hook = tmp_path_factory.mktemp("hide-checkout")
    (hook / "sitecustomize.py").write_text(HIDE_HOOK)
    environment = {"PYTHONPATH": str(hook), "ORCHESTRATOR_TEST_HIDDEN_CHECKOUT": str(ROOT),
                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
                   "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    temp_dir = tempfile.mkdtemp(prefix="ray16s-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dashboard, client_port, agent = free_ports(3)
    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "temp_dir": temp_dir}
    head = {**node, "resources": {"node_a": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard, "dashboard_agent_listen_port": agent, "ray_client_server_port": client_port}
    # Ray's address file /tmp/ray/ray_current_cluster is left alone: other clusters on this host use `auto`
    keep_address_file = (mock.patch("ray._private.utils.write_ray_address"),
                         mock.patch("ray._common.utils.reset_ray_address"))
    with contextlib.ExitStack() as stack:
        for patch in keep_address_file:
            stack.enter_context(patch)
        with mock.patch.dict(os.environ, environment):  # the nodes' processes inherit it as they start
            cluster = Cluster(initialize_head=True, head_node_args=head)
            cluster.add_node(**node, resources={"node_b": 1}, include_dashboard=False)
            cluster.wait_for_nodes()
        # ...but this cluster's own temp dir gets it: a job's supervisor resolves the driver's RAY_ADDRESS as
        # "auto" from the address file of its node's temp dir, and without one, from any Ray cluster it finds
        # running on this host (someone else's: Ray's legacy fallback). `ray start --head` writes it there.
        write_address_file(cluster.gcs_address, temp_dir)
        try:
            found = where_the_project_imports(cluster.address)
            yield cluster, f"http://127.0.0.1:{dashboard}", client_port, found
        finally:
            ray.shutdown()
            cluster.shutdown()
            cluster.global_state.disconnect()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The project as a user submits it: this checkout's tracked files (as they are in the work tree), nothing
    else (no virtual environment, no run directories)."""
    target = tmp_path_factory.mktemp("clone") / "orchestrator"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def run_overrides(run_dir: Path):
    return ["model=tiny_llama", "data=legal_instructions", "logger.mode=disabled", f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=2", "trainer.global_batch_size=null", "trainer.grad_accum=1",
            "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.eval_generate_rows=0",
            "data.max_length=64", "data.max_validation_rows=4", "cluster.gpus=0", "cluster.cpu_workers=2",
            f"hydra.run.dir={run_dir}"]


def check_run(run_dir: Path, output: str, cluster) -> None:
    """The run's final summary in its output, its export on the shared path, its 2 ranks on the 2 nodes."""
    assert f"export: {run_dir / 'export'}" in output, output[-5000:]
    assert "nodes: 2;" in output, output[-5000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train/loss_history"]) == STEPS
    assert (run_dir / "export" / "config.json").is_file()
    assert any((run_dir / "export").glob("*.safetensors"))
    saved = metrics[NODES_KEY]
    assert [w["rank"] for w in saved] == [0, 1]
    cluster_ids = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert {w["node_id"] for w in saved} == cluster_ids, (saved, cluster_ids)


def test_the_nodes_cannot_import_the_project(cluster):
    *_, found = cluster
    assert all(text.startswith("ImportError") for text in found.values()), found


def submit(address: str, cwd: Path, entrypoint: list, *options: str) -> subprocess.CompletedProcess:
    """`ray job submit` as a user types it, from cwd; waits for the job (the CLI tails its logs, exit 1 on FAILED)."""
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, *options, "--", *entrypoint]
    try:
        return subprocess.run(command, cwd=cwd, env=client_env(), capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:  # what the job printed, then stop it
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)  # this module's cluster: its unfinished job is this one
        jobs = [j.submission_id for j in client.list_jobs() if not j.status.is_terminal()]
        logs = "".join(client.get_job_logs(job)[-5000:] for job in jobs)
        for job in jobs:
            client.stop_job(job)
        raise AssertionError(f"the job ran past {JOB_TIMEOUT_S} s; its logs:\n{logs}") from err


def test_a_job_without_working_dir_cannot_import_the_project(cluster, clone):
    """The job's driver runs on the cluster: without --working-dir it has no orchestrator to run."""
    _, address, *_ = cluster
    done = submit(address, clone, ["python", "-c", "import orchestrator"])
    assert done.returncode != 0 and "No module named 'orchestrator'" in done.stdout + done.stderr, \
        (done.stdout + done.stderr)[-3000:]


def test_job_submit_with_working_dir_runs_on_two_nodes(cluster, clone, tmp_path):
    """README: `ray job submit --address http://<head>:8265 --working-dir . -- python -m orchestrator ...
    cluster.address=auto`, from the clone's root."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_cluster, address, *_ = cluster
    run_dir = tmp_path / "run"
    started = time.monotonic()
    done = submit(address, clone,
                  ["python", "-m", "orchestrator", *run_overrides(run_dir), "cluster.address=auto"],
                  "--working-dir", ".", "--submission-id", "issue16-submit")
    print(f"\njob submit: {time.monotonic() - started:.0f} s from the CLI's start to the job's end")
    client = JobSubmissionClient(address)
    logs = client.get_job_logs("issue16-submit")
    (tmp_path / "job.log").write_text(logs)  # all of it, kept with pytest's temporary directories
    assert done.returncode == 0, f"{(done.stdout + done.stderr)[-5000:]}\nthe job's log: {tmp_path / 'job.log'}"
    assert client.get_job_status("issue16-submit") == JobStatus.SUCCEEDED, logs[-5000:]
    assert client.get_job_info("issue16-submit").runtime_env["working_dir"].startswith("gcs://")
    check_run(run_dir, logs, ray_cluster)


def test_ray_client_driver_ships_the_code(cluster, tmp_path):
    """README: `python -m orchestrator ... cluster.address=ray://<head>:10001` from a machine that has the project
    (here the checkout), whose driver ships orchestrator and launch as py_modules."""
    ray_cluster, _, client_port, _ = cluster
    run_dir = tmp_path / "run"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator", *run_overrides(run_dir),
                           f"cluster.address=ray://127.0.0.1:{client_port}"],
                          cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    print(f"\nRay Client run: {time.monotonic() - started:.0f} s")
    output = done.stdout + done.stderr
    server_logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}"  # the head's side of Ray Client
                          for p in sorted(Path(ray_cluster.head_node.get_logs_dir_path()).glob("ray_client_server*")))
    assert done.returncode == 0, output[-3000:] + server_logs
    check_run(run_dir, output, ray_cluster)
