"""Shared fixtures: one local Ray for the whole session, and a tiny random model/task pool on disk."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raymerge import models
from raymerge.data import ImageDataset, write_parquet

ARCH = "raymerge-tiny-vit"
# the files whose tests take minutes (pytest --durations), handed out first: with two xdist workers (pyproject's
# addopts) the many short files then fill in beside them, where one of them left to the end would run alone
LONGEST_FIRST = ("test_job_submit.py", "test_bench.py", "test_sweep.py", "test_multinode.py", "test_keys.py")


def pytest_configure(config: pytest.Config) -> None:
    # Ray's first local ray.init() writes ~/.ray/auth_token where there is none, unlocked: two xdist workers starting
    # their Rays at once could each write a different token under the other's cluster. The controller, before any
    # worker starts, makes it the way the README does, readable by its owner only.
    token = Path.home() / ".ray" / "auth_token"
    if not hasattr(config, "workerinput") and not token.exists():
        subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"], check=True,
                       capture_output=True, timeout=120)
        token.chmod(0o600)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (never someone else's cluster: address='local', RAY-NOTES.md)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def random_encoder(seed: int, like: dict[str, torch.Tensor] | None = None, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A tiny-ViT state dict: fresh random init, or ``like`` plus seeded noise (a stand-in fine-tune)."""
    torch.manual_seed(seed)
    if like is None:
        return {k: v.clone() for k, v in models.build_encoder(ARCH).state_dict().items()}
    return {k: v + scale * torch.randn_like(v) for k, v in like.items()}


def random_dataset(seed: int, n: int, num_classes: int, name: str = "ds") -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return ImageDataset(name, images, labels, tuple(str(i) for i in range(num_classes)))


def spearman_by_hand(x: list[float], y: list[float]) -> float:
    """Spearman ρ of values without ties, in plain Python: the Pearson correlation (``statistics``) of ranks 1..n."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order, start=1):
            out[i] = float(rank)
        return out

    return statistics.correlation(ranks(x), ranks(y))


@pytest.fixture(scope="session")
def mini_pool(tmp_path_factory) -> Path:
    """A robust-setting pool (base, 2 fine-tuned, one head, test + 2 shifts) and its experiment file."""
    root = tmp_path_factory.mktemp("pool")
    base = random_encoder(0)
    models.save_state_dict_file(base, root / "base.safetensors")
    for i in (1, 2):
        models.save_state_dict_file(random_encoder(i, base), root / f"ft{i}.safetensors")
    torch.manual_seed(5)
    head = models.Head(torch.randn(10, 64), torch.zeros(10), tuple(str(i) for i in range(10)))
    models.save_head(head, root / "head.safetensors")
    for split, seed, n in (("test", 10, 300), ("validation", 11, 100), ("rotate", 12, 150), ("noise", 13, 200)):
        write_parquet(random_dataset(seed, n, 10, split), root / split)
    exp = {
        "name": "mini",
        "model_pool": {"architecture": ARCH, "base": "base.safetensors",
                       "finetuned": {"ft1": "ft1.safetensors", "ft2": "ft2.safetensors"}},
        "task_pool": {"digits": {"head": "head.safetensors", "validation": "validation", "test": "test",
                                 "shifts": {"rotate": "rotate", "noise": "noise"}}},
        "methods": {"zeroshot": {}, "finetuned": {}, "wise_ft": {"lambdas": [0.0, 0.5, 1.0]}},
        "resources": {"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 64},
        "output_dir": str(root / "results"),
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    return root


def sweep_experiment(tiny_zoo: Path, out: Path, methods: dict, tasks: int = 4, **resources) -> Path:
    """An experiment file next to ``out``: a sweep of ``methods`` over the subsets (2 tasks and up) of the first
    ``tasks`` tasks of the tiny zoo's multitask pool, on 2 actors of half a CPU (``resources`` overrides)."""
    settings = yaml.safe_load(tiny_zoo.read_text())["settings"]["multitask"]
    exp = {"name": "sweep-test", "zoo": str(tiny_zoo), "setting": "multitask", "methods": {},
           "sweep": {"min_size": 2, "tasks": list(settings["task_pool"])[:tasks], "methods": methods},
           "resources": {"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 32, **resources},
           "output_dir": str(out)}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The embedded zoo at its ``tiny`` scale (same structure, seconds to build); returns the manifest path."""
    from raymerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("tinyzoo") / "zoo", seed=0, scale="tiny")


# a real-sized ViT-B-32 pool in every checkpoint format (tests/clip_fixtures.py), built once per session
from clip_fixtures import _session_raymerge_cache, clip_pool, fresh_raymerge_cache, raymerge_cache  # noqa: E402, F401
