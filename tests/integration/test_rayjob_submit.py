"""launcher=rayjob against the real Ray Jobs API: the rendered RayJob's entrypoint and runtimeEnvYAML, submitted
as KubeRay's submitter pod does (`ray job submit --runtime-env-json ... --submission-id ... -- ENTRYPOINT`) to a
Ray head started here, train a tiny model on one CPU worker and write the run directory the manifest names.

The head is a separate `ray start --head --block` with its own temp dir (so `ray.init()` elsewhere, such as the
session's `ray_cluster`, never finds it) and its own ports; it is stopped by killing its process group, never by
`ray stop`. About 1-2 minutes on 2 cores, most of it starting Ray and importing torch in the driver and worker.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from launch import rayjob
from tests.conftest import compose_run

pytestmark = pytest.mark.ray

START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600


def free_ports(count: int):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with its dashboard (the Jobs API) on 127.0.0.1; yields a JobSubmissionClient."""
    from ray.job_submission import JobSubmissionClient

    venv_bin = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dashboard, client, agent, agent_grpc, node_manager, objects, metrics, runtime_env = free_ports(9)
    command = [str(venv_bin / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=3",
               "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
               f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={objects}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
               RAY_AUTH_MODE="disabled",  # a token left in ~/.ray by another local cluster would switch it on
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
                break
            except Exception as err:  # not up yet
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {err}\n"
                                       f"{Path(temp_dir, 'ray-start.log').read_text()[-3000:]}") from err
                time.sleep(2)
        yield client
    finally:
        stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the head's process group, then SIGKILL what is left (Ray's processes stay in that group)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived `ray start`
    except ProcessLookupError:
        pass


def materialize(config_map: dict, volume: dict, mount: Path) -> None:
    """What the kubelet does with the job's ConfigMap volume: each item's key written at its path under the mount."""
    import base64

    for item in volume["configMap"]["items"]:
        target = mount / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if item["key"] in config_map.get("data", {}):
            target.write_text(config_map["data"][item["key"]], encoding="utf-8")
        else:
            target.write_bytes(base64.b64decode(config_map["binaryData"][item["key"]]))


def test_rendered_rayjob_runs_on_the_ray_jobs_api(ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus

    mount = tmp_path / "claim"  # stands in for the PVC every pod mounts
    job_mount = tmp_path / "job"  # stands in for the job's ConfigMap, mounted on every pod
    monkeypatch.setattr(rayjob, "JOB_MOUNT", str(job_mount))
    local = tmp_path / "laptop"  # a data file only this machine has: it travels in the ConfigMap
    local.mkdir()
    source = Path(__file__).resolve().parents[2] / "orchestrator" / "data" / "samples" / "legal_instructions"
    train = next(p for p in sorted(source.iterdir()) if p.name.startswith("train"))
    shutil.copy(train, local / f"mine{train.suffix}")
    overrides = ["+experiment=legal_full", "model=tiny_llama", "data.max_length=64", "data.max_validation_rows=4",
                 f"data.path={local / f'mine{train.suffix}'}",
                 "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=null",
                 "trainer.eval_every=0", "trainer.checkpoint_every=0", "cluster.gpus=0", "cluster.cpu_workers=1",
                 "logger.mode=disabled", "launcher=rayjob", f"k8s.mount_path={mount}", "+k8s.env.RAYJOB_TEST=1",
                 "trainer.eval_generate_rows=0"]
    run = compose_run(overrides, tmp_path / "here")
    plan, resources = rayjob.plan_for_cluster(run)
    name = rayjob.job_name(run.name)
    objects = {o["kind"]: o for o in rayjob.render_all(run, plan, resources, overrides, name)}
    spec = objects["RayJob"]["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    materialize(objects["ConfigMap"], next(v for v in head["volumes"] if v["name"] == "job"), job_mount)
    assert yaml.safe_load((job_mount / "run.yaml").read_text())["data"]["path"] == \
        f"{job_mount}/data/0/mine{train.suffix}"
    shutil.rmtree(local)  # the job reads its copy, not this machine's file

    # exactly what KubeRay's submitter does with spec.entrypoint and spec.runtimeEnvYAML
    job_id = ray_head.submit_job(entrypoint=spec["entrypoint"], runtime_env=yaml.safe_load(spec["runtimeEnvYAML"]),
                                 submission_id=name)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := ray_head.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert ray_head.get_job_info(job_id).runtime_env["env_vars"]["RAYJOB_TEST"] == "1"

    run_dir = mount / "legal_full" / name  # hydra.run.dir in the entrypoint: on the claim
    assert f"hydra.run.dir={run_dir}" in shlex.split(spec["entrypoint"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train/loss_history"]) == 2
    assert (run_dir / "export" / "config.json").is_file()
    assert any((run_dir / "export").glob("*.safetensors"))
    inner_plan = json.loads((run_dir / "plan.json").read_text())
    outer_plan = json.loads((tmp_path / "here" / "plan.json").read_text())
    # the pods planned the same; only they count the training rows an epoch holds (after tokenizing in the cluster)
    # and decide how it launches: on the cluster's Ray Train workers, never in the job's driver process
    counted = ("steps_per_epoch", "steps_reason", "in_process", "launch_reason")
    assert {k: v for k, v in inner_plan.items() if k not in counted} == \
        {k: v for k, v in outer_plan.items() if k not in counted}
    assert inner_plan["in_process"] is False and "cluster.address" in inner_plan["launch_reason"]
    assert "strategy=full" in logs  # the driver's output is the job's log
