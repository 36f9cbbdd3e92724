"""launcher=rayjob: the composed config and its Plan → a KubeRay RayJob (ray.io/v1) manifest.

    python -m orchestrator +experiment=legal_full launcher=rayjob cluster.nodes=2 cluster.gpus=8 \\
        cluster.gpu_memory_gb=80 k8s.node_pool=h100 [dry_run=true]

The plan is made here for the cluster that cluster.nodes / cluster.gpus / cluster.gpu_memory_gb describe (no Ray
on this machine). The manifest is k8s/base/rayjob.yaml with the node pool's patch on top
(k8s/overlays/<k8s.node_pool>/rayjob-patch.yaml, the one kustomize applies), filled in from the config and the
plan. It goes to <run_dir>/rayjob.yaml; a dry run prints it on stdout (the plan goes to stderr), otherwise
launch/k8s_submit.py creates it and follows the job.

The job is self-sufficient: the run's composed, resolved config travels with it as a run file in a ConfigMap
(<job>-job, mounted on every pod at JOB_MOUNT), together with the local data files it names (at most 1 MiB in all;
larger local data is refused here: put it on the claim), and the entrypoint is `python -m orchestrator --config
JOB_MOUNT/run.yaml` joining the RayJob's own Ray cluster (cluster.address=auto), so the pods make the same Plan
from the same config, whatever experiment directories this machine composed it from. The code is the image's.
Worker pods are sized by the plan (CPUs and memory per GPU, plus the host memory of an offload plan); the claim
is rendered too (k8s.storage_class, k8s.pvc_size) and created at submission when missing. Nothing here
downloads weights: the plan reads the model's config.json (a local copy or the shapes the project carries).
No secret passes through here: W&B and Hugging Face tokens reach the pods as secretKeyRef to Secrets named in k8s.*.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import math
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
from orchestrator.config import KubeConfig, RunConfig, config_dict
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
PVC_TEMPLATE = K8S_DIR / "base" / "pvc.yaml"
JOB_MOUNT = "/etc/orchestrator/job"  # the job's ConfigMap on every pod: run.yaml and the local data it names
RUN_FILE = "run.yaml"
JOB_FILES_LIMIT = 1_000_000  # bytes: a ConfigMap holds at most 1 MiB (etcd's limit), metadata included
CPU_PER_GPU, MEMORY_PER_GPU_GB = 8.0, 32.0  # worker pod size per GPU (per CPU worker) without a node pool
OFFLOAD_HEADROOM = 1.25  # host memory of an offload plan: ZeRO-3's state plus pinned buffers and fragmentation
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}  # the usual taint of GPU nodes


def launch_rayjob(run: RunConfig, overrides: Sequence[str]) -> dict:
    """Plan, render, write <run_dir>/rayjob.yaml; print it (dry run) or submit and follow it."""
    check_k8s_values(run)  # before planning: a value Kubernetes rejects fails here, not at submission
    with contextlib.redirect_stdout(sys.stderr) if run.dry_run else contextlib.nullcontext():
        plan, resources = plan_for_cluster(run)
        note_image(run.k8s)
    name = run.k8s.job_name or job_name(run.name)
    objects = render_all(run, plan, resources, overrides, name)
    text = to_yaml_documents(objects)
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, "rayjob.yaml"), "w", encoding="utf-8") as handle:
        handle.write(text)
    if run.dry_run:
        sys.stdout.write(text)
        sys.stdout.flush()
        return {"rayjob": name, "namespace": run.k8s.namespace}
    from launch.k8s_submit import submit

    return submit(objects[-1], run.k8s, companions=objects[:-1])


def note_image(k: KubeConfig) -> None:
    """The default image has no registry: a cluster pulls it from Docker Hub, where it does not exist."""
    from orchestrator import console

    if "/" not in k.image.split("@")[0].rsplit(":", 1)[0]:
        console.note(f"k8s.image={k.image} names no registry: the nodes pull docker.io/library/{k.image}, which is "
                     "not there (ErrImagePull) unless the image is already on them (kind load, minikube); build and "
                     "push yours (k8s/README.md, step 1) and set k8s.image=REGISTRY/orchestrator:TAG")


def render_all(run: RunConfig, plan: Plan, resources: ClusterResources, overrides: Sequence[str],
               name: str) -> List[dict]:
    """Everything the job needs, in the order it is created: the claim (if k8s.pvc), the job's ConfigMap (its
    run file and local data), the RayJob."""
    files = job_files(run, overrides, name)
    objects = [claim(run.k8s)] if run.k8s.pvc else []
    return objects + [config_map(run.k8s, name, files), render(run, plan, resources, overrides, name, files)]


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
    for key in ("service_account", "pvc", "wandb_secret", "hf_secret", "storage_class"):
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


def render(run: RunConfig, plan: Plan, resources: ClusterResources, overrides: Sequence[str], name: str,
           files: Optional["JobFiles"] = None) -> dict:
    """The RayJob manifest (a plain dict). Pure: the same arguments (and local files) give the same manifest.
    files: the job's ConfigMap contents (job_files), computed here when not given."""
    check_k8s_values(run)
    k = run.k8s
    files = files or job_files(run, overrides, name)
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
        mount_job_files(pod, container, name, files)
    set_resources(find(head_pod["containers"], HEAD, "container"), cpu=k.head_cpu, memory=k.head_memory)

    worker = find(worker_pod["containers"], WORKER, "container")
    replicas, gpus = layout(plan, resources)
    pool = find(worker_pod["containers"], WORKER, "container") if k.node_pool else None
    cpu, memory = worker_size(run, plan, resources, gpus, pool_size(pool) if pool else None)
    set_resources(worker, cpu=cpu, memory=memory)
    if k.shm_size:
        find(worker_pod["volumes"], "dshm", "volume")["emptyDir"]["sizeLimit"] = k.shm_size
    group.update(groupName="gpu" if gpus else "cpu", replicas=replicas, minReplicas=replicas, maxReplicas=replicas)
    for part in ("limits", "requests"):
        worker["resources"].get(part, {}).pop(GPU, None)
    tolerations = [t for t in worker_pod.pop("tolerations", []) if gpus or t.get("key") != GPU]
    if gpus:
        worker["resources"]["limits"][GPU] = gpus
        if not any(t.get("key") == GPU for t in tolerations):
            tolerations.append(dict(GPU_TOLERATION))
    if tolerations:
        worker_pod["tolerations"] = tolerations
    if k.node_selector:
        worker_pod["nodeSelector"] = {**worker_pod.get("nodeSelector", {}), **k.node_selector}
    return job


def worker_spec(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def entrypoint(run: RunConfig, overrides: Sequence[str], name: str) -> str:
    """`python -m orchestrator --config <the job's run file>` in the RayJob's own Ray cluster: the run file is the
    composed, resolved config (job_files), so the pods need none of the files it was composed from."""
    cleared = [f"~{group}" for group in chosen_groups()]  # the run file's values alone, over the schema's defaults
    return shlex.join(["python", "-m", "orchestrator", "--config", f"{JOB_MOUNT}/{RUN_FILE}", *cleared,
                       *cluster_overrides(run, overrides, name)])


def chosen_groups() -> List[str]:
    """The config groups hydra_conf/config.yaml's defaults list chooses an option of (model, data): the job
    deletes them (~model ~data), as the run file holds every value they set."""
    config = yaml.safe_load(read_text(package_dir("hydra_conf") / "config.yaml")) or {}
    return [key for entry in config.get("defaults", []) if isinstance(entry, dict)
            for key, choice in entry.items() if choice is not None and not key.startswith("override")]


def overrides_entrypoint(run: RunConfig, overrides: Sequence[str], name: str) -> str:
    """`python -m orchestrator` with the user's experiment and overrides, composed again in the pods from the
    image's configs: what k8s/base/rayjob.yaml runs without the renderer (kubectl apply -k)."""
    kept = [o for o in overrides if not dropped(o)]
    return shlex.join(["python", "-m", "orchestrator", *kept, *cluster_overrides(run, overrides, name)])


def cluster_overrides(run: RunConfig, overrides: Sequence[str], name: str) -> List[str]:
    """What the job sets in the cluster: its Ray cluster, its run directory on the claim, the object store."""
    extra = ["cluster.address=auto", f"hydra.run.dir={run_dir_in_cluster(run.k8s, run.name, name)}"]
    kept = [o for o in overrides if not dropped(o)]
    if run.k8s.storage_uri and not any(override_key(o) == "cluster.storage_path" for o in kept):
        extra.append(f"cluster.storage_path={run.k8s.storage_uri}")
    return extra


# ---------------------------------------------------------------- what travels with the job: its ConfigMap

class JobFiles:
    """The job's ConfigMap contents: the run file, and the local data files it names (key, path under
    JOB_MOUNT, bytes)."""

    def __init__(self, run_yaml: str, data: List[Tuple[str, str, bytes]]):
        self.run_yaml, self.data = run_yaml, data

    def items(self) -> List[Dict[str, str]]:
        return [{"key": RUN_FILE, "path": RUN_FILE}] + [{"key": key, "path": path} for key, path, _ in self.data]


def data_path_keys(run: RunConfig) -> List[Tuple[str, Any, str]]:
    """(key as the user writes it, the object holding it, its attribute) for every data path of the run."""
    d = run.data
    keys = [(f"data.{a}", d, a) for a in ("path", "validation_path", "reference_path")]
    for i, entry in enumerate(d.mix or []):
        keys += [(f"data.mix[{i}].{a}", entry, a) for a in ("path", "validation_path")]
    return keys


def local_data(path: Optional[str], k: KubeConfig) -> Optional[Path]:
    """The file or directory a data path names on this machine, where the pods cannot read it: None for a
    bundled sample, a URI, a path on the claim (as the pods see it), or a name this machine has no file of
    (a dataset id or registry name: the pods resolve it)."""
    if not path or path.startswith(("sample:", "builtin:")) or "://" in path:
        return None
    expanded = Path(os.path.expanduser(path))
    if expanded.is_absolute() and k.pvc and on_claim(str(expanded), k.mount_path):
        return None
    candidate = expanded if expanded.is_absolute() else Path.cwd() / expanded
    return candidate.resolve() if candidate.exists() else None


def on_claim(path: str, mount_path: str) -> bool:
    mount = mount_path.rstrip("/") or "/"
    return os.path.normpath(path) == mount or os.path.normpath(path).startswith(mount.rstrip("/") + "/")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def job_files(run: RunConfig, overrides: Sequence[str], name: str) -> JobFiles:
    """The run file (the composed, resolved config, local data paths pointed at their copies under JOB_MOUNT)
    and those copies. Local data beyond the ConfigMap's limit is refused with what to do instead."""
    k = run.k8s
    run, named = with_registry_entries(run)
    config = config_dict(run)
    shipped: Dict[Path, str] = {}  # a local file or directory → its path in the pods
    data: List[Tuple[str, str, bytes]] = []
    for key, holder, attr in data_path_keys(run):
        value = getattr(holder, attr)
        local = local_data(value, k)
        if local is None:
            continue
        if local not in shipped:
            index = len(shipped)
            if local.is_dir():
                members = sorted(p for p in local.rglob("*") if p.is_file())
                shipped[local] = f"{JOB_MOUNT}/data/{index}"
            else:
                members = [local]
                shipped[local] = f"{JOB_MOUNT}/data/{index}/{local.name}"
            for j, member in enumerate(members):
                relative = member.relative_to(local).as_posix() if local.is_dir() else local.name
                data.append((config_key(f"data{index}-{j}-{member.name}"), f"data/{index}/{relative}",
                             member.read_bytes()))
            size = sum(configmap_bytes(content) for _, _, content in data)
            if size > JOB_FILES_LIMIT:
                where = (f"copy it onto the claim (kubectl cp into a pod that mounts {k.pvc}, e.g. to "
                         f"{k.mount_path.rstrip('/')}/data/{local.name}) and set {key} to that path"
                         if k.pvc else "put it where the pods can read it (in the image, or on a claim: k8s.pvc)")
                raise UserError(f"{key}={value} is on this machine only ({human_bytes(size)} with the other local "
                                f"data), more than a RayJob carries with it (1 MiB in all: its ConfigMap); {where}")
        set_dotted(config, key, shipped[local])
    for key in ("run_dir", "launcher", "dry_run", "k8s"):
        config.pop(key, None)
    kept = [o for o in overrides if not dropped(o)]
    header = ("# The run's config as composed and resolved where the RayJob was rendered (launcher=rayjob), read\n"
              "# by the job's `python -m orchestrator --config` (orchestrator/runfile.py), whose ~model ~data clear\n"
              "# the config groups, so that these values alone, over the schema's defaults, make the run.\n"
              f"# RayJob {name}, from: {shlex.join(kept) or '(the defaults)'}\n"
              + "".join(f"# data.path was {name}, {where}: the entry's settings are written out here\n"
                        for name, where in named)
              + "".join(f"# {key} was {getattr(holder, attr)} on that machine: shipped here\n"
                        for key, holder, attr in data_path_keys(run) if local_data(getattr(holder, attr), k)))
    text = header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    return JobFiles(text, data)


def with_registry_entries(run: RunConfig) -> Tuple[RunConfig, List[Tuple[str, str]]]:
    """A data.path that names a datasets.yaml entry here (the working directory's, the run file's, data.registry)
    is written out as the entry's settings (its path, format, split, columns), since the pods have none of those
    files; a local path the entry names is then shipped like any other. Anything else is left to the pods."""
    import dataclasses

    from orchestrator.data.sources import resolve

    try:
        source = resolve(run.data)
    except UserError:  # e.g. a path on the claim, which only the pods see
        return run, []
    if not source.registry:
        return run, []
    merged = dataclasses.replace(source.cfg, path=source.location, registry=None)  # cfg.path is the location
    return dataclasses.replace(run, data=merged), [(source.name, source.registry)]


def set_dotted(config: dict, key: str, value: str) -> None:
    """config['data']['mix'][0]['path'] = value for key 'data.mix[0].path'."""
    node: Any = config
    parts = re.findall(r"[^.\[\]]+", key)
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[parts[-1]] = value


def config_key(text: str) -> str:
    """A ConfigMap key: letters, digits, '-', '_', '.'; at most 253 characters."""
    return re.sub(r"[^-._a-zA-Z0-9]", "_", text)[:253]


def configmap_bytes(content: bytes) -> int:
    """Bytes a file takes in the ConfigMap: text as it is, anything else base64 (binaryData)."""
    try:
        content.decode("utf-8")
        return len(content)
    except UnicodeDecodeError:
        return 4 * math.ceil(len(content) / 3)


def config_map_name(job: str) -> str:
    return f"{job}-job"


def config_map(k: KubeConfig, job: str, files: JobFiles) -> dict:
    """The job's ConfigMap: run.yaml and the local data files (text in data, anything else in binaryData).
    At submission it is created before the RayJob and then owned by it (deleted with it)."""
    text: Dict[str, str] = {RUN_FILE: files.run_yaml}
    binary: Dict[str, str] = {}
    for key, _, content in files.data:
        try:
            text[key] = content.decode("utf-8")
        except UnicodeDecodeError:
            binary[key] = base64.b64encode(content).decode("ascii")
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map_name(job), "namespace": k.namespace,
                         "labels": {"app.kubernetes.io/name": "orchestrator",
                                    "app.kubernetes.io/managed-by": "orchestrator", "orchestrator/rayjob": job}},
            "data": text}
    if binary:
        body["binaryData"] = binary
    return body


def mount_job_files(pod: dict, container: dict, job: str, files: JobFiles) -> None:
    """The job's ConfigMap, read-only at JOB_MOUNT (the files as their items say: run.yaml, data/<n>/...)."""
    pod.setdefault("volumes", []).append(
        {"name": "job", "configMap": {"name": config_map_name(job), "items": files.items()}})
    container.setdefault("volumeMounts", []).append({"name": "job", "mountPath": JOB_MOUNT, "readOnly": True})


def claim(k: KubeConfig) -> dict:
    """The ReadWriteMany claim (k8s/base/pvc.yaml) named k8s.pvc, of class k8s.storage_class (null: the
    cluster's default) and size k8s.pvc_size. Created at submission only where it is missing."""
    pvc = yaml.safe_load(read_text(PVC_TEMPLATE))
    pvc["metadata"] = {**pvc["metadata"], "name": k.pvc, "namespace": k.namespace}
    pvc["spec"]["resources"]["requests"]["storage"] = k.pvc_size
    if k.storage_class:
        pvc["spec"]["storageClassName"] = k.storage_class
    return pvc


# ---------------------------------------------------------------- worker pod size: per GPU, plus offload

_QUANTITY_UNITS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                   "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}


def quantity(text: Any) -> float:
    """A Kubernetes quantity (88, 500m, 1400Gi, 1e3) as a number (of CPUs, of bytes)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2) not in _QUANTITY_UNITS:
        raise UserError(f"{text!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    return float(match.group(1)) * _QUANTITY_UNITS[match.group(2)]


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def memory_quantity(gib: float) -> str:
    return f"{math.ceil(gib)}Gi"


def pool_size(container: dict) -> Optional[Tuple[float, float, int]]:
    """(CPUs, GiB, GPUs) of a node pool's worker pod, as its patch sets them, or None without GPUs there."""
    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    gpus = int(limits.get(GPU) or 0)
    if not gpus or "cpu" not in requests or "memory" not in requests:
        return None
    return quantity(requests["cpu"]), quantity(requests["memory"]) / 2**30, gpus


def worker_size(run: RunConfig, plan: Plan, resources: ClusterResources, gpus: int,
                pool: Optional[Tuple[float, float, int]]) -> Tuple[str, str]:
    """The worker pod's CPU and memory. CPU: k8s.worker_cpu, else k8s.cpu_per_gpu (null: the node pool's share,
    else 8) times the pod's GPUs. Memory: k8s.worker_memory, else what the workers need (k8s.memory_per_gpu_gb,
    else 32 GiB, per GPU) plus, for an offload plan, the host memory ZeRO-3 keeps there
    (memory.host_bytes_for_offload, with headroom); on a node pool at least the pool's share of its node, and
    never more than its node (refused: the pod could not be scheduled)."""
    k = run.k8s
    slots = max(gpus, 1)  # a CPU pod holds one Ray Train worker
    cpu_each = k.cpu_per_gpu or (pool[0] / pool[2] if pool else CPU_PER_GPU)
    cpu = k.worker_cpu or cpu_quantity(round(cpu_each * slots, 3))
    if k.worker_memory:
        return cpu, k.worker_memory
    offload = offload_host_gib(run, plan, resources) if plan.offload else 0.0
    needed = (k.memory_per_gpu_gb or MEMORY_PER_GPU_GB) * slots + offload
    if pool is None:
        return cpu, memory_quantity(needed)
    node_gib = pool[1]
    if needed > node_gib:
        raise UserError(f"the worker pods need {needed:.0f} GiB of host memory each ({plan.strategy}"
                        f"{f', {offload:.0f} GiB of it offloaded optimizer state' if offload else ''}), more than "
                        f"the {k.node_pool} pool's {node_gib:.0f} GiB per node: use more nodes (cluster.nodes), "
                        "another strategy, or k8s.worker_memory if the nodes have more")
    share = node_gib / pool[2] * slots if k.memory_per_gpu_gb is None else 0.0
    return cpu, memory_quantity(max(needed, share))


def offload_host_gib(run: RunConfig, plan: Plan, resources: ClusterResources) -> float:
    """GiB of host memory per worker pod (one per node) that an offload plan keeps there."""
    from orchestrator.memory import GIB, ModelShape, host_bytes_for_offload
    from orchestrator.model import read_model_config

    shape = ModelShape.from_config(read_model_config(run.model, shape_only=True))
    return OFFLOAD_HEADROOM * host_bytes_for_offload(shape, max(resources.nodes, 1)) / GIB


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


def to_yaml_documents(objects: Sequence[dict]) -> str:
    """Several objects as one YAML stream (kubectl create -f takes it as it is)."""
    return "---\n".join(to_yaml(o) for o in objects)
