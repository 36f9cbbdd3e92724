"""The pieces of several-node runs that need no Ray: the nodes line of the summary, and what the driver ships."""

from __future__ import annotations

import json
from pathlib import Path

from launch.ship import code_runtime_env
from orchestrator.placement import describe_nodes

ROOT = Path(__file__).resolve().parents[2]


def test_the_nodes_line_groups_ranks_by_node():
    workers = [{"rank": 0, "node_id": "aaaaaaaaaaaa", "hostname": "gpu-1"},
               {"rank": 1, "node_id": "bbbbbbbbbbbb", "hostname": "gpu-2"},
               {"rank": 2, "node_id": "bbbbbbbbbbbb", "hostname": "gpu-2"}]
    assert describe_nodes(workers) == "nodes: 2; rank 0 on gpu-1 (node aaaaaaaa); ranks 1,2 on gpu-2 (node bbbbbbbb)"


def test_the_driver_ships_its_own_packages(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = code_runtime_env()
    assert env["py_modules"] == [str(ROOT / "orchestrator"), str(ROOT / "launch")]
    assert "__pycache__/" in env["excludes"]


def test_a_submitted_job_with_a_working_dir_ships_nothing_more(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert code_runtime_env() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert "py_modules" in code_runtime_env()
