"""A dry run starts no Ray (issue 15): without cluster.* it reads this machine as the embedded Ray would report it;
only a dry run for the cluster at cluster.address without cluster.gpus joins that cluster to ask it."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

import launch.local
from orchestrator.__main__ import local_resources
from tests.conftest import ROOT, compose_run


@pytest.fixture
def no_ray(monkeypatch):
    """start_ray fails the test; what it was asked is recorded."""
    calls = []

    def refuse(cluster):
        calls.append(cluster)
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(launch.local, "start_ray", refuse)
    return calls


def test_a_dry_run_reads_this_machine_without_ray(tmp_path, no_ray):
    import torch

    resources = local_resources(compose_run(["dry_run=true"], tmp_path))
    assert not no_ray
    assert (resources.nodes, resources.gpus_per_node) == (1, torch.cuda.device_count())
    assert resources.cpus == max(os.cpu_count(), 2 + 1)  # as start_ray's embedded Ray: a slot for the controller
    # Ray's "memory" resource: the available memory less the object store, so less than what is available
    assert 0 < resources.host_memory_gb < psutil.virtual_memory().total / 2**30


def test_a_sizing_dry_run_plans_for_what_was_given(tmp_path, no_ray):
    run = compose_run(["dry_run=true", "cluster.nodes=2", "cluster.gpus=8", "cluster.gpu_memory_gb=80"], tmp_path)
    resources = local_resources(run)
    assert (resources.nodes, resources.gpus_per_node, resources.gpu_memory_gb) == (2, 8, 80)
    assert resources.host_memory_gb is None and not no_ray


def test_a_dry_run_for_a_remote_cluster_asks_it(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launch.local, "start_ray", started.append)
    monkeypatch.setattr(launch.local, "detect_resources", lambda cluster, ray_started: ray_started)
    run = compose_run(["dry_run=true", "cluster.address=ray://head:10001"], tmp_path)
    assert local_resources(run) is True and len(started) == 1
    sized = compose_run(["dry_run=true", "cluster.address=ray://head:10001", "cluster.gpus=4"], tmp_path)
    assert local_resources(sized) is False and len(started) == 1


def test_the_cli_dry_run_works_where_ray_cannot_start(tmp_path):
    """RAY_ADDRESS at a closed port: ray.init would fail (it would join that address, and refuses num_cpus with
    it), so a dry run that succeeds did not start Ray."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "orchestrator", "dry_run=true", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy=full" in result.stdout + result.stderr
    assert (tmp_path / "plan.json").is_file()
