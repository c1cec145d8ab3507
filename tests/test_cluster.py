"""cluster.yaml, checked offline the way `ray up` checks it before any cloud call (RAY-NOTES.md):
``prepare_config`` (merge with the provider's defaults.yaml) then ``validate_config`` (ray-schema.json plus the
cross-field checks), and the choices the file is meant to encode."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _workers(prepared: dict) -> dict[str, dict]:
    return {name: t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]}


def _start_commands(prepared: dict) -> list[str]:
    return [*prepared["head_start_ray_commands"], *prepared["worker_start_ray_commands"]]


def test_validates_like_ray_up(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_takes_no_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")
    assert head["min_workers"] == 0 and head["max_workers"] == 0


def test_gpu_workers_scale_from_zero(prepared):
    workers = _workers(prepared)
    assert workers, "no worker node types"
    for name, node in workers.items():
        # AWS fills counts from the instance type only with cloud calls (fillout_available_node_types_resources
        # in bootstrap): offline, what the file says is what the autoscaler plans with, so they are written out
        assert node["min_workers"] == 0, name
        assert isinstance(node["resources"].get("GPU"), int) and node["resources"]["GPU"] > 0, name
        assert node["resources"].get("CPU", 0) > 0, name  # room beside the actors for CART's SVD tasks
        assert 1 <= node["max_workers"] <= prepared["max_workers"], name
        assert node["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "p4d", "p5", "g4dn"), name
    assert 1 <= prepared["max_workers"] <= 64


def test_dashboard_not_exposed(text, prepared):
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # the file without its comments
    assert "0.0.0.0" not in text
    assert not re.search(r"--dashboard-host[= ]+(?!127\.0\.0\.1|localhost)", code)
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start or "--dashboard-host" not in head_start
    # no security-group ingress rule covering the dashboard / job API port
    for rule in prepared["provider"].get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        assert not (lo == -1 or lo <= 8265 <= hi), rule
    for node in prepared["available_node_types"].values():
        assert "SecurityGroupIds" not in node["node_config"]  # Ray's default group: SSH in, intra-cluster only


def test_ulimit_shm_and_token_auth(prepared):
    for command in (c for c in _start_commands(prepared) if "ray start" in c):
        assert "ulimit -n 65536" in command
        assert "RAY_AUTH_MODE=token" in command
    docker = prepared["docker"]
    assert any("nofile=65536" in opt for opt in docker["run_options"])
    # /dev/shm backs the object store: either Ray sizes it per node, or a run option sets it (>= 1 GB)
    shm = [o for o in docker.get("run_options", []) + docker.get("head_run_options", []) if "--shm-size" in o]
    assert not docker.get("disable_shm_size_detection") or shm
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_setup_installs_raymerge(prepared):
    assert prepared["file_mounts"].get("~/raymerge") == "."
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any(re.search(r"pip install (-e )?~/raymerge\b", c) for c in commands), commands


def _head_not_a_type(c):
    c["head_node_type"] = "head_typo"


def _unknown_node_type_key(c):
    next(iter(_workers(c).values()))["min_worker"] = 0


def _unknown_top_key(c):
    c["max_worker"] = 3


def _fractional_gpu(c):
    next(iter(_workers(c).values()))["resources"]["GPU"] = 0.5


def _missing_node_config(c):
    del next(iter(_workers(c).values()))["node_config"]


def _min_over_max(c):
    c["max_workers"] = 1
    for node in _workers(c).values():
        node["min_workers"] = 1


@pytest.mark.parametrize("corrupt, error, match", [
    (_head_not_a_type, ValueError, "head_node_type` must be one of"),
    (_unknown_node_type_key, jsonschema.ValidationError, "'min_worker' was unexpected"),
    (_unknown_top_key, jsonschema.ValidationError, "'max_worker' was unexpected"),
    (_fractional_gpu, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
    (_missing_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
    (_min_over_max, ValueError, "smaller than the sum of `min_workers`"),
])
def test_validation_rejects_broken_copies(raw, corrupt, error, match):
    """The check above can fail: each corruption of a copy of the file is rejected."""
    broken = copy.deepcopy(raw)
    corrupt(broken)
    with pytest.raises(error, match=re.escape(match)):
        validate_config(prepare_config(broken))


def test_fake_autoscaler_config_mirrors_cluster_yaml(raw):
    """The config of the fake cluster that tests/test_multinode.py scales is one the autoscaler accepts, with this
    file's worker types (names, resources, bounds), head resources and cluster limits."""
    from fake_autoscaler import FAKE_HEAD_TYPE, fake_cluster_config, worker_types

    fake = fake_cluster_config("127.0.0.1:1", idle_timeout_minutes=0.25)
    validate_config(copy.deepcopy(fake))

    def shape(types: dict) -> dict:
        return {name: (t["resources"], t["min_workers"], t["max_workers"]) for name, t in types.items()}

    assert shape(worker_types(fake)) == shape(worker_types(raw))
    assert fake["available_node_types"][FAKE_HEAD_TYPE]["resources"] == raw["available_node_types"][raw["head_node_type"]]["resources"]
    assert (fake["max_workers"], fake["upscaling_speed"]) == (raw["max_workers"], raw["upscaling_speed"])
