"""Merges are made off the driver, as Ray tasks or on the actors from their resident models; either way the outputs
are the same, bit for bit."""

from __future__ import annotations

import os

import numpy as np

from raymerge import config, pipeline
from raymerge.results import ResultStore


def test_task_and_actor_merges_give_identical_outputs(mini_pool, ray_local, tmp_path):
    methods = ("methods={zeroshot: {}, wise_ft: {lambdas: [0.3, 0.7]}, weight_average: {}, model_stock: {}, "
               "ties: {density: 0.5}, dawin: {k: 2}}")
    logits = {}
    for where in ("task", "actor"):
        exp = config.load(mini_pool / "experiment.yaml", [methods, f"resources.merge_on={where}",
                                                           f"output_dir={tmp_path / where}"])
        pipeline.run_experiment(exp, cache_dir=tmp_path / f"cache-{where}")
        logits[where] = {f.name: np.load(f) for f in (tmp_path / f"cache-{where}" / "logits").glob("*.npy")}
    # same recipes, same keys: the caches name the same outputs, and they are equal bit for bit: the scores
    # (float64 entropies and predictions) of the static merges and DaWin's candidates and references, validation
    # logits and fitted temperatures
    assert logits["task"].keys() == logits["actor"].keys() and len(logits["task"]) >= 6 * 3
    assert {v.shape[1] if v.ndim == 2 else "temperature" for v in logits["task"].values()} == {4, 10, "temperature"}
    for name, values in logits["task"].items():
        assert np.array_equal(values, logits["actor"][name]), name
    rows = {where: {r["key"]: r["accuracy"] for r in ResultStore(tmp_path / where).rows()} for where in logits}
    assert rows["task"] == rows["actor"] and len(rows["task"]) == 7 * 3


def test_the_driver_builds_no_merge(mini_pool, ray_local, tmp_path, monkeypatch):
    """The merge functions never run in the driver process: they run in Ray tasks (the wrapper below travels with
    the recipe, records where it ran, and merges)."""
    from raymerge import merge

    marker = tmp_path / "ran-in-driver"
    for name in ("interpolate", "weight_average", "ties"):
        monkeypatch.setattr(merge, name, _watched(getattr(merge, name), os.getpid(), marker))
    exp = config.load(mini_pool / "experiment.yaml", [
        "methods={wise_ft: {lambdas: [0.5]}, weight_average: {}, ties: {}}", f"output_dir={tmp_path / 'out'}"])
    store = pipeline.run_experiment(exp, cache_dir=tmp_path / "cache")
    assert len(store.rows()) == 3 * 3
    assert not marker.exists(), marker.read_text()


def _watched(fn, driver: int, marker):
    def merge(*args, **kwargs):
        if os.getpid() == driver:
            marker.write_text(fn.__name__)
        return fn(*args, **kwargs)

    merge.__qualname__ = fn.__qualname__
    return merge
