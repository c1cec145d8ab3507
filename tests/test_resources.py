"""Resource requests: refused before any actor when a fixed cluster can never meet them; waited for, with the
pending demand reported and a time limit, when an autoscaler may add the nodes."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import pytest
import ray

from conftest import ARCH
from raymerge import cluster, workers
from raymerge.cluster import ClusterResourceError, check_resources, fits, wait_for_actors
from raymerge.workers import Resources, WorkerPool


@pytest.mark.parametrize("node, bundle, expected", [
    ({"CPU": 2.0}, {"CPU": 0.1}, 20),  # 2 / 0.1 is 19.999999999999996 in floats; Ray counts in 1e-4 units
    ({"CPU": 2.0}, {"CPU": 0.5}, 4),
    ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, 1),
    ({"CPU": 48.0, "GPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}, 4),
    ({"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}, 0),
    ({"CPU": 2.0}, {"CPU": 100.0}, 0),
    ({"CPU": 2.0}, {"CPU": 0.0}, math.inf),
])
def test_fits(node, bundle, expected):
    assert fits(node, bundle) == expected


@pytest.mark.parametrize("actors, cpus, gpus, says", [
    (2, 100, 0, "2 actor(s) × {CPU: 100}"),
    (1, 1, 1, "1 actor(s) × {CPU: 1, GPU: 1}"),
    (5, 0.5, 0, "at most 4 such actor(s)"),
])
def test_infeasible_request_is_refused_naming_demand_and_offer(ray_local, actors, cpus, gpus, says):
    with pytest.raises(ClusterResourceError) as refused:
        check_resources(actors, cpus, gpus)
    message = str(refused.value)
    assert says in message and "1 node: 1 × {CPU: 2, GPU: 0}" in message
    assert "resources.num_cpus_per_actor" in message


def test_feasible_request_passes(ray_local):
    assert check_resources(2, 0.5, 0, task_cpus=1) is False  # fits, leaves 1 CPU, and the cluster is fixed
    assert check_resources(4, 0.5, 0) is False


def test_actors_holding_every_cpu_leave_none_for_tasks(ray_local):
    with pytest.raises(ClusterResourceError, match=r"would hold 2 of the cluster's 2 CPUs .* less than the 1 CPU"):
        check_resources(2, 1.0, 0, task_cpus=1)


def test_worker_pool_refuses_before_creating_actors(ray_local, monkeypatch):
    def no_actor(*args, **kwargs):
        raise AssertionError("an actor was defined before the request was checked")

    monkeypatch.setattr(workers.ray, "remote", no_actor)
    with pytest.raises(ClusterResourceError, match=r"1 actor\(s\) × \{CPU: 100\}"):
        WorkerPool(ARCH, Resources(num_actors=1, num_cpus_per_actor=100))


def test_wait_reports_pending_demand_then_gives_up(ray_local, caplog):
    @ray.remote(num_cpus=100)
    class TooBig:
        pass

    actor = TooBig.remote()
    with caplog.at_level(logging.INFO, logger="raymerge.cluster"):
        with pytest.raises(ClusterResourceError) as gave_up:
            wait_for_actors([actor], {"CPU": 100.0}, timeout_s=3.0, report_every_s=1.0)
    reports = [r.getMessage() for r in caplog.records if "not started after" in r.getMessage()]
    assert len(reports) >= 2, reports
    assert all("1 of 1 actor(s) × {CPU: 100}" in r and "CPU" in r.split("cluster: ")[1] for r in reports)
    message = str(gave_up.value)
    assert "gave up after 3 s (resources.start_timeout_s)" in message and "{CPU: 100}" in message
    with pytest.raises(ray.exceptions.RayActorError):  # killed: its demand no longer asks for nodes
        ray.get(actor.__ray_ready__.remote(), timeout=30)


def test_worker_pool_waits_on_an_autoscaling_cluster(ray_local, monkeypatch, caplog):
    """Where nodes may come, a request no current node meets is waited for, reported, and given up on in time."""
    monkeypatch.setattr(cluster, "is_autoscaling", lambda: True)
    monkeypatch.setattr(cluster, "REPORT_EVERY_S", 0.5)
    with caplog.at_level(logging.INFO, logger="raymerge.cluster"):
        with pytest.raises(ClusterResourceError, match=r"gave up after 2 s .*1 of 1 actor\(s\) × \{CPU: 100\}"):
            WorkerPool(ARCH, Resources(num_actors=1, num_cpus_per_actor=100, start_timeout_s=2.0))
    assert sum("start workers: 1 of 1 actor(s)" in r.getMessage() for r in caplog.records) >= 2


def test_autoscaler_v2_node_groups_bound_the_request(ray_local):
    """Autoscaler v2 (KubeRay) publishes its node groups in the GCS: detected, and checked against their sizes."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    assert cluster.is_autoscaling() is False  # a local Ray: the monitor's read-only provider
    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", min_count=1, max_count=1)
    head.resources["CPU"] = 0
    gpu = config.node_group_configs.add(name="gpu_1x", min_count=0, max_count=2)
    gpu.resources["CPU"] = 4
    gpu.resources["GPU"] = 1
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        assert cluster.is_autoscaling() is True
        assert check_resources(2, 4, 1) is True  # 2 GPU nodes at most, one actor each: waited for, not refused
        with pytest.raises(ClusterResourceError, match=r"3 actor\(s\) × \{CPU: 4, GPU: 1\} .* hold 2 such"):
            check_resources(3, 4, 1)
        with pytest.raises(ClusterResourceError, match=r"gpu_1x ≤2 × \{CPU: 4, GPU: 1\}"):
            check_resources(1, 1, 2)
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    assert cluster.is_autoscaling() is False


DRIVER = """
import logging, sys, ray
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
from raymerge import cluster
cluster.connect("GCS")
print("autoscaling", cluster.is_autoscaling())
print("check", cluster.check_resources(1, 1, 1))
class Probe:
    pass
gpu = ray.remote(num_cpus=1, num_gpus=1)(Probe).remote()
cluster.wait_for_actors([gpu], {"CPU": 1, "GPU": 1}, timeout_s=120, report_every_s=1)
print("started on a launched node, GPUs now", ray.cluster_resources().get("GPU"))
never = ray.remote(num_cpus=1, num_gpus=5)(Probe).remote()
try:
    cluster.wait_for_actors([never], {"CPU": 1, "GPU": 5}, timeout_s=5, report_every_s=1)
except cluster.ClusterResourceError as err:
    print("gave up:", err)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")
def test_autoscaling_cluster_end_to_end(tmp_path):
    """Ray's fake multi-node autoscaler with cluster.yaml's node types (tests/fake_autoscaler.py): GPU worker nodes
    launched on demand, as on a cloud."""
    from fake_autoscaler import start_fake_autoscaling_head, worker_types
    from ray_head import REPO, scrubbed_env, stop_head

    head = start_fake_autoscaling_head(tmp_path)
    try:
        env = scrubbed_env(head.home, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token")
        done = subprocess.run([sys.executable, "-c", DRIVER.replace("GCS", f"127.0.0.1:{head.ports['gcs']}")],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        out = done.stdout
        assert done.returncode == 0, out + done.stderr
        assert "autoscaling True" in out and "check True" in out
        reports = [line for line in out.splitlines() if "not started after" in line and "GPU: 1}" in line]
        assert any(f"launching 1 × {t}" in r or f"{t} (" in r for t in worker_types() for r in reports), out
        started = re.search(r"started on a launched node, GPUs now ([\d.]+)", out)  # the head has none
        assert started and float(started.group(1)) >= 1, out
        assert "gave up: gave up after 5 s" in out and "{CPU: 1, GPU: 5}" in out.split("gave up:")[1]
    finally:
        stop_head(head)
