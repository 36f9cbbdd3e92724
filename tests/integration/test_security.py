"""The embedded Ray's dashboard (which also serves the Jobs API) listens on loopback only: nobody on the
network can submit jobs to a laptop or a CI runner that runs orchestrator."""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.ray


def test_the_local_dashboard_and_jobs_api_listen_on_loopback_only(ray_cluster):
    from ray._private import worker

    host, port = worker._global_node.webui_url.rsplit(":", 1)
    assert host == "127.0.0.1"
    listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
    assert listening and set(listening) <= {"127.0.0.1"}, listening
