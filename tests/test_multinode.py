"""Beyond one machine, on one machine: clusters of several Ray nodes, each its own raylet and object store.

1. A head started with the README's commands and two worker nodes joined with `ray start --address` (token auth,
   free ports, a temp dir each; tests/ray_head.py) run a sweep submitted with the README's `ray job submit`. Each
   worker node offers one GPU resource and the head none, so the two actors (``num_gpus_per_actor: 1``) start one
   on each worker node, away from the driver: every weight set, dataset shard and head they read crosses from the
   head's object store to theirs, and every logit back. The rows must equal, key for key and accuracy for
   accuracy, those of the same experiment file on this process's one-node local Ray (no GPU there: its actors
   fall back to CPU, as a local run should).
2. Ray's fake multi-node autoscaler with cluster.yaml's node types (tests/fake_autoscaler.py): an evaluation job
   whose actors ask for a GPU each makes GPU nodes appear on a head that has none (``CPU: 0``, as in
   cluster.yaml), runs on them, and the nodes are removed once idle. That the nodes come at all shows raymerge
   kept the GPU request on a cluster that has no GPU yet (it drops it only on a Ray it started itself).

Neither test calls ``ray.init`` on the clusters: the jobs' drivers run on the heads, and the tests read the
clusters' state (nodes, actors, the autoscaler's report) from the dashboard over HTTP, with the token.
"""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest
from ray._common.test_utils import wait_for_condition

from conftest import sweep_experiment
from fake_autoscaler import node_types, start_fake_autoscaling_head, worker_types
from ray_head import REPO, run_shell, start_readme_head, start_worker_node, stop_head, submitted_job_id
from raymerge import config
from raymerge.pipeline import run_experiment
from raymerge.results import ResultStore
from raymerge.sweep import run_sweep, subsets

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the nodes' processes in /proc")]

JOB_TIMEOUT_S = 600  # a bound for the failure case; the jobs take 20-60 s here
NODES_TIMEOUT_S = 180  # launching a fake node is starting a raylet and its agents: seconds, minutes on a busy machine
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SWEEP_TASKS = 3
SWEEP_METHODS = {"weight_average": {}, "task_arithmetic": {"lambdas": [0.3]}, "ties": {}, "cart": {}}


def _accuracies(out) -> dict[str, float]:
    return {r["key"]: r["accuracy"] for r in ResultStore(out).rows()}


def _job_log(head, submission_id: str) -> str:
    logs = head.cli("job", "logs", submission_id, "--address", head.address)
    assert logs.returncode == 0, logs.stderr
    return logs.stdout


def test_sweep_on_a_head_and_two_worker_nodes_equals_one_node(tiny_zoo, tmp_path, ray_local):
    experiment = sweep_experiment(tiny_zoo, tmp_path / "sweep", SWEEP_METHODS, SWEEP_TASKS, num_gpus_per_actor=1)
    one_node = tmp_path / "one-node"
    run_sweep(config.load(experiment, [f"output_dir={one_node}"]), cache_dir=tmp_path / "cache-one-node")

    out = tmp_path / "three-nodes"
    head = start_readme_head()
    try:
        for _ in range(2):
            start_worker_node(head, num_cpus=2, num_gpus=1)
        nodes = head.alive_nodes()
        assert len(nodes) == 3 and sum(n["is_head_node"] for n in nodes) == 1
        assert all(n["resources_total"].get("GPU", 0) == (0 if n["is_head_node"] else 1) for n in nodes), nodes
        entrypoint = [sys.executable, "jobs/sweep.py", "--config", str(experiment), "--set", f"output_dir={out}",
                      "--cache-dir", str(tmp_path / "cache-three-nodes")]  # a logit cache of its own: no shortcut
        line = head.submit_command(entrypoint)
        submitted = run_shell(line, head.env, timeout=JOB_TIMEOUT_S)
        submission_id = submitted_job_id(f"{line}\n{submitted.stdout}\n{submitted.stderr}")
        info, log = head.job_info(submission_id), _job_log(head, submission_id)
        assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{log[-6000:]}"
        assert "fall back to CPU" not in log  # a cluster's actors keep their GPU request

        actors = head.state("actors", class_name="EvalWorker")
        on = {n["node_id"]: n for n in nodes}
        assert len(actors) == 2 and all(a["required_resources"].get("GPU") == 1 for a in actors), actors
        hosts = [on[a["node_id"]] for a in actors]
        assert not any(n["is_head_node"] for n in hosts) and len({n["node_id"] for n in hosts}) == 2, hosts
    finally:
        stop_head(head)

    expected = sum(len(s) for s in subsets(range(SWEEP_TASKS))) * len(SWEEP_METHODS)  # one row per task of a subset
    reference = _accuracies(one_node)
    assert len(reference) == expected
    assert {r["method"] for r in ResultStore(out).rows()} == {f"sweep/{m}" for m in SWEEP_METHODS}
    assert _accuracies(out) == reference
    assert sum(pq.read_table(p).num_rows for p in (out / "rows").glob("part-*.parquet")) == expected  # no duplicate


def test_autoscaler_adds_gpu_nodes_for_a_job_and_removes_them_when_idle(mini_pool, tmp_path, ray_local):
    overrides = ["resources.num_gpus_per_actor=1"]
    head = start_fake_autoscaling_head(tmp_path, idle_timeout_minutes=0.25)
    try:
        assert [n["is_head_node"] for n in head.alive_nodes()] == [True]
        out = tmp_path / "autoscaled"
        # no --working-dir: the launched nodes share the head's session directory (the fake provider gives
        # them no temp dir of their own), where each node's runtime-env agent unpacks the same working-dir
        # copy, removing it under the other nodes' workers; the code is read from the checkout instead
        submitted = head.cli(
            "job", "submit", "--address", head.address, "--no-wait", "--",
            sys.executable, str(REPO / "jobs" / "eval.py"), "--config", str(mini_pool / "experiment.yaml"),
            *(f"--set={o}" for o in [*overrides, f"output_dir={out}"]), "--cache-dir", str(tmp_path / "cache"))
        submission_id = submitted_job_id(submitted.stdout + submitted.stderr)

        launched: dict[str, dict] = {}  # node id -> node, with the type the autoscaler reports for it

        def gpu_nodes_for_both_actors() -> bool:
            types = node_types(head)
            for node in head.alive_nodes():
                if not node["is_head_node"] and node["node_id"] in types:
                    launched[node["node_id"]] = {**node, "type": types[node["node_id"]]}
            return sum(n["resources_total"].get("GPU", 0) for n in launched.values()) >= 2

        wait_for_condition(gpu_nodes_for_both_actors, timeout=NODES_TIMEOUT_S, retry_interval_ms=1000)
        wait_for_condition(lambda: head.job_info(submission_id)["status"] in TERMINAL, timeout=JOB_TIMEOUT_S,
                           retry_interval_ms=1000)
        info, log = head.job_info(submission_id), _job_log(head, submission_id)
        assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{log[-6000:]}"
        assert "fall back to CPU" not in log

        # the nodes are cluster.yaml's worker types, with their resources
        types = worker_types()
        for node in launched.values():
            want = types[node["type"]]["resources"]
            assert {k: node["resources_total"].get(k, 0) for k in ("CPU", "GPU")} == {"CPU": want["CPU"], "GPU": want["GPU"]}
        # the actors asked for a GPU each and ran on the launched nodes
        actors = head.state("actors", class_name="EvalWorker")
        assert len(actors) == 2 and all(a["required_resources"].get("GPU") == 1 for a in actors), actors
        assert {a["node_id"] for a in actors} <= set(launched), (actors, launched)

        # idle after the job: removed, down to the head
        wait_for_condition(lambda: [n["is_head_node"] for n in head.alive_nodes()] == [True],
                           timeout=NODES_TIMEOUT_S, retry_interval_ms=1000)
    finally:
        stop_head(head)

    # the rows equal those of the same experiment on this process's local Ray
    reference = tmp_path / "local"
    run_experiment(config.load(mini_pool / "experiment.yaml", [*overrides, f"output_dir={reference}"]),
                   cache_dir=tmp_path / "cache-local")
    assert len(_accuracies(reference)) == (1 + 2 + 3) * 3  # zeroshot, 2 fine-tuned, 3 WiSE-FT lambdas; 3 sets each
    assert _accuracies(out) == _accuracies(reference)
