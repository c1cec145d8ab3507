"""The evaluation primitive on Ray actors: sharded results equal the single-process reference exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ARCH, random_dataset, random_encoder
from raymerge import config, dawin, models, pipeline
from raymerge.statedict import to_numpy
from raymerge.workers import Resources, WorkerPool, evaluate_local


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = WorkerPool(ARCH, Resources(num_actors=2, num_cpus_per_actor=0.5, batch_size=64))
    yield pool
    pool.shutdown()


def test_sharded_equals_single_process(pool):
    import torch

    torch.manual_seed(0)
    head = models.Head(torch.randn(7, 64), torch.randn(7), tuple("abcdefg"))
    ds = random_dataset(3, 333, 7)  # not a multiple of the batch size: the last shard is ragged
    pool.add_head("h", head)
    pool.add_dataset("d", ds)
    for seed in (0, 1):
        weights = to_numpy(random_encoder(seed))
        key = pool.put_weights(weights)
        sharded = pool.evaluate(key, "h", "d")
        local = evaluate_local(ARCH, weights, head, ds, batch_size=64)
        assert sharded.shape == (333, 7)
        assert np.array_equal(sharded, local)  # bit for bit, not approximately
        rows = np.array([0, 5, 63, 64, 200, 332])
        assert np.array_equal(pool.evaluate(key, "h", "d", rows), local[rows])
    # sets of one batch each: consecutive ones go to different actors, and still evaluate bit for bit
    small = [random_dataset(4 + i, 50, 7) for i in range(2)]
    for i, ds_i in enumerate(small):
        pool.add_dataset(f"small{i}", ds_i)
    busy = [[a for a, part in enumerate(pool.shards[f"small{i}"]) if len(part)] for i in range(2)]
    assert len(busy[0]) == len(busy[1]) == 1 and busy[0] != busy[1]
    assert np.array_equal(pool.evaluate(key, "h", "small1"), evaluate_local(ARCH, weights, head, small[1], batch_size=64))



def test_requests_submitted_together_make_one_call_per_actor(pool):
    """Everything submitted at once (two weight sets, rows, a reduction) travels as one call per actor, and each
    request's output is still the single-process reference's, bit for bit."""
    import ray
    import torch

    from raymerge.workers import Reduce, Request

    torch.manual_seed(1)
    head = models.Head(torch.randn(5, 64), torch.randn(5), tuple("abcde"))
    ds = random_dataset(7, 300, 5)
    pool.add_head("h5", head)
    pool.add_dataset("d5", ds)
    weights = [to_numpy(random_encoder(seed)) for seed in (2, 3)]
    keys = [pool.put_weights(w) for w in weights]
    local = [evaluate_local(ARCH, w, head, ds, batch_size=64) for w in weights]
    rows = np.array([1, 70, 130, 250, 299])
    requests = [Request(keys[0], "h5", "d5"), Request(keys[1], "h5", "d5", rows),
                Request(keys[1], "h5", "d5", reduce=Reduce(ds.labels))]
    pending = pool.submit(requests)
    calls = {call for parts in pending for _, call, _ in parts}
    assert len(calls) == len(pool.actors) == 2  # both actors hold a shard of d5; one call each, not one per request
    got = pool.gather(pending, [(300, 5, np.float32), (300, 5, np.float32), (300, 4, np.float64)])
    assert np.array_equal(got[0], local[0])
    assert np.array_equal(got[1][rows], local[1][rows]) and np.isnan(np.delete(got[1], rows, axis=0)).all()
    assert np.array_equal(got[2][:, dawin.SCORE_COLUMNS.index("prediction")], local[1].argmax(1))
    assert all(len(ray.get(call)) == len([p for parts in pending for p in parts if p[1] == call]) for call in calls)


def test_weights_are_ready_once_their_merge_task_has_finished(pool, tmp_path):
    """What :meth:`WorkerPool.ready` tells the sweep before it queues an evaluation ahead: a merge still being made
    is not ready (its evaluation would hold up the actors' later calls), one made is, and so is a recipe the actors
    build themselves."""
    import ray

    from raymerge.methods import Recipe
    from raymerge.workers import OnActors

    @ray.remote(num_cpus=0)
    def merge(release: str) -> dict:
        while not Path(release).exists():
            time.sleep(0.01)
        return {"w": np.zeros(1, np.float32)}

    release = tmp_path / "release"
    made = merge.remote(str(release))
    try:
        pool.put_built("merging", made)
        pool.put_built("on actors", OnActors(Recipe(dict), {}))
        assert not pool.ready("merging") and pool.ready("on actors")
    finally:
        release.touch()  # the task ends whatever the assertion found
    ray.get(made)
    assert pool.ready("merging")
    for key in ("merging", "on actors"):
        pool.drop_weights(key)


def test_run_experiment_writes_rows_and_resumes(mini_pool, ray_local, tmp_path):
    exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / 'out'}", "methods={zeroshot: {}, finetuned: {}}"])
    store = pipeline.run_experiment(exp, cache_dir=tmp_path / "cache")
    rows = store.rows()
    assert {(r["method"], r["split"]) for r in rows} == {
        (m, s) for m in ("zeroshot", "finetuned") for s in ("test", "rotate", "noise")
    }
    assert len(rows) == 9  # zeroshot + 2 fine-tuned models, 3 test sets each
    base = models.load_encoder_weights(ARCH, mini_pool / "base.safetensors")
    head = models.load_head(mini_pool / "head.safetensors")
    from raymerge.data import load_dataset

    ds = load_dataset(mini_pool / "rotate")
    expected = np.mean(evaluate_local(ARCH, to_numpy(base), head, ds, 64).argmax(1) == ds.labels)
    (row,) = [r for r in rows if r["method"] == "zeroshot" and r["split"] == "rotate"]
    assert row["accuracy"] == pytest.approx(expected, abs=0) and row["n"] == 150
    samples = store.samples(row["key"]).to_pydict()
    assert np.array_equal(samples["label"], ds.labels)
    # a rerun computes nothing and duplicates nothing
    again = pipeline.run_experiment(exp, cache_dir=tmp_path / "cache")
    assert len(again.rows()) == 9 and len(list((tmp_path / "out" / "rows").glob("*.parquet"))) == len(
        list((tmp_path / "out" / "rows").glob("*.parquet"))
    )


def test_adaptations_side_by_side_go_to_different_actors(monkeypatch):
    """WorkerPool.adapt picks the first actor running the fewest adaptations: two started together from threads
    run on actors 0 and 1, and once both are done the next goes to actor 0 again. The actors are stand-ins whose
    adapt call waits until the test releases it."""
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    from raymerge import workers

    release = threading.Event()
    used = []

    class Method:
        def __init__(self, index: int) -> None:
            self.index = index

        def remote(self, *args) -> Future:
            used.append(self.index)
            done: Future = Future()
            threading.Thread(target=lambda: release.wait(10) and done.set_result(self.index)).start()
            return done

    pool = WorkerPool.__new__(WorkerPool)
    pool.actors = [type("Actor", (), {"adapt": Method(i)})() for i in range(3)]
    pool.head_specs = {"h": ["spec"]}
    pool._adapting, pool._adapting_lock = [0, 0, 0], threading.Lock()
    monkeypatch.setattr(workers.ray, "put", lambda value: value)
    monkeypatch.setattr(workers.ray, "get", lambda future: future.result())
    with ThreadPoolExecutor(2) as threads:
        started = [threads.submit(pool.adapt, "merge", {"h": "data"}, None, 0, "x") for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(used) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(used) == [0, 1] and pool._adapting == [1, 1, 0]
        release.set()
        assert sorted(f.result(timeout=20) for f in started) == [0, 1]
    assert pool._adapting == [0, 0, 0]
    assert pool.adapt("merge", {"h": "data"}, None, 0, "x") == 0
