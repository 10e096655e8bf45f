"""Can the connected Ray cluster run a task job at all? Checked before anything is launched.

A task that asks for resources no node has (``num_gpus=1`` on a cluster without GPUs) would stay
queued forever without a word. ``unplaceable(request)`` compares the request with every node that
could run it: the alive nodes, plus the node types an autoscaler may add (the autoscaler v2 cluster
config in the GCS, or the cluster launcher's ``~/ray_bootstrap_config.yaml`` on the head, whose
``available_node_types`` declare their resources, as ``ray_cluster.yaml`` does). It returns None when
some node fits, else a sentence naming the request and what the cluster has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where the cluster launcher puts its config on the head
_SHOWN = ("CPU", "GPU")


def unplaceable(request: dict[str, float]) -> str | None:
    """None if some node of the connected cluster (or one its autoscaler can add) has ``request``
    (resource -> amount per task); else what is missing, with the nodes' and the cluster's resources."""
    import ray

    need = {k: float(v) for k, v in request.items() if v and v > 0}
    if not need:
        return None
    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    if any(_fits(shape, need) for shape in nodes):
        return None
    addable = _autoscaler_node_types()
    if any(_fits(shape, need) for shape in addable):
        return None
    total = ray.cluster_resources()
    keys = sorted(set(_SHOWN) | set(need))
    shown_nodes = "; ".join(_show(shape, keys) for shape in nodes) or "none"
    types = f", node types its autoscaler can add: {'; '.join(_show(s, keys) for s in addable)}" if addable else ""
    return (
        f"each task asks Ray for {_show(need, sorted(need))}, but no node of the cluster has that: "
        f"its {len(nodes)} node(s) have {shown_nodes} (cluster total {_show(dict(total), keys)}){types}"
    )


def _fits(shape: dict[str, Any], need: dict[str, float]) -> bool:
    return all(float(shape.get(key, 0.0)) >= amount for key, amount in need.items())


def _show(shape: dict[str, Any], keys: list[str]) -> str:
    return "{" + ", ".join(f"{k}: {float(shape.get(k, 0.0)):g}" for k in keys) + "}"


def _autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the node types an autoscaler may launch (empty when there is no autoscaler)."""
    shapes: list[dict[str, float]] = []
    try:  # autoscaler v2 publishes its cluster config in the GCS (a private API: best effort)
        from ray._private.state import state

        config = state.get_cluster_config()
        for group in getattr(config, "node_group_configs", None) or []:
            if group.max_count != 0:
                shapes.append({k: float(v) for k, v in group.resources.items()})
    except Exception as err:
        log.debug("no autoscaler v2 cluster config (%s)", err)
    path = BOOTSTRAP_CONFIG.expanduser()
    if path.is_file():
        try:
            import yaml

            config = yaml.safe_load(path.read_text()) or {}
            for node_type in (config.get("available_node_types") or {}).values():
                if node_type.get("max_workers", 1) != 0 and isinstance(node_type.get("resources"), dict):
                    shapes.append({k: float(v) for k, v in node_type["resources"].items()})
        except Exception as err:
            log.warning("could not read the cluster launcher's config %s (%s)", path, err)
    return shapes
