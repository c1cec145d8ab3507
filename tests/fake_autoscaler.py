"""Ray's fake multi-node autoscaler (RAY-NOTES.md) with cluster.yaml's node types, for tests on one machine.

A head started with ``RAY_FAKE_CLUSTER=1`` and ``--autoscaling-config`` runs the autoscaler against a provider that
"launches" a node by starting one more raylet on this machine, with the node type's resources (a GPU type gives a
GPU resource and no GPU). The config is written out here (the example file the provider's own helper expects is
missing from the 2.60 wheel) and its node types are read from cluster.yaml, so what the tests scale is what users
deploy: the head's resources, each worker type's name, resources and ``min_workers``/``max_workers``, and the
cluster's ``max_workers`` and ``upscaling_speed``. What differs, and why:
- the head type is named ``ray.head.default``: the provider tags its head with that name, whatever the config says;
- ``node_config`` is empty (cloud instance settings mean nothing to the fake provider);
- ``idle_timeout_minutes`` is the caller's (seconds, not cluster.yaml's 10 minutes);
- the provider gets the GCS address (``provider.gcs_address``, read by the fake provider in Ray 2.60), so the
  head's GCS runs on a free port instead of 6379, which may be another engineer's on a shared machine.
The nodes it launches are children of the head's autoscaler monitor: :func:`ray_head.stop_head` stops them.
Those nodes share the head's temp dir (the provider gives them none of their own), so a job submitted to such a
head must not upload a ``--working-dir``: each node's runtime-env agent unpacks it into the same directory,
removing the copy other nodes' workers run in (seen: workers failing in ``os.getcwd()``). Real nodes have disks of
their own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ray._common.test_utils import wait_for_condition

from ray_head import REPO, Head, free_ports, make_token, node_ip, start_head, stop_head

CLUSTER_YAML = REPO / "cluster.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_TYPE


def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def worker_types(config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The worker node types (name -> type) of cluster.yaml, or of a cluster config ``config``."""
    config = config or cluster_yaml()
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def fake_cluster_config(gcs_address: str, idle_timeout_minutes: float) -> dict[str, Any]:
    """An autoscaling config for the fake multi-node provider mirroring cluster.yaml's node types (module
    docstring); ``gcs_address``: the head's GCS ``host:port``, where launched nodes join."""
    real = cluster_yaml()
    head = real["available_node_types"][real["head_node_type"]]

    def node_type(t: dict[str, Any], min_workers: int, max_workers: int) -> dict[str, Any]:
        return {"resources": dict(t["resources"]), "node_config": {}, "min_workers": min_workers,
                "max_workers": max_workers}

    return {
        "cluster_name": f"fake-{real['cluster_name']}",
        "max_workers": real["max_workers"],
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": {
            FAKE_HEAD_TYPE: node_type(head, 0, 0),
            **{name: node_type(t, t["min_workers"], t["max_workers"]) for name, t in worker_types(real).items()},
        },
        # the autoscaler reads every one of these keys of a cluster config: present, and empty
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_fake_autoscaling_head(config_dir: Path, idle_timeout_minutes: float = 0.25) -> Head:
    """A token-authenticated head (the README's token steps, in a scratch HOME) running the fake autoscaler with
    :func:`fake_cluster_config`, written to ``config_dir``; the head advertises cluster.yaml's head resources
    (``CPU: 0``: no actor or task runs on it). Returns once the autoscaler has reported its node types, before
    which raymerge takes the cluster for a fixed one (:func:`raymerge.cluster.is_autoscaling`)."""
    home = Path(tempfile.mkdtemp(prefix="rmhome-", dir="/tmp"))
    make_token(home)
    gcs_port = free_ports(1)[0]  # chosen first: launched nodes find the GCS through the config
    config = fake_cluster_config(f"{node_ip()}:{gcs_port}", idle_timeout_minutes)
    path = config_dir / "fake-cluster.json"
    path.write_text(json.dumps(config, indent=1))
    cpus = config["available_node_types"][FAKE_HEAD_TYPE]["resources"].get("CPU", 0)
    head = start_head(f"RAY_AUTH_MODE=token ray start --head --num-cpus {cpus} --dashboard-host 127.0.0.1 "
                      f"--autoscaling-config={path}", home, gcs_port=gcs_port,
                      RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        wait_for_condition(lambda: FAKE_HEAD_TYPE in node_types(head).values(), timeout=60, retry_interval_ms=500)
    except BaseException:
        stop_head(head)
        raise
    return head


def node_types(head: Head) -> dict[str, str]:
    """Node id -> node type, as the autoscaler last reported them (what `ray status` shows); {} before its first
    report."""
    status, body = head.request("/api/cluster_status", token=head.token)
    assert status == 200, body[-2000:]
    report = json.loads(body)["data"]["clusterStatus"] or {}  # the dashboard camel-cases the report's keys
    return (report.get("autoscalerReport") or {}).get("nodeTypeMapping") or {}
