"""launcher=rayjob: the rendered RayJob is valid for the KubeRay v1 CRD (vendored: tests/schemas/), its pod templates,
claim and ConfigMap for the Kubernetes OpenAPI schemas (from the kubernetes client's models: tests/k8s_openapi.py);
it carries the plan and the composed config (a run file in its ConfigMap, with small local data), is sized by the
plan, matches k8s/base and the overlays, holds no secret, renders without downloading; the Kubernetes client
calls (claim, ConfigMap, create, poll, logs, delete)."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

from launch import k8s_submit, rayjob
from orchestrator.config import config_dict
from orchestrator.errors import UserError
from tests import k8s_openapi
from tests.conftest import ROOT, compose_run

CRD_SCHEMA = k8s_openapi.RAYJOB_SCHEMA  # KubeRay's RayJob CRD, v1, vendored (tests/schemas/README.md)
SIZED = ["cluster.nodes=2", "cluster.gpus=8", "cluster.gpu_memory_gb=80"]
POOLS = sorted(p.parent.name for p in (ROOT / "k8s" / "overlays").glob("*/rayjob-patch.yaml"))


# ---------------------------------------------------------------- validation: the CRD's schema + KubeRay's own rules

def strict(schema):
    """The CRD schema, with unknown fields rejected (as `kubectl apply --validate=strict` does)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text(encoding="utf-8"))))


def kuberay_rules(job: dict) -> list:
    """What KubeRay's validation adds to the schema (ValidateRayJobMetadata / ValidateRayJobSpec)."""
    name, spec = job["metadata"]["name"], job["spec"]
    problems = []
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r}: a DNS-1035 label of at most 47 characters")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or (
            not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0):
        problems.append("ttlSecondsAfterFinished")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("backoffLimit")
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.get("env_vars", {}).values()):
        problems.append("runtimeEnvYAML: a mapping with string env_vars")
    if spec.get("submissionMode") != "K8sJobMode" or not spec.get("entrypoint"):
        problems.append("K8sJobMode needs an entrypoint")
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        if not group["template"]["spec"].get("containers"):
            problems.append("every group needs a container")
    return problems


def assert_valid(job: dict, validator) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
    assert not errors, "\n".join(errors)
    assert not kuberay_rules(job)
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:  # as the API server reads the pods
        errors = k8s_openapi.errors(group["template"], "PodTemplateSpec")
        assert not errors, "\n".join(errors)


def assert_core_valid(obj: dict) -> None:
    errors = k8s_openapi.errors(obj, obj["kind"])
    assert not errors, "\n".join(errors)


def test_the_validator_catches_unknown_fields_and_bad_values(tmp_path, validator):
    job, _, _ = rendered(["+experiment=legal_full", *SIZED], tmp_path)
    worker_group(job)["replica"] = 2  # a typo
    worker(job)["resources"]["limits"]["nvidia.com/gpu"] = "8 GPUs"
    job["spec"]["backoffLimit"] = "0"
    errors = {e.message for e in validator.iter_errors(job)}
    assert any("'replica' was unexpected" in e for e in errors)
    assert any("'8 GPUs' does not match" in e for e in errors)
    assert any("'0' is not of type 'integer'" in e for e in errors)
    job["spec"]["backoffLimit"] = 0
    job["metadata"]["name"] = "x" * 48
    assert kuberay_rules(job)


# ---------------------------------------------------------------- rendering

def rendered(overrides, tmp_path, name="test-job"):
    overrides = [*overrides, "launcher=rayjob"]
    run = compose_run(overrides, tmp_path)
    plan, resources = rayjob.plan_for_cluster(run)
    return rayjob.render(run, plan, resources, overrides, name), plan, run


def rendered_all(overrides, tmp_path, name="test-job"):
    """{kind: object} of everything launcher=rayjob creates (claim, ConfigMap, RayJob), and the run."""
    overrides = [*overrides, "launcher=rayjob"]
    run = compose_run(overrides, tmp_path)
    plan, resources = rayjob.plan_for_cluster(run)
    return {o["kind"]: o for o in rayjob.render_all(run, plan, resources, overrides, name)}, run


def worker_group(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def worker(job):
    return worker_group(job)["template"]["spec"]["containers"][0]


CASES = {
    "legal_full_2x8": (["+experiment=legal_full", *SIZED], "full", 2, 8),
    "legal_full_h100": (["+experiment=legal_full", *SIZED, "k8s.node_pool=h100"], "full", 2, 8),
    "legal_full_one_gpu": (["+experiment=legal_full", "cluster.gpus=1", "cluster.gpu_memory_gb=80"], "lora", 1, 1),
    "lora_4_gpus_a100": (["+experiment=legal_full", "strategy=lora", "peft.rank=8", "cluster.gpus=4",
                          "cluster.gpu_memory_gb=80", "k8s.node_pool=a100"], "lora", 1, 4),
    "legal_demo_cpu": (["+experiment=legal_demo", "cluster.gpus=0"], "full", 2, 0),
    "object_store": (["+experiment=legal_full", *SIZED, "k8s.pvc=null", "k8s.storage_uri=s3://bucket/runs",
                      "k8s.active_deadline_seconds=86400", "k8s.shutdown_after_job_finishes=false",
                      "k8s.ttl_seconds_after_finished=0", "k8s.backoff_limit=2", "k8s.worker_cpu=64",
                      "k8s.worker_memory=512Gi", "k8s.shm_size=64Gi", "k8s.namespace=ml"], "full", 2, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_rayjob_is_valid_and_sized_by_the_plan(case, tmp_path, validator):
    overrides, strategy, pods, gpus = CASES[case]
    job, plan, run = rendered(overrides, tmp_path)
    assert_valid(job, validator)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert plan.strategy == strategy and job["metadata"]["labels"]["orchestrator/strategy"] == strategy
    group = worker_group(job)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
    assert worker(job)["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    assert pods * max(gpus, 1) == plan.num_workers
    assert group["groupName"] == ("gpu" if gpus else "cpu")
    spec = job["spec"]
    k = run.k8s
    assert spec["shutdownAfterJobFinishes"] is k.shutdown_after_job_finishes
    assert spec["ttlSecondsAfterFinished"] == k.ttl_seconds_after_finished
    assert spec["backoffLimit"] == k.backoff_limit
    assert spec.get("activeDeadlineSeconds") == k.active_deadline_seconds
    assert job["metadata"]["namespace"] == k.namespace
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing trains there


def composed_in_the_pod(objects, tmp_path):
    """The config the pod composes: the ConfigMap's run file (written where it is mounted) + the entrypoint."""
    from orchestrator.runfile import expand

    words = shlex.split(objects["RayJob"]["spec"]["entrypoint"])
    assert words[:7] == ["python", "-m", "orchestrator", "--config", f"{rayjob.JOB_MOUNT}/run.yaml", "~model",
                         "~data"]
    run_file = tmp_path / "mounted" / "run.yaml"
    run_file.parent.mkdir(parents=True)
    run_file.write_text(objects["ConfigMap"]["data"]["run.yaml"])
    args = expand(str(run_file), words[5:])
    return compose_run([a for a in args if not a.startswith("hydra.")], tmp_path / "inner"), words[5:]


def comparable(run):
    config = config_dict(run)
    for key in ("launcher", "dry_run", "k8s", "run_dir"):
        config.pop(key)
    config["cluster"]["address"] = "auto"
    return config


def test_the_pods_compose_the_same_config_and_plan_from_the_run_file(tmp_path):
    overrides = ["+experiment=legal_full", *SIZED, "optim.lr=2e-5", "peft.target_modules=[q_proj,v_proj]",
                 "k8s.node_pool=h100", "dry_run=true", "cluster.address=ray://elsewhere:10001",
                 "+model.config_overrides.max_position_embeddings=4096", "data.chat_template='{{ x }}: \\'quoted\\''"]
    objects, run = rendered_all(overrides, tmp_path)
    inner, args = composed_in_the_pod(objects, tmp_path)
    assert "cluster.address=auto" in args and "hydra.run.dir=/mnt/runs/legal_full/test-job" in args
    assert not [a for a in args
                if a.startswith(("+experiment", "launcher=", "dry_run=", "k8s.", "cluster.address=ray"))]
    assert comparable(inner) == comparable(run)
    inner_plan, _ = rayjob.plan_for_cluster(inner)
    plan, _ = rayjob.plan_for_cluster(run)
    assert inner_plan == plan
    assert_core_valid(objects["ConfigMap"])
    volume = next(v for v in pods(objects["RayJob"])[0]["volumes"] if v["name"] == "job")
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"] == "test-job-job"


def test_an_experiment_from_the_users_own_config_dir_travels_as_values(tmp_path):
    """+experiment=NAME from a directory of the user's (hydra.searchpath): the pods have no such file; the run
    file holds its values, and composes without it."""
    conf = tmp_path / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\nname: mine\ndefaults:\n  - override /model: tiny_llama\n"
                                    "  - override /data: legal_instructions\n"
                                    "trainer: {max_steps: 7}\noptim: {lr: 3.0e-4}\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "+experiment=mine", "cluster.gpus=0"]
    objects, run = rendered_all(overrides, tmp_path)
    assert run.name == "mine" and run.trainer.max_steps == 7
    assert "experiment" not in objects["RayJob"]["spec"]["entrypoint"]
    inner, _ = composed_in_the_pod(objects, tmp_path)  # composed from our hydra_conf alone
    assert comparable(inner) == comparable(run)
    assert_valid(objects["RayJob"], jsonschema_validator())


def jsonschema_validator():
    import jsonschema

    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text(encoding="utf-8"))))


def test_local_data_is_shipped_in_the_configmap_or_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = "".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n" for i in range(40))
    (tmp_path / "mine.jsonl").write_text(rows)
    folder = tmp_path / "mine_dir"
    folder.mkdir()
    (folder / "train.jsonl").write_text(rows)
    (folder / "validation.jsonl").write_text("".join(rows.splitlines(True)[:10]))
    (tmp_path / "general.txt").write_text("some general text\n" * 20)
    overrides = ["+experiment=legal_full", *SIZED, "data.path=mine.jsonl",
                 f"data.reference_path={tmp_path}/general.txt"]
    objects, run = rendered_all(overrides, tmp_path)
    cm, job = objects["ConfigMap"], objects["RayJob"]
    assert_core_valid(cm)
    shipped = yaml.safe_load(cm["data"]["run.yaml"])["data"]
    assert shipped["path"] == f"{rayjob.JOB_MOUNT}/data/0/mine.jsonl"
    assert shipped["reference_path"] == f"{rayjob.JOB_MOUNT}/data/1/general.txt"
    volume = next(v for v in pods(job)[1]["volumes"] if v["name"] == "job")
    items = {i["path"]: i["key"] for i in volume["configMap"]["items"]}
    assert cm["data"][items["data/0/mine.jsonl"]] == rows
    assert cm["data"][items["data/1/general.txt"]].startswith("some general text")
    for pod in pods(job):  # head (driver) and workers read it at the same path
        assert {"name": "job", "mountPath": rayjob.JOB_MOUNT, "readOnly": True} in pod["containers"][0]["volumeMounts"]
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED, "data.path=mine_dir"], tmp_path)  # a directory
    items = [i["path"] for i in next(v for v in pods(objects["RayJob"])[0]["volumes"]
                                     if v["name"] == "job")["configMap"]["items"]]
    assert items == ["run.yaml", "data/0/train.jsonl", "data/0/validation.jsonl"]
    assert yaml.safe_load(objects["ConfigMap"]["data"]["run.yaml"])["data"]["path"] == f"{rayjob.JOB_MOUNT}/data/0"
    # anything that is not UTF-8 text goes in binaryData
    files = rayjob.JobFiles("name: x\n", [("data0-0-blob.bin", "data/0/blob.bin", bytes(range(256)))])
    cm = rayjob.config_map(run.k8s, "test-job", files)
    assert_core_valid(cm)
    import base64
    assert base64.b64decode(cm["binaryData"]["data0-0-blob.bin"]) == bytes(range(256))

    # a path on the claim is the pods' own: unchanged, nothing shipped
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED, "data.path=/mnt/runs/data/train.jsonl"], tmp_path)
    assert yaml.safe_load(objects["ConfigMap"]["data"]["run.yaml"])["data"]["path"] == "/mnt/runs/data/train.jsonl"
    assert list(objects["ConfigMap"]["data"]) == ["run.yaml"]

    (tmp_path / "big.jsonl").write_text(rows * 700)  # ~1.4 MB
    with pytest.raises(UserError, match=r"^data.path=big.jsonl is on this machine only \(1\.\d MiB with the other "
                                        r"local data\), more than a RayJob carries with it \(1 MiB in all: its "
                                        r"ConfigMap\); copy it onto the claim \(kubectl cp into a pod that mounts "
                                        r"orchestrator-runs, e.g. to /mnt/runs/data/big.jsonl\) and set data.path"):
        rendered_all(["+experiment=legal_full", *SIZED, "data.path=big.jsonl"], tmp_path)


def test_runtime_env_and_storage(tmp_path):
    job, _, _ = rendered(["+experiment=legal_full", *SIZED, "+k8s.env.NCCL_DEBUG=INFO"], tmp_path)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NCCL_DEBUG"] == "INFO" and env["HF_HOME"] == "/mnt/runs/hf-cache"
    # the job's name is the run's identity: a retry under k8s.backoff_limit continues the run instead of being
    # refused for finding it in its run directory; the run directory is the job's own
    assert env["ORCHESTRATOR_RUN_ID"] == job["metadata"]["name"]
    assert any(o.endswith(f"/{job['metadata']['name']}") for o in shlex.split(job["spec"]["entrypoint"])
               if o.startswith("hydra.run.dir="))
    for pod in pods(job):
        claim = next(v for v in pod["volumes"] if v["name"] == "runs")
        assert claim["persistentVolumeClaim"]["claimName"] == "orchestrator-runs"
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]

    job, _, _ = rendered(["+experiment=legal_full", *SIZED, "k8s.pvc=null", "k8s.storage_uri=gs://b/ckpt"], tmp_path)
    assert "cluster.storage_path=gs://b/ckpt" in shlex.split(job["spec"]["entrypoint"])
    assert all(v["name"] != "runs" for pod in pods(job) for v in pod["volumes"])


def pods(job):
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"], worker_group(job)["template"]["spec"]]


def test_secrets_are_referenced_never_included(tmp_path):
    job, _, _ = rendered(["+experiment=legal_full", *SIZED, "k8s.wandb_secret=team-wandb", "k8s.hf_secret=null"],
                         tmp_path)
    for pod in pods(job):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "team-wandb", "key": "WANDB_API_KEY", "optional": True}}}
        assert "HF_TOKEN" not in env
        assert all("value" not in e for e in env.values())


def test_node_pool_sets_selector_tolerations_and_sizes(tmp_path):
    job, _, _ = rendered(["+experiment=legal_full", *SIZED, "k8s.node_pool=a100", "k8s.worker_memory=900Gi"], tmp_path)
    pod = worker_group(job)["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    resources = worker(job)["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == "88"  # the pool's
    assert resources["limits"]["memory"] == "900Gi"  # what the user said wins over the pool
    with pytest.raises(UserError, match=r"k8s.node_pool=tpu is not allowed: available: a100, h100"):
        rendered(["+experiment=legal_full", *SIZED, "k8s.node_pool=tpu"], tmp_path)


def test_rayjob_needs_the_cluster_size(tmp_path):
    with pytest.raises(UserError, match=r"launcher=rayjob plans for the Kubernetes cluster, not this machine: set "
                                        r"cluster.gpus"):
        rendered(["+experiment=legal_full"], tmp_path)
    with pytest.raises(UserError, match=r"cluster.gpu_memory_gb"):
        rendered(["+experiment=legal_full", "cluster.gpus=8"], tmp_path)


def test_job_names_are_dns_labels_within_kuberay_limit():
    name = rayjob.job_name("2024_Legal Full!!-" + "x" * 80, now=0, suffix="beef")
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and name.endswith("-beef")
    assert rayjob.job_name("legal_full", suffix="0a0a").startswith("legal-full-")
    assert rayjob.job_name("legal_full") != rayjob.job_name("legal_full")


BAD_K8S = [
    ("k8s.ttl_seconds_after_finished=-1", "k8s.ttl_seconds_after_finished=-1 is not allowed"),
    ("k8s.shutdown_after_job_finishes=false", "k8s.ttl_seconds_after_finished=600 is not allowed: 0 when"),
    ("k8s.active_deadline_seconds=0", "k8s.active_deadline_seconds=0 is not allowed"),
    ("k8s.backoff_limit=-1", "k8s.backoff_limit=-1 is not allowed"),
    ("k8s.job_name=Legal_Full", "k8s.job_name='Legal_Full' is not allowed"),
    ("k8s.head_cpu=lots", "k8s.head_cpu='lots' is not allowed: a Kubernetes quantity"),
    ("k8s.namespace=ML", "k8s.namespace='ML' is not allowed"),
    ("k8s.pvc=null", "k8s.pvc=None is not allowed"),
    ("+k8s.env.WANDB_API_KEY=sk-x", "k8s.env.WANDB_API_KEY='...' is not allowed: no secrets in k8s.env"),
]


@pytest.mark.parametrize("override,message", BAD_K8S, ids=[b[0] for b in BAD_K8S])
def test_k8s_settings_are_validated(override, message, tmp_path):
    with pytest.raises(UserError) as err:
        compose_run([override], tmp_path)
    assert str(err.value).startswith(message)
    assert "sk-x" not in str(err.value)


# ---------------------------------------------------------------- k8s/: the base, the overlays, the renderer agree

BASE_OVERRIDES = ["+experiment=legal_full", "model.allow_download=true", "cluster.nodes=1", "cluster.gpus=8",
                  "cluster.gpu_memory_gb=80", "k8s.job_name=legal-full", "dry_run=true"]


def base_docs():
    return list(yaml.safe_load_all((ROOT / "k8s" / "base" / "rayjob.yaml").read_text()))


def test_base_is_what_the_renderer_makes_from_the_defaults(tmp_path, validator):
    """Less the job's ConfigMap: the base composes legal_full from the image's configs (kubectl apply -k)."""
    (base,) = base_docs()
    assert_valid(base, validator)
    job, _, run = rendered(BASE_OVERRIDES, tmp_path, name="legal-full")
    del job["metadata"]["namespace"]
    for pod in pods(job):
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "job"]
        pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] != "job"]
    job["spec"]["entrypoint"] = rayjob.overrides_entrypoint(run, [*BASE_OVERRIDES, "launcher=rayjob"], "legal-full")
    job["spec"]["rayClusterSpec"]["rayVersion"] = base["spec"]["rayClusterSpec"]["rayVersion"]  # the Ray installed
    assert job == base, "k8s/base/rayjob.yaml and launch/rayjob.py (or KubeConfig's defaults) disagree"


@pytest.mark.parametrize("pool", POOLS)
def test_overlays_patch_the_base_into_valid_rayjobs(pool, validator):
    (base,) = base_docs()
    patched = copy.deepcopy(base)
    rayjob.apply_patch(patched, rayjob.node_pool_patch(pool), pool)
    assert_valid(patched, validator)
    assert patched != base and "nodeSelector" in worker_group(patched)["template"]["spec"]

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay was checked with the renderer's patching only")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / pool)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(result.stdout)}
    assert {"RayJob", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim"} <= set(docs)
    assert docs["RayJob"] == patched  # kustomize and the renderer apply the patch the same way
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cli_dry_run_prints_the_manifest_and_no_secret(tmp_path):
    planted = {"WANDB_API_KEY": "sk-planted-XYZ", "HF_TOKEN": "hf_planted_ABC"}
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "+experiment=legal_full", "launcher=rayjob", "dry_run=true", *SIZED,
         "k8s.node_pool=h100", "k8s.wandb_secret=my-wandb", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, **planted})
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))  # stdout is the manifests alone (the plan went to stderr)
    assert docs == list(yaml.safe_load_all((run_dir / "rayjob.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "ConfigMap", "RayJob"]
    manifest = docs[-1]
    assert "strategy=full" in result.stderr
    assert "k8s.image=orchestrator:0.1.0 names no registry" in result.stderr
    assert json.loads((run_dir / "plan.json").read_text())["num_workers"] == 16
    assert "launcher=rayjob" not in manifest["spec"]["entrypoint"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for pod in pods(manifest) for e in pod["containers"][0]["env"]]
    assert "my-wandb" in refs
    texts = [result.stdout, result.stderr] + [p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()]
    for secret in planted.values():
        assert all(secret not in text for text in texts)


# ---------------------------------------------------------------- the Kubernetes client calls, with mocks

class ApiException(Exception):
    """What kubernetes.client raises: an HTTP status, a reason and the response body."""

    def __init__(self, status, reason="", body=""):
        super().__init__(f"({status}) {reason}")
        self.status, self.reason, self.body = status, reason, body


def api_exception(status, reason="", body=""):
    return ApiException(status, reason, body)


class LogStream:
    def __init__(self, *chunks):
        self.chunks, self.released = chunks, False

    def stream(self, amount):
        yield from self.chunks

    def release_conn(self):
        self.released = True


def pod(name, phase):
    return SimpleNamespace(metadata=SimpleNamespace(name=name, creation_timestamp="2026-01-01T00:00:00Z"),
                           status=SimpleNamespace(phase=phase))


def fake_kube(statuses, pod_lists=(), log=None):
    custom, core = mock.MagicMock(), mock.MagicMock()
    custom.create_namespaced_custom_object.side_effect = lambda g, v, ns, pl, body: body
    custom.get_namespaced_custom_object.side_effect = [
        s if isinstance(s, BaseException) else {"status": s} for s in statuses]
    pod_lists = list(pod_lists) or [[]]
    core.list_namespaced_pod.side_effect = lambda ns, label_selector: SimpleNamespace(
        items=pod_lists.pop(0) if len(pod_lists) > 1 else pod_lists[0])
    core.read_namespaced_pod_log.return_value = log or LogStream()
    return k8s_submit.Kube(custom=custom, core=core)


def manifest(name="job-1", namespace="ml"):
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name, "namespace": namespace},
            "spec": {"entrypoint": "python -m orchestrator"}}


def kube_config(**kw):
    from orchestrator.config import KubeConfig

    return KubeConfig(**{"poll_seconds": 0.01, **kw})


def test_submit_creates_follows_to_success_and_streams_the_driver_log():
    log = LogStream(b"step 1/2 loss 2.1\n", b"step 2/2 loss 1.9\nexport: /mnt/runs/x/export\n")
    kube = fake_kube(
        statuses=[{}, {"jobDeploymentStatus": "Initializing"},
                  {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                  {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                  {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "Job finished"}],
        pod_lists=[[], [], [pod("job-1-abcde", "Pending")], [pod("job-1-abcde", "Running")]], log=log)
    out = io.StringIO()
    result = k8s_submit.submit(manifest(), kube_config(), kube=kube, out=out, sleep=lambda s: None)

    assert result == {"rayjob": "job-1", "namespace": "ml", "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    kube.custom.create_namespaced_custom_object.assert_called_once_with("ray.io", "v1", "ml", "rayjobs", manifest())
    kube.custom.get_namespaced_custom_object.assert_called_with("ray.io", "v1", "ml", "rayjobs", "job-1")
    kube.core.list_namespaced_pod.assert_called_with("ml", label_selector="job-name=job-1")
    kube.core.read_namespaced_pod_log.assert_called_once_with("job-1-abcde", "ml", follow=True,
                                                              _preload_content=False)
    assert log.released
    text = out.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("[rayjob/job-1]")]
    assert lines == ["[rayjob/job-1] deployment New, job -", "[rayjob/job-1] deployment Initializing, job -",
                     "[rayjob/job-1] deployment Running, job RUNNING",
                     "[rayjob/job-1] deployment Complete, job SUCCEEDED (Job finished)"]
    assert "step 2/2 loss 1.9" in text and "python -m launch.k8s_submit delete job-1 -n ml" in text


def test_a_failed_job_ends_the_command_with_its_reason():
    kube = fake_kube([{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                       "message": "exit code 1"}])
    with pytest.raises(UserError, match=r"rayjob/job-1 ended Failed, job FAILED: AppFailed; exit code 1 "
                                        r"\(logs: kubectl logs -n ml job/job-1\)"):
        k8s_submit.submit(manifest(), kube_config(), kube=kube, out=io.StringIO(), sleep=lambda s: None)
    kube = fake_kube([{"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}])
    with pytest.raises(UserError, match=r"job never ran: DeadlineExceeded"):
        k8s_submit.submit(manifest(), kube_config(), kube=kube, out=io.StringIO(), sleep=lambda s: None)


def test_ctrl_c_while_following_deletes_the_rayjob():
    kube = fake_kube([{"jobDeploymentStatus": "Running"}, KeyboardInterrupt()])
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        k8s_submit.submit(manifest(), kube_config(), kube=kube, out=out, sleep=lambda s: None)
    assert exit_.value.code == 130
    kube.custom.delete_namespaced_custom_object.assert_called_once_with(
        "ray.io", "v1", "ml", "rayjobs", "job-1", propagation_policy="Background")
    assert "deleted rayjob/job-1" in out.getvalue()


def test_without_follow_the_command_returns_after_creating():
    kube = fake_kube([])
    result = k8s_submit.submit(manifest(), kube_config(follow=False), kube=kube, out=io.StringIO())
    assert result == {"rayjob": "job-1", "namespace": "ml"}
    kube.custom.get_namespaced_custom_object.assert_not_called()


@pytest.mark.parametrize("status,message", [
    (409, "already exists: set another k8s.job_name"), (404, "is the KubeRay operator installed"),
    (403, "forbidden"), (422, "rejected the manifest: spec.entrypoint: Required value")])
def test_create_errors_say_what_to_do(status, message):
    kube = fake_kube([])
    kube.custom.create_namespaced_custom_object.side_effect = api_exception(
        status, body="spec.entrypoint: Required value" if status == 422 else "")
    with pytest.raises(UserError, match=r"creating rayjob/job-1 in namespace ml failed: .*" + re.escape(message)):
        k8s_submit.create(kube, manifest())


def test_following_survives_transient_errors_and_notices_deletion():
    kube = fake_kube([api_exception(500), api_exception(503), {"jobDeploymentStatus": "Complete",
                                                               "jobStatus": "SUCCEEDED"}])
    status = k8s_submit.follow(kube, "ml", "job-1", io.StringIO(), 0, sleep=lambda s: None)
    assert status["jobStatus"] == "SUCCEEDED"
    kube = fake_kube([{"jobDeploymentStatus": "Running"}, api_exception(404)])
    with pytest.raises(UserError, match="no longer exists"):
        k8s_submit.follow(kube, "ml", "job-1", io.StringIO(), 0, sleep=lambda s: None)
    kube = fake_kube([api_exception(500)] * k8s_submit.MAX_API_FAILURES)
    with pytest.raises(UserError, match="reading rayjob/job-1 failed: 500"):
        k8s_submit.follow(kube, "ml", "job-1", io.StringIO(), 0, sleep=lambda s: None)


def test_cli_follow_and_delete(capsys):
    kube = fake_kube([{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    assert k8s_submit.main(["follow", "job-1", "-n", "ml"], kube=kube) == 0
    assert k8s_submit.main(["delete", "job-1", "-n", "ml"], kube=kube) == 0
    kube.custom.delete_namespaced_custom_object.assert_called_once_with(
        "ray.io", "v1", "ml", "rayjobs", "job-1", propagation_policy="Background")
    kube.custom.delete_namespaced_custom_object.side_effect = api_exception(404)
    assert k8s_submit.main(["delete", "job-1"], kube=kube) == 0  # already gone
    kube = fake_kube([{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}])
    assert k8s_submit.main(["follow", "job-1"], kube=kube) == 2
    assert "error: rayjob/job-1 ended Failed" in capsys.readouterr().err


def test_connect_uses_the_pods_account_in_cluster_else_the_kubeconfig(monkeypatch):
    config = pytest.importorskip("kubernetes.config", reason="the kubernetes client is not installed")

    calls = []
    monkeypatch.setattr(config, "load_incluster_config", lambda: calls.append("in-cluster"))
    monkeypatch.setattr(config, "load_kube_config", lambda context=None: calls.append(f"kubeconfig:{context}"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    k8s_submit.connect()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    k8s_submit.connect("prod")
    assert calls == ["in-cluster", "kubeconfig:prod"]

    def missing(context=None):
        raise config.ConfigException("Invalid kube-config file. No configuration found.")

    monkeypatch.setattr(config, "load_kube_config", missing)
    with pytest.raises(UserError, match="no Kubernetes credentials: Invalid kube-config file"):
        k8s_submit.connect()


def test_launcher_rayjob_submits_the_rendered_manifest(tmp_path, monkeypatch):
    from orchestrator.__main__ import execute

    kube = fake_kube([{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    monkeypatch.setattr(k8s_submit, "connect", lambda context=None: kube)
    overrides = ["+experiment=legal_demo", "cluster.gpus=0", "launcher=rayjob", "k8s.namespace=ml",
                 "k8s.job_name=demo-1", "k8s.poll_seconds=0.01"]
    result = execute(compose_run(overrides, tmp_path), overrides)
    assert result["jobStatus"] == "SUCCEEDED"
    body = kube.custom.create_namespaced_custom_object.call_args.args[4]
    assert body["metadata"] == {**body["metadata"], "name": "demo-1", "namespace": "ml"}
    docs = list(yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text()))
    assert docs[-1] == body
    assert kube.core.create_namespaced_config_map.call_args.args == ("ml", docs[1])


def test_submit_creates_the_claim_where_missing_and_the_configmap_owned_by_the_rayjob(tmp_path):
    objects, _ = rendered_all(["+experiment=legal_demo", "cluster.gpus=0", "k8s.namespace=ml",
                               "k8s.storage_class=efs-sc"], tmp_path, name="job-1")
    claim, cm, job = objects["PersistentVolumeClaim"], objects["ConfigMap"], objects["RayJob"]
    kube = fake_kube([])
    kube.core.read_namespaced_persistent_volume_claim.side_effect = api_exception(404)
    kube.custom.create_namespaced_custom_object.side_effect = lambda g, v, ns, pl, body: {
        **body, "metadata": {**body["metadata"], "uid": "u-1"}}
    out = io.StringIO()
    k8s_submit.submit(job, kube_config(follow=False), kube=kube, out=out, companions=[claim, cm])
    kube.core.create_namespaced_persistent_volume_claim.assert_called_once_with("ml", claim)
    kube.core.create_namespaced_config_map.assert_called_once_with("ml", cm)
    kube.core.patch_namespaced_config_map.assert_called_once_with("job-1-job", "ml", {"metadata": {"ownerReferences": [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "job-1", "uid": "u-1"}]}})
    assert "created persistentvolumeclaim/orchestrator-runs (efs-sc, 1Ti, ReadWriteMany)" in out.getvalue()

    kube = fake_kube([])  # an existing claim is used as it is; a RayJob refused takes its ConfigMap with it
    kube.custom.create_namespaced_custom_object.side_effect = api_exception(409)
    with pytest.raises(UserError, match="already exists"):
        k8s_submit.submit(job, kube_config(follow=False), kube=kube, out=io.StringIO(), companions=[claim, cm])
    kube.core.create_namespaced_persistent_volume_claim.assert_not_called()
    kube.core.delete_namespaced_config_map.assert_called_once_with("job-1-job", "ml")


# ---------------------------------------------------------------- sizes, node pools, the claim

def pod_size(job):
    requests = worker(job)["resources"]["requests"]
    assert requests == {k: v for k, v in worker(job)["resources"]["limits"].items() if k != "nvidia.com/gpu"}
    return requests["cpu"], requests["memory"]


SIZES = {
    "per_gpu_default": (["+experiment=legal_full", *SIZED], ("64", "256Gi")),
    "per_gpu_set": (["+experiment=legal_full", *SIZED, "k8s.cpu_per_gpu=4", "k8s.memory_per_gpu_gb=48"],
                    ("32", "384Gi")),
    "h100_whole_node": (["+experiment=legal_full", *SIZED, "k8s.node_pool=h100"], ("88", "1400Gi")),
    "h100_half_node": (["+experiment=legal_full", "cluster.nodes=2", "cluster.gpus=4", "cluster.gpu_memory_gb=80",
                        "k8s.node_pool=h100"], ("44", "700Gi")),
    # ZeRO-3 offload of an 8B model on one node: 8.03e9 x 18 bytes = 135 GiB x 1.25 headroom on top of 8 x 32
    "offload": (["+experiment=legal_full", "cluster.gpus=8", "cluster.gpu_memory_gb=80", "strategy=full_offload"],
                ("64", "425Gi")),
    "offload_two_nodes": (["+experiment=legal_full", *SIZED, "strategy=full_offload"], ("64", "341Gi")),
    "cpu_workers": (["+experiment=legal_demo", "cluster.gpus=0"], ("8", "32Gi")),
    "explicit": (["+experiment=legal_full", *SIZED, "k8s.worker_cpu=90", "k8s.worker_memory=1Ti"], ("90", "1Ti")),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_worker_pods_are_sized_by_the_plan(case, tmp_path, validator):
    overrides, size = SIZES[case]
    job, plan, _ = rendered(overrides, tmp_path)
    assert_valid(job, validator)
    assert pod_size(job) == size
    if "offload" in case:
        assert plan.offload


def test_an_offload_plan_larger_than_the_pools_nodes_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^the worker pods need \d+ GiB of host memory each \(full_offload, \d+ GiB "
                                        r"of it offloaded optimizer state\), more than the h100 pool's 1400 GiB per "
                                        r"node: use more nodes"):
        rendered(["+experiment=legal_full", "model.path=meta-llama/Llama-3.1-70B-Instruct", "cluster.gpus=8",
                  "cluster.gpu_memory_gb=80", "strategy=full_offload", "k8s.node_pool=h100"], tmp_path)


def test_gpu_pods_tolerate_the_gpu_taint_and_take_a_node_selector(tmp_path, validator):
    job, _, _ = rendered(["+experiment=legal_full", *SIZED,
                          "+k8s.node_selector={node.kubernetes.io/instance-type:p5.48xlarge}"], tmp_path)
    assert_valid(job, validator)
    pod = worker_group(job)["template"]["spec"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    job, _, _ = rendered(["+experiment=legal_full", *SIZED, "k8s.node_pool=h100",
                          "+k8s.node_selector={topology.kubernetes.io/zone:us-east-1a}"], tmp_path)
    pod = worker_group(job)["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                   "topology.kubernetes.io/zone": "us-east-1a"}
    assert len(pod["tolerations"]) == 1
    job, _, _ = rendered(["+experiment=legal_demo", "cluster.gpus=0"], tmp_path)
    assert "tolerations" not in worker_group(job)["template"]["spec"]


def test_the_claim_is_rendered_with_its_storage_class(tmp_path):
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED, "k8s.storage_class=efs-sc", "k8s.pvc_size=500Gi",
                               "k8s.pvc=team-runs"], tmp_path)
    claim = objects["PersistentVolumeClaim"]
    assert_core_valid(claim)
    assert claim["metadata"]["name"] == "team-runs" and claim["spec"]["storageClassName"] == "efs-sc"
    assert claim["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED], tmp_path)  # the defaults: k8s/base/pvc.yaml
    base = yaml.safe_load((ROOT / "k8s" / "base" / "pvc.yaml").read_text())
    assert objects["PersistentVolumeClaim"] == {**base, "metadata": {**base["metadata"], "namespace": "default"}}
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED, "k8s.pvc=null", "k8s.storage_uri=s3://b/r"], tmp_path)
    assert "PersistentVolumeClaim" not in objects
    with pytest.raises(UserError, match="k8s.storage_class=EFS_sc is not allowed"):
        rendered(["+experiment=legal_full", *SIZED, "k8s.storage_class=EFS_sc"], tmp_path)


def test_core_objects_of_k8s_base_are_valid():
    for path in ("rbac.yaml", "pvc.yaml"):
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / path).read_text()):
            assert_core_valid(doc)
    bad = yaml.safe_load((ROOT / "k8s" / "base" / "pvc.yaml").read_text())
    bad["spec"]["accessMode"] = ["ReadWriteMany"]
    bad["spec"]["resources"]["requests"]["storage"] = "a lot"
    messages = "\n".join(k8s_openapi.errors(bad, "PersistentVolumeClaim"))
    assert "'accessMode' was unexpected" in messages and "'a lot' is not valid" in messages


def test_rendering_downloads_nothing(tmp_path, monkeypatch):
    """The k8s README's dry run (model.allow_download=true, a hub id): planned from the shape the project carries;
    the Hugging Face cache is only looked in, nothing is fetched (no weights, no tokenizer)."""
    import huggingface_hub
    import transformers

    calls = []

    def snapshot(*args, **kwargs):
        calls.append(("snapshot_download", args, kwargs))
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache") if kwargs.get(
            "local_files_only") else AssertionError(f"a download: snapshot_download{args}")

    def fetch(*args, **kwargs):
        raise AssertionError(f"a download: hf_hub_download{args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fetch)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fetch)
    objects, run = rendered_all(["+experiment=legal_full", *SIZED, "model.allow_download=true", "k8s.node_pool=h100",
                                 "strategy=full_offload"], tmp_path)
    assert run.model.allow_download and objects["RayJob"]
    assert all(kwargs.get("local_files_only") for _, _, kwargs in calls)
    # the pods download it: model.allow_download travels in the run file
    assert yaml.safe_load(objects["ConfigMap"]["data"]["run.yaml"])["model"]["allow_download"] is True


def test_a_registry_name_travels_as_its_entry_and_its_local_file(tmp_path, monkeypatch):
    """data.path=<a datasets.yaml name>: the pods have no datasets.yaml, so the run file gets the entry's settings
    (path, format, columns) and the local file it names is shipped like any other."""
    monkeypatch.chdir(tmp_path)
    rows = "".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(40))
    (tmp_path / "clauses.jsonl").write_text(rows)
    (tmp_path / "datasets.yaml").write_text("my_qa:\n  path: clauses.jsonl\n  format: alpaca\n"
                                           "  columns: {instruction: q, output: a}\n")
    objects, _ = rendered_all(["+experiment=legal_full", *SIZED, "data.path=my_qa"], tmp_path)
    run_file = objects["ConfigMap"]["data"]["run.yaml"]
    shipped = yaml.safe_load(run_file)["data"]
    assert shipped["path"] == f"{rayjob.JOB_MOUNT}/data/0/clauses.jsonl"
    assert shipped["format"] == "alpaca" and shipped["columns"] == {"instruction": "q", "output": "a"}
    assert shipped["registry"] is None
    assert f"# data.path was my_qa, {tmp_path / 'datasets.yaml'}:1" in run_file
