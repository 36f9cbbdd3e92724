"""Where the ranks ran: every rank's Ray node id and host name, gathered on every start (a restart after a lost
node may place them elsewhere), reported in the final metrics as `workers/nodes` and printed in one line."""

from __future__ import annotations

import socket
from typing import Dict, List

NODES_KEY = "workers/nodes"


IN_PROCESS_NODE = "driver"  # the node id of a recipe in the driver's process without Ray (cluster.in_process)


def this_worker(rank: int) -> Dict[str, object]:
    import ray

    # asking Ray's runtime context would start a Ray of its own where none is (a recipe in the driver's process)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else IN_PROCESS_NODE
    return {"rank": rank, "node_id": node_id, "hostname": socket.gethostname()}


def gather_nodes(rank: int, world_size: int) -> List[Dict[str, object]]:
    """Collective: every rank's {rank, node_id, hostname}, in rank order."""
    import torch.distributed as dist

    gathered: List[Dict[str, object]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, this_worker(rank))
    return sorted(gathered, key=lambda worker: worker["rank"])


def describe_nodes(workers: List[Dict[str, object]]) -> str:
    """One line: how many nodes, and which ranks ran on each (host, short node id)."""
    by_node: Dict[str, List[Dict[str, object]]] = {}
    for worker in workers:
        by_node.setdefault(str(worker["node_id"]), []).append(worker)
    parts = []
    for node_id, ranks in by_node.items():
        numbers = ",".join(str(w["rank"]) for w in ranks)
        parts.append(f"rank{'s' if len(ranks) > 1 else ''} {numbers} on {ranks[0]['hostname']} (node {node_id[:8]})")
    return f"nodes: {len(by_node)}; " + "; ".join(parts)
