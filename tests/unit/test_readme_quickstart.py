"""The README's quickstart commands run as written: each row's command, as a dry run on the machine its row names
(sized with cluster.*, so no Ray starts), plans the strategy that row promises; the Kubernetes row renders its
RayJob. The data files are the ones the README describes (classification rows, instruction rows)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

SIZING = {  # the machine each row names -> the cluster.* of its dry run, and what its plan must be
    "your own JSONL on a laptop (CPU)": (["cluster.gpus=0"], "full", 2),
    "one 24 GB GPU, a 7-8B model": (["cluster.gpus=1", "cluster.gpu_memory_gb=24"], "lora", 1),
    "8 GPUs, full fine-tuning": (["cluster.gpus=8", "cluster.gpu_memory_gb=80"], "full", 8),
    "several machines (on the head node)": (["cluster.nodes=2", "cluster.gpus=8", "cluster.gpu_memory_gb=80"],
                                            "full", 16),
    "a Kubernetes cluster with KubeRay": ([], "full", 16),  # the row sizes its cluster itself
}


def quickstart_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart, by situation", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(python -m orchestrator [^`]+)` \|$", section, flags=re.M)
    return rows


def test_the_table_has_every_situation():
    assert [situation for situation, _ in quickstart_rows()] == list(SIZING)


@pytest.mark.parametrize("situation,command", quickstart_rows(), ids=[s for s, _ in quickstart_rows()])
def test_each_quickstart_plans_as_its_row_says(situation, command, tmp_path):
    (tmp_path / "my_clauses.jsonl").write_text("".join(
        json.dumps({"text": f"clause {i} about liability", "label": ["fair", "unfair"][i % 2]}) + "\n"
        for i in range(40)))
    (tmp_path / "my.jsonl").write_text("".join(
        json.dumps({"instruction": f"Summarise clause {i}.", "input": "The licensee shall indemnify.",
                    "output": "The licensee pays the damages."}) + "\n" for i in range(40)))
    sizing, strategy, workers = SIZING[situation]
    argv = shlex.split(command)[3:]  # after `python -m orchestrator`
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "orchestrator", *argv, "dry_run=true", *sizing,
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    if "launcher=rayjob" in argv:
        docs = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
        assert docs["RayJob"]["spec"]["entrypoint"].startswith("python -m orchestrator --config ")
        assert "my.jsonl" in docs["ConfigMap"]["data"] or "my.jsonl" in json.dumps(docs["ConfigMap"])
        workers_spec = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        assert workers_spec["replicas"] * 8 == workers
        return
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["strategy"], plan["num_workers"]) == (strategy, workers)
