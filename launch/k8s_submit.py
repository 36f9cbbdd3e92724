"""Create a rendered RayJob with the Kubernetes Python client, follow it to its end, delete it.

    python -m orchestrator ... launcher=rayjob        create, then follow (Ctrl-C deletes the RayJob)
    python -m launch.k8s_submit follow NAME [-n NAMESPACE] [--context CONTEXT]   (Ctrl-C only stops following)
    python -m launch.k8s_submit delete NAME [-n NAMESPACE] [--context CONTEXT]

Before the RayJob: its claim (k8s.pvc) is created where it is missing (an existing one is used as it is), and
its ConfigMap (the run file and local data, launch/rayjob.py) is created, then owned by the RayJob so that
deleting the RayJob deletes it.

Credentials: the kubeconfig (KUBECONFIG or ~/.kube/config, k8s.context), or the pod's service account when this
runs inside the cluster. Following reads the RayJob's status (jobDeploymentStatus, jobStatus) every
k8s.poll_seconds and streams the log of KubeRay's submitter pod (`ray job submit`, which tails the driver's log).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, TextIO

from orchestrator.config import KubeConfig
from orchestrator.errors import UserError, report_user_error

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
FINISHED = ("Complete", "Failed", "ValidationFailed")  # jobDeploymentStatus values after which nothing changes
SUBMITTER_LABEL = "job-name"  # the batch Job that KubeRay creates for the submitter has the RayJob's name
MAX_API_FAILURES = 5  # consecutive failed status reads before giving up


@dataclass
class Kube:
    custom: Any  # kubernetes.client.CustomObjectsApi
    core: Any  # kubernetes.client.CoreV1Api


def connect(context: Optional[str] = None) -> Kube:
    """In a pod: its service account; elsewhere: the kubeconfig (the current context, or `context`)."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
            config.load_incluster_config()
        else:
            config.load_kube_config(context=context)
    except (config.ConfigException, OSError) as err:
        raise UserError(f"no Kubernetes credentials: {err} (set KUBECONFIG, k8s.context, or run inside the "
                        "cluster with a service account allowed to create rayjobs: k8s/base/rbac.yaml)") from None
    return Kube(custom=client.CustomObjectsApi(), core=client.CoreV1Api())


def submit(manifest: dict, k: KubeConfig, kube: Optional[Kube] = None, out: TextIO = sys.stdout,
           sleep: Callable[[float], None] = time.sleep, companions: Sequence[dict] = ()) -> dict:
    """Create the RayJob (after its companions: the claim where missing, the job's ConfigMap); with k8s.follow,
    follow it to its end (Ctrl-C deletes it). Returns its final status."""
    kube = kube or connect(k.context)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    config_maps = [o for o in companions if o["kind"] == "ConfigMap"]
    for claim in (o for o in companions if o["kind"] == "PersistentVolumeClaim"):
        ensure_claim(kube, claim, out)
    for config_map in config_maps:
        create_config_map(kube, config_map)
    try:
        created = create(kube, manifest)
    except BaseException:
        for config_map in config_maps:
            delete_config_map(kube, config_map)
        raise
    for config_map in config_maps:
        own(kube, config_map, created, out)
    out.write(f"created rayjob/{name} in namespace {namespace}\n"
              f"  follow: python -m launch.k8s_submit follow {name} -n {namespace}\n"
              f"  delete: python -m launch.k8s_submit delete {name} -n {namespace}"
              f"{' (or Ctrl-C here)' if k.follow else ''}\n")
    out.flush()
    if not k.follow:
        return {"rayjob": name, "namespace": namespace}
    try:
        status = follow(kube, namespace, name, out, k.poll_seconds, sleep)
    except KeyboardInterrupt:
        delete(kube, namespace, name)
        out.write(f"\ninterrupted: deleted rayjob/{name} (KubeRay removes its RayCluster and pods)\n")
        out.flush()
        raise SystemExit(130) from None
    return finished(name, namespace, status)


def create(kube: Kube, manifest: dict) -> dict:
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    try:
        return kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except Exception as err:  # kubernetes.client.ApiException, without importing the client for tests
        raise api_error(err, f"creating rayjob/{name} in namespace {namespace}") from None


def ensure_claim(kube: Kube, claim: dict, out: TextIO) -> None:
    """Create the claim where it is missing; an existing one is used as it is (a note where its class differs)."""
    name, namespace = claim["metadata"]["name"], claim["metadata"]["namespace"]
    wanted = claim["spec"].get("storageClassName")
    try:
        existing = kube.core.read_namespaced_persistent_volume_claim(name, namespace)
    except Exception as err:
        if getattr(err, "status", None) != 404:
            out.write(f"[rayjob] cannot read persistentvolumeclaim/{name} ({getattr(err, 'status', err)}): "
                      "using it as it is\n")
            return
        try:
            kube.core.create_namespaced_persistent_volume_claim(namespace, claim)
        except Exception as err:
            raise api_error(err, f"creating persistentvolumeclaim/{name} in namespace {namespace}") from None
        out.write(f"created persistentvolumeclaim/{name} ({wanted or 'the default storage class'}, "
                  f"{claim['spec']['resources']['requests']['storage']}, ReadWriteMany)\n")
        return
    spec = getattr(existing, "spec", None)
    has = getattr(spec, "storage_class_name", None) if spec is not None else None
    if wanted and has and has != wanted:
        out.write(f"[rayjob] persistentvolumeclaim/{name} exists with storage class {has}, not k8s.storage_class="
                  f"{wanted}: it is used as it is\n")


def create_config_map(kube: Kube, config_map: dict) -> None:
    name, namespace = config_map["metadata"]["name"], config_map["metadata"]["namespace"]
    try:
        kube.core.create_namespaced_config_map(namespace, config_map)
    except Exception as err:
        raise api_error(err, f"creating configmap/{name} in namespace {namespace}") from None


def delete_config_map(kube: Kube, config_map: dict) -> None:
    try:
        kube.core.delete_namespaced_config_map(config_map["metadata"]["name"], config_map["metadata"]["namespace"])
    except Exception:
        pass  # best effort: it is labelled orchestrator/rayjob=<name>


def own(kube: Kube, config_map: dict, rayjob: dict, out: TextIO) -> None:
    """Make the RayJob the ConfigMap's owner, so that Kubernetes deletes it with the RayJob."""
    uid = (rayjob or {}).get("metadata", {}).get("uid")
    name, namespace = config_map["metadata"]["name"], config_map["metadata"]["namespace"]
    if not uid:
        return
    owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": rayjob["metadata"]["name"], "uid": uid}
    try:
        kube.core.patch_namespaced_config_map(name, namespace, {"metadata": {"ownerReferences": [owner]}})
    except Exception as err:
        out.write(f"[rayjob] configmap/{name} is not owned by the RayJob ({getattr(err, 'status', err)}): delete "
                  f"it yourself afterwards (kubectl delete configmap -n {namespace} {name})\n")


def get(kube: Kube, namespace: str, name: str) -> dict:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def delete(kube: Kube, namespace: str, name: str) -> None:
    """Delete the RayJob; its RayCluster, submitter Job and pods go with it (owner references)."""
    try:
        kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                    propagation_policy="Background")
    except Exception as err:
        if getattr(err, "status", None) != 404:  # already gone is what we wanted
            raise api_error(err, f"deleting rayjob/{name} in namespace {namespace}") from None


def follow(kube: Kube, namespace: str, name: str, out: TextIO, poll_seconds: float = 5.0,
           sleep: Callable[[float], None] = time.sleep) -> dict:
    """Print each change of status and the submitter pod's log until the job deployment has finished.
    Returns the final status."""
    last, failures, streams = None, 0, {}
    while True:
        try:
            status = get(kube, namespace, name).get("status") or {}
            failures = 0
        except Exception as err:
            if getattr(err, "status", None) == 404:
                raise UserError(f"rayjob/{name} in namespace {namespace} no longer exists (deleted)") from None
            failures += 1
            if failures >= MAX_API_FAILURES:
                raise api_error(err, f"reading rayjob/{name}") from None
            sleep(poll_seconds)
            continue
        now = (status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-")
        if now != last:
            message = f" ({status['message']})" if status.get("message") else ""
            out.write(f"[rayjob/{name}] deployment {now[0]}, job {now[1]}{message}\n")
            out.flush()
            last = now
        for pod in submitter_pods(kube, namespace, name):
            if pod not in streams:
                streams[pod] = threading.Thread(target=stream_log, args=(kube, namespace, pod, out), daemon=True)
                streams[pod].start()
        if now[0] in FINISHED:
            for thread in streams.values():
                thread.join(timeout=30)  # the log ends with the submitter's container
            return status
        sleep(poll_seconds)


def submitter_pods(kube: Kube, namespace: str, name: str) -> List[str]:
    """Names of the submitter pods that have started (their logs can be read), oldest first."""
    try:
        pods = kube.core.list_namespaced_pod(namespace, label_selector=f"{SUBMITTER_LABEL}={name}").items
    except Exception:
        return []  # no right to list pods: status only
    started = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
    return [p.metadata.name for p in sorted(started, key=lambda p: str(p.metadata.creation_timestamp or ""))]


def stream_log(kube: Kube, namespace: str, pod: str, out: TextIO) -> None:
    try:
        response = kube.core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False)
    except Exception as err:
        out.write(f"[rayjob] cannot read the log of pod {pod}: {getattr(err, 'reason', err)}\n")
        return
    try:
        for chunk in response.stream(4096):
            out.write(chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk)
            out.flush()
    finally:
        response.release_conn()


def finished(name: str, namespace: str, status: dict) -> dict:
    result = {"rayjob": name, "namespace": namespace, "jobDeploymentStatus": status.get("jobDeploymentStatus"),
              "jobStatus": status.get("jobStatus")}
    if status.get("jobStatus") != "SUCCEEDED":
        why = "; ".join(str(status[key]) for key in ("reason", "message") if status.get(key))
        raise UserError(f"rayjob/{name} ended {status.get('jobDeploymentStatus')}, job "
                        f"{status.get('jobStatus') or 'never ran'}{': ' + why if why else ''} "
                        f"(logs: kubectl logs -n {namespace} job/{name})")
    return result


def api_error(err: Exception, doing: str) -> UserError:
    status = getattr(err, "status", None)
    hint = {
        401: "the credentials were refused: log in again (your cloud's get-credentials command)",
        403: "forbidden: this identity may not do that in this namespace (k8s/base/rbac.yaml lists the verbs)",
        404: "not found: is the KubeRay operator installed (kubectl get crd rayjobs.ray.io) and does the "
             "namespace exist?",
        409: "a RayJob of that name already exists: set another k8s.job_name, or delete it",
        422: f"the API server rejected the manifest: {getattr(err, 'body', '') or getattr(err, 'reason', '')}",
    }.get(status, f"{status or ''} {getattr(err, 'reason', None) or err}".strip())
    return UserError(f"{doing} failed: {hint}")


def main(argv: Optional[Sequence[str]] = None, kube: Optional[Kube] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.k8s_submit", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("follow", "delete"))
    parser.add_argument("name", help="the RayJob's name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        kube = kube or connect(args.context)
        if args.action == "delete":
            delete(kube, args.namespace, args.name)
            print(f"deleted rayjob/{args.name} in namespace {args.namespace}")
            return 0
        try:
            status = follow(kube, args.namespace, args.name, sys.stdout, args.poll_seconds)
        except KeyboardInterrupt:
            print(f"\nstopped following; rayjob/{args.name} goes on (delete: python -m launch.k8s_submit "
                  f"delete {args.name} -n {args.namespace})")
            return 130
        finished(args.name, args.namespace, status)
        return 0
    except UserError as err:
        return report_user_error(str(err))


if __name__ == "__main__":
    sys.exit(main())
