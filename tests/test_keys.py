"""A stored row is reused only when everything that determines it is unchanged; --force replaces rows.

Each test runs an experiment, changes one input (a test set's content, a head, the seed, an evaluation setting),
runs again, and checks which rows were recomputed: exactly those the change affects.
"""

from __future__ import annotations

import gc
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ARCH, random_dataset, random_encoder
from raymerge import config, models
from raymerge.data import write_parquet
from raymerge.pipeline import run_methods, start_run
from raymerge.results import ResultStore


def _run(path: Path, cache: Path, *overrides: str, force: bool = False) -> tuple[int, int]:
    """Run the experiment at ``path``; (rows evaluated, rows skipped because stored)."""
    run = start_run(config.load(path, list(overrides)), force=force, cache_dir=cache)
    try:
        run_methods(run, run.exp.methods)
    finally:
        run.pool.shutdown()
    return run.evaluated, run.skipped


def _keys(out: Path) -> dict[tuple[str, str, str, str], str]:
    """(method, params, task, split) -> key of the newest row."""
    return {(r["method"], r["params"], r["task"], r["split"]): r["key"] for r in ResultStore(out).rows()}


@pytest.fixture()
def robust(mini_pool, tmp_path):
    root = tmp_path / "pool"
    shutil.copytree(mini_pool, root, ignore=shutil.ignore_patterns("results", "*.yaml"))
    raw = yaml.safe_load((mini_pool / "experiment.yaml").read_text())
    raw |= {"output_dir": str(tmp_path / "out"),
            "methods": {"zeroshot": {}, "wise_ft": {"lambdas": [0.5]}, "dawin": {"k": 2}, "ties": {}}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(raw))
    return root


def test_a_changed_test_set_recomputes_its_rows_only(robust, ray_local, tmp_path):
    exp, cache = robust / "experiment.yaml", tmp_path / "cache"
    first, _ = _run(exp, cache)
    before = _keys(tmp_path / "out")
    assert first == len(before) == 4 * 3  # 4 methods (wise_ft one λ) × test, rotate, noise
    write_parquet(random_dataset(99, 150, 10, "rotate"), robust / "rotate")  # same path, other images
    evaluated, skipped = _run(exp, cache)
    after = _keys(tmp_path / "out")
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in before if k[3] == "rotate"}
    assert (evaluated, skipped) == (4, 8)
    assert _run(exp, cache) == (0, 12)  # and then nothing


def test_the_seed_recomputes_random_methods_only(robust, ray_local, tmp_path):
    exp, cache = robust / "experiment.yaml", tmp_path / "cache"
    _run(exp, cache)
    before = _keys(tmp_path / "out")
    evaluated, _ = _run(exp, cache, "seed=1")
    after = _keys(tmp_path / "out")
    assert {k[0] for k in after if after[k] not in before.values()} == {"dawin"}  # its mixture fit is seeded
    assert evaluated == 3


def test_evaluation_settings_recompute_everything(robust, ray_local, tmp_path):
    exp, cache = robust / "experiment.yaml", tmp_path / "cache"
    _run(exp, cache)
    before = set(_keys(tmp_path / "out").values())
    evaluated, skipped = _run(exp, cache, "resources.batch_size=32")  # padding makes numbers depend on it
    assert (evaluated, skipped) == (12, 0)
    assert _run(exp, cache, "resources.precision=bf16") == (12, 0)  # autocast on the CPU too
    assert _run(exp, cache, "resources.precision=auto") == (0, 12)  # auto is fp32 on a CPU: the first run's rows
    # what does not change numbers is not in the key
    assert _run(exp, cache, "resources.num_actors=1", "resources.max_merges_in_flight=1") == (0, 12)
    assert before < {r["key"] for r in ResultStore(tmp_path / "out").rows()}


def test_a_changed_head_recomputes_the_rows_that_read_it(ray_local, tmp_path):
    """Multi-task: a static merge's row reads its own task's head; a selection on validation reads every head."""
    root = tmp_path / "pool"
    root.mkdir()
    base = random_encoder(0)
    models.save_state_dict_file(base, root / "base.safetensors")
    pool = {"architecture": ARCH, "base": "base.safetensors", "finetuned": {}}
    tasks = {}
    for i, task in enumerate(("a", "b")):
        models.save_state_dict_file(random_encoder(i + 1, base), root / f"{task}.safetensors")
        pool["finetuned"][task] = f"{task}.safetensors"
        torch.manual_seed(i)
        models.save_head(models.Head(torch.randn(4, 64), None, tuple("wxyz")), root / f"head-{task}.safetensors")
        for split, n in (("test", 64), ("validation", 32)):
            write_parquet(random_dataset(10 * i + n, n, 4), root / f"{task}-{split}")
        tasks[task] = {"head": f"head-{task}.safetensors", "finetuned": task, "test": f"{task}-test",
                       "validation": f"{task}-validation"}
    exp = root / "experiment.yaml"
    exp.write_text(yaml.safe_dump({
        "name": "heads", "model_pool": pool, "task_pool": tasks, "output_dir": str(tmp_path / "out"),
        "methods": {"weight_average": {}, "task_arithmetic": {"lambdas": [0.2, 0.4]}},
        "resources": {"num_actors": 2, "batch_size": 32}}))
    cache = tmp_path / "cache"
    _run(exp, cache)
    before = _keys(tmp_path / "out")
    torch.manual_seed(42)
    models.save_head(models.Head(torch.randn(4, 64), None, tuple("wxyz")), root / "head-a.safetensors")
    evaluated, skipped = _run(exp, cache)
    after = _keys(tmp_path / "out")
    changed = {k[:1] + k[2:] for k in before if before[k] != after[k]}
    assert changed == {("weight_average", "a", "test"), ("task_arithmetic", "a", "test"), ("task_arithmetic", "b", "test")}
    assert (evaluated, skipped) == (3, 1)


def test_force_replaces_rows_and_their_samples(robust, ray_local, tmp_path):
    exp, cache = robust / "experiment.yaml", tmp_path / "cache"
    _run(exp, cache)
    first = {r["key"]: r["written_at"] for r in ResultStore(tmp_path / "out").rows()}
    assert _run(exp, cache, force=True) == (12, 0)
    store = ResultStore(tmp_path / "out")
    rows = store.rows()
    assert len(rows) == len({r["key"] for r in rows}) == len(first) == 12  # one row per key
    assert all(r["written_at"] > first[r["key"]] for r in rows)  # the new ones
    for r in rows:
        samples = store.samples(r["key"]).to_pydict()
        assert np.mean(np.array(samples["prediction"]) == np.array(samples["label"])) == r["accuracy"]


def test_reports_show_the_rows_of_the_current_inputs(robust, ray_local, tmp_path):
    """Seed 0, then 1, then 0 again: the third run reuses seed 0's stored rows, and the report shows those, not the
    newer seed-1 rows."""
    from raymerge import report

    exp, cache = robust / "experiment.yaml", tmp_path / "cache"
    _run_job(exp, cache)
    first = {r["key"] for r in report.current_rows(ResultStore(tmp_path / "out"))}
    _run_job(exp, cache, "seed=1")
    assert {r["key"] for r in report.current_rows(ResultStore(tmp_path / "out"))} != first
    _run_job(exp, cache)
    assert {r["key"] for r in report.current_rows(ResultStore(tmp_path / "out"))} == first


def _run_job(path: Path, cache: Path, *overrides: str) -> None:
    from raymerge import pipeline

    pipeline.run_experiment(config.load(path, list(overrides)), cache_dir=cache)


def test_rows_are_written_behind_the_loop_and_a_failed_write_stops_it(robust, ray_local, tmp_path):
    """The writer thread stores each candidate's rows while the next one is evaluated; its error stops the run at
    the next candidate, and the rows written before it stay stored."""
    run = start_run(config.load(robust / "experiment.yaml"), cache_dir=tmp_path / "cache")
    append, writers = run.store.append, []

    def failing(rows, **kwargs):
        writers.append(threading.current_thread().name)
        if len(writers) == 2:  # the second candidate's rows
            raise OSError("disk full")
        return append(rows, **kwargs)

    run.store.append = failing
    try:
        with pytest.raises(OSError, match="disk full"):
            run_methods(run, run.exp.methods)
    finally:
        run.pool.shutdown()
    assert all(name.startswith("raymerge-results") for name in writers)
    assert gc.get_freeze_count() == 0  # the loop's objects are the collector's again
    first, _, third, fourth = run.exp.methods  # one candidate each
    stored = ResultStore(tmp_path / "out").rows()
    assert len(stored) == 3 and {r["method"] for r in stored} == {first}
    # the failure surfaced before the third candidate's write (at its start, or before its write); the fourth
    # never ran
    assert run.evaluated == 6 and len(writers) == 2
