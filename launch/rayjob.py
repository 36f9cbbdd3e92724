"""launcher=rayjob: the composed config and its Plan → a KubeRay RayJob (ray.io/v1) manifest.

    python -m orchestrator +experiment=legal_full launcher=rayjob cluster.nodes=2 cluster.gpus=8 \\
        cluster.gpu_memory_gb=80 k8s.node_pool=h100 [dry_run=true]

The plan is made here for the cluster that cluster.nodes / cluster.gpus / cluster.gpu_memory_gb describe (no Ray
on this machine). The manifest is k8s/base/rayjob.yaml with the node pool's patch on top
(k8s/overlays/<k8s.node_pool>/rayjob-patch.yaml, the one kustomize applies), filled in from the config and the
plan. It goes to <run_dir>/rayjob.yaml; a dry run prints it on stdout (the plan goes to stderr), otherwise
launch/k8s_submit.py creates it and follows the job. The job runs `python -m orchestrator` with the same
overrides, joining the RayJob's own Ray cluster (cluster.address=auto), so the pods make the same Plan.
No secret passes through here: W&B and Hugging Face tokens reach the pods as secretKeyRef to Secrets named in k8s.*.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from launch.sweep_summary import override_key
from orchestrator.config import KubeConfig, RunConfig
from orchestrator.errors import UserError
from orchestrator.package_files import package_dir
from orchestrator.plan import ClusterResources, Plan
from orchestrator.run_identity import RUN_ID_ENV

K8S_DIR = package_dir("k8s")  # k8s/ of the checkout, shipped in the package as orchestrator.k8s
BASE = K8S_DIR / "base" / "rayjob.yaml"
MAX_NAME = 47  # KubeRay: the RayCluster's name is the RayJob's + 6 characters, within 53
HEAD, WORKER = "ray-head", "ray-worker"  # container names in the base
GPU = "nvidia.com/gpu"
SECRET_ENV = {"WANDB_API_KEY": "wandb_secret", "HF_TOKEN": "hf_secret"}  # env name (and key in the Secret) → k8s.*
DROPPED = ("launcher", "dry_run", "cluster.address")  # set for the job here, as are hydra.* (k8s.* mean nothing there)


def launch_rayjob(run: RunConfig, overrides: Sequence[str]) -> dict:
    """Plan, render, write <run_dir>/rayjob.yaml; print it (dry run) or submit and follow it."""
    check_k8s_values(run)  # before planning: a value Kubernetes rejects fails here, not at submission
    with contextlib.redirect_stdout(sys.stderr) if run.dry_run else contextlib.nullcontext():
        plan, resources = plan_for_cluster(run)
    name = run.k8s.job_name or job_name(run.name)
    manifest = render(run, plan, resources, overrides, name)
    text = to_yaml(manifest)
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, "rayjob.yaml"), "w", encoding="utf-8") as handle:
        handle.write(text)
    if run.dry_run:
        sys.stdout.write(text)
        sys.stdout.flush()
        return {"rayjob": name, "namespace": run.k8s.namespace}
    from launch.k8s_submit import submit

    return submit(manifest, run.k8s)


def plan_for_cluster(run: RunConfig) -> Tuple[Plan, ClusterResources]:
    """The Plan for the Kubernetes cluster described by cluster.*: the model's shape and the data are checked
    here where they can be (a known hub id, a local copy, a bundled sample); the pods read the real ones."""
    from orchestrator.preflight import DataCheck, preflight

    c = run.cluster
    if c.gpus is None or (c.gpus > 0 and c.gpu_memory_gb is None):
        raise UserError("launcher=rayjob plans for the Kubernetes cluster, not this machine: set cluster.gpus (GPUs "
                        "per worker pod, 0 for CPU workers), cluster.gpu_memory_gb (GiB per GPU) and cluster.nodes "
                        "(worker pods, default 1), e.g. cluster.nodes=2 cluster.gpus=8 cluster.gpu_memory_gb=80")
    resources = ClusterResources(nodes=c.nodes or 1, gpus_per_node=c.gpus, cpus=0, host_memory_gb=c.host_memory_gb,
                                 gpu_memory_gb=c.gpu_memory_gb if c.gpus else None)
    checked = preflight(
        run, lambda: resources, model_config=model_shape(run), check_freeze=True, report=True,
        # the pods run `python -m orchestrator` with the same overrides and its whole preflight; the run stays as
        # composed (its paths as the command line gives them, read in the pods' own directory; its micro-batch
        # null where the planner picks: the pods pick again)
        runs_here=False,
        data=DataCheck.where_present,  # the job reads the data in the cluster; here only what this machine has
    )
    return checked.plan, checked.resources


def model_shape(run: RunConfig) -> dict:
    """The model's config.json as this machine has it: a local copy, else the shape the project carries for a
    well-known hub id (the pods load the model itself)."""
    from orchestrator import console
    from orchestrator.model import read_model_config

    try:
        model_config = read_model_config(run.model, shape_only=True)
    except UserError as err:
        raise UserError(f"{err} (launcher=rayjob plans from the model's config.json on this machine: use a hub id "
                        "the project knows the shape of, or keep a copy of the model's directory at the same path)")
    if not run.model.allow_download and model_config_dir(run) is None:  # planned from the shape the project carries
        console.note(f"model.path={run.model.path}: the pods load it from their Hugging Face cache (HF_HOME, on the "
                     "claim); to fetch it there add model.allow_download=true")
    return model_config


def model_config_dir(run: RunConfig) -> Optional[str]:
    """The directory this machine reads the model's config.json from, or None where only its shape is known."""
    from orchestrator.model import resolve_model_path

    try:
        return resolve_model_path(run.model.path, allow_download=False)
    except UserError:
        return None


INT32_MAX = 2**31 - 1  # the RayJob CRD's integer fields are int32
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123


def check_k8s_values(run: RunConfig) -> None:
    """Values the Kubernetes API would reject, refused at render time: the names of the service account, the claim
    and the Secrets (DNS-1123 subdomains, at most 253 characters), integers beyond the CRD's int32, and a run name
    that would put the run directory (<k8s.mount_path>/<name>/<job>) outside the mounted claim."""
    k = run.k8s
    for key in ("service_account", "pvc", "wandb_secret", "hf_secret"):
        value = getattr(k, key)
        if value is not None and not (_DNS_SUBDOMAIN.fullmatch(value) and len(value) <= 253):
            raise UserError(f"k8s.{key}={value} is not allowed: a Kubernetes object name (DNS-1123: lowercase "
                            "letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253)")
    for key in ("ttl_seconds_after_finished", "backoff_limit", "active_deadline_seconds"):
        value = getattr(k, key)
        if value is not None and value > INT32_MAX:
            raise UserError(f"k8s.{key}={value} is not allowed: at most {INT32_MAX} (the RayJob's int32 field)")
    if run.cluster.nodes is not None and run.cluster.nodes > INT32_MAX:
        raise UserError(f"cluster.nodes={run.cluster.nodes} is not allowed: at most {INT32_MAX} (replicas is int32)")
    if not run.name.strip() or "/" in run.name or "\\" in run.name or run.name in (".", "..") or ".." in run.name:
        raise UserError(f"name={run.name} is not allowed with launcher=rayjob: the run directory is "
                        f"{k.mount_path.rstrip('/')}/<name>/<job> on the claim, and a name with '/' or '..' would "
                        "move it elsewhere; use letters, digits, '-', '_' and '.'")
    if os.path.normpath(k.mount_path) != k.mount_path.rstrip("/") and k.mount_path != "/":
        raise UserError(f"k8s.mount_path={k.mount_path} is not allowed: a normalised absolute path (no '..', '.' "
                        f"or '//'), e.g. {os.path.normpath(k.mount_path)}")


def render(run: RunConfig, plan: Plan, resources: ClusterResources, overrides: Sequence[str], name: str) -> dict:
    """The RayJob manifest (a plain dict). Pure: the same arguments give the same manifest."""
    check_k8s_values(run)
    k = run.k8s
    job = yaml.safe_load(read_text(BASE))
    if k.node_pool:
        apply_patch(job, node_pool_patch(k.node_pool), f"k8s/overlays/{k.node_pool}/rayjob-patch.yaml")
    job["metadata"] = {
        "name": name, "namespace": k.namespace,
        "labels": {"app.kubernetes.io/name": "orchestrator", "app.kubernetes.io/managed-by": "orchestrator",
                   "orchestrator/experiment": label_value(run.name), "orchestrator/strategy": plan.strategy.value},
        "annotations": {"orchestrator/plan": plan_line(plan)},
    }
    spec = job["spec"]
    spec["entrypoint"] = entrypoint(run, overrides, name)
    # the job's name is the run's identity (orchestrator/run_identity.py): a retry under k8s.backoff_limit reruns
    # the entrypoint in the same run directory and continues this run's checkpoints instead of being refused
    env_vars = {**runtime_env_vars(k), RUN_ID_ENV: name}
    spec["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": env_vars}, sort_keys=True)
    spec["shutdownAfterJobFinishes"] = k.shutdown_after_job_finishes
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    spec["backoffLimit"] = k.backoff_limit
    spec.pop("activeDeadlineSeconds", None)
    if k.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds

    cluster = spec["rayClusterSpec"]
    cluster["rayVersion"] = version("ray")
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    group = cluster["workerGroupSpecs"][0]
    worker_pod = group["template"]["spec"]
    for pod, container_name in ((head_pod, HEAD), (worker_pod, WORKER)):
        pod["serviceAccountName"] = k.service_account
        container = find(pod["containers"], container_name, "container")
        container["image"] = k.image
        container["imagePullPolicy"] = k.image_pull_policy
        container["env"] = [e for e in container.get("env", []) if e["name"] not in SECRET_ENV] + secret_env(k)
        storage(pod, container, k)
    set_resources(find(head_pod["containers"], HEAD, "container"), cpu=k.head_cpu, memory=k.head_memory)

    worker = find(worker_pod["containers"], WORKER, "container")
    set_resources(worker, cpu=k.worker_cpu, memory=k.worker_memory)
    if k.shm_size:
        find(worker_pod["volumes"], "dshm", "volume")["emptyDir"]["sizeLimit"] = k.shm_size
    replicas, gpus = layout(plan, resources)
    group.update(groupName="gpu" if gpus else "cpu", replicas=replicas, minReplicas=replicas, maxReplicas=replicas)
    for part in ("limits", "requests"):
        worker["resources"].get(part, {}).pop(GPU, None)
    if gpus:
        worker["resources"]["limits"][GPU] = gpus
    return job


def entrypoint(run: RunConfig, overrides: Sequence[str], name: str) -> str:
    """`python -m orchestrator` with the user's experiment and overrides, in the RayJob's own Ray cluster."""
    kept = [o for o in overrides if not dropped(o)]
    extra = ["cluster.address=auto", f"hydra.run.dir={run_dir_in_cluster(run.k8s, run.name, name)}"]
    if run.k8s.storage_uri and not any(override_key(o) == "cluster.storage_path" for o in kept):
        extra.append(f"cluster.storage_path={run.k8s.storage_uri}")
    return shlex.join(["python", "-m", "orchestrator", *kept, *extra])


def run_dir_in_cluster(k: KubeConfig, run_name: str, job: str) -> str:
    root = k.mount_path.rstrip("/") if k.pvc else "/tmp/orchestrator"  # without a claim: the head pod's disk
    return f"{root}/{run_name}/{job}"


def dropped(override: str) -> bool:
    key = override_key(override)
    return key in DROPPED or re.split(r"[./]", key)[0] in ("k8s", "hydra")


def runtime_env_vars(k: KubeConfig) -> Dict[str, str]:
    """The job's environment (Ray's runtime env): the same NCCL and Ray settings as a local run, the Hugging
    Face cache on the claim, then k8s.env. Secrets are not here: they come from Secrets in the pod spec.
    RAY_OVERRIDE_JOB_RUNTIME_ENV: the driver's ray.init (launch/local.py) passes the NCCL settings again, as
    read from this environment; without it Ray refuses the same keys in a job's and a driver's runtime env."""
    from launch.local import GPU_ENV, QUIET_ENV

    env = {**GPU_ENV, **QUIET_ENV, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    if k.pvc:
        env["HF_HOME"] = f"{k.mount_path.rstrip('/')}/hf-cache"
    env.update({key: str(value) for key, value in k.env.items()})
    return env


def secret_env(k: KubeConfig) -> List[Dict[str, Any]]:
    """WANDB_API_KEY and HF_TOKEN from Secrets, by reference only; optional, so a missing one starts the pod
    anyway (W&B then runs offline; public models need no token)."""
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": getattr(k, key), "key": env, "optional": True}}}
            for env, key in SECRET_ENV.items() if getattr(k, key)]


def storage(pod: dict, container: dict, k: KubeConfig) -> None:
    """The claim `runs` at k8s.mount_path on every pod, or no claim at all (k8s.pvc=null, k8s.storage_uri set)."""
    volumes, mounts = pod.setdefault("volumes", []), container.setdefault("volumeMounts", [])
    if k.pvc:
        find(volumes, "runs", "volume")["persistentVolumeClaim"]["claimName"] = k.pvc
        find(mounts, "runs", "volumeMount")["mountPath"] = k.mount_path
    else:
        volumes[:] = [v for v in volumes if v["name"] != "runs"]
        mounts[:] = [m for m in mounts if m["name"] != "runs"]


def set_resources(container: dict, cpu: Optional[str], memory: Optional[str]) -> None:
    """Requests = limits for CPU and memory (KubeRay tells Ray what the limits say)."""
    resources = container.setdefault("resources", {})
    for key, value in (("cpu", cpu), ("memory", memory)):
        if value is not None:
            for part in ("requests", "limits"):
                resources.setdefault(part, {})[key] = str(value)


def layout(plan: Plan, resources: ClusterResources) -> Tuple[int, int]:
    """(worker pods, GPUs per pod): one pod per node with one Ray Train worker per GPU; without GPUs,
    one pod per CPU worker."""
    if not plan.use_gpu:
        return plan.num_workers, 0
    assert plan.num_workers == resources.nodes * resources.gpus_per_node, "the plan uses every GPU"
    return resources.nodes, resources.gpus_per_node


def job_name(run_name: str, now: Optional[float] = None, suffix: Optional[str] = None) -> str:
    """<name>-<MMDD-HHMMSS>-<4 hex>: a DNS-1035 label of at most 47 characters, new for every run."""
    stem = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", run_name.lower()))
    stem = re.sub(r"^[^a-z]+", "", stem)[:30].strip("-") or "run"
    stamp = time.strftime("%m%d-%H%M%S", time.localtime(now))
    return f"{stem}-{stamp}-{suffix or os.urandom(2).hex()}"[:MAX_NAME]


def label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def plan_line(plan: Plan) -> str:
    kind = "GPU" if plan.use_gpu else "CPU"
    return (f"{plan.strategy}, {plan.num_workers} {kind} workers, ZeRO stage {plan.zero_stage}"
            f"{' + offload' if plan.offload else ''}, {plan.precision}, global batch {plan.global_batch_size}")


def node_pool_patch(pool: str) -> List[dict]:
    path = K8S_DIR / "overlays" / pool / "rayjob-patch.yaml"
    if not path.is_file():
        pools = sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/rayjob-patch.yaml"))
        raise UserError(f"k8s.node_pool={pool} is not allowed: available: {', '.join(pools) or 'none'} "
                        f"(directories in {K8S_DIR / 'overlays'} with a rayjob-patch.yaml)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def apply_patch(doc: Any, operations: List[dict], source: str) -> None:
    """RFC 6902 add / replace / remove, as kustomize applies a JSON patch."""
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        try:
            parent = doc
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            last = parts[-1]
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if op["op"] == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                elif op["op"] == "replace":
                    parent[index] = copy.deepcopy(op["value"])
                else:
                    del parent[index]
            elif op["op"] == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif op["op"] == "replace" and last in parent:
                parent[last] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del parent[last]
            else:
                raise KeyError(last)
        except (KeyError, IndexError, ValueError, TypeError):
            raise UserError(f"{source}: {op['op']} {op['path']} does not fit k8s/base/rayjob.yaml") from None


def find(items: List[dict], name: str, what: str) -> dict:
    for item in items:
        if item.get("name") == name:
            return item
    raise UserError(f"k8s/base/rayjob.yaml: no {what} named {name!r} (the renderer fills it in)")


def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path} is missing: launcher=rayjob renders from the k8s/ templates installed with "
                        "orchestrator (reinstall it: pip install .)")
    return path.read_text(encoding="utf-8")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML) as literal blocks; keys in the order they were built."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
