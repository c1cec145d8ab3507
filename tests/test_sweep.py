"""Task-subset sweeps: the plan, resume after the driver is killed, and survival of a killed worker actor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import sweep_experiment
from raymerge import config
from raymerge.results import ResultStore
from raymerge.sweep import run_sweep, subsets, sweep_run

REPO = Path(__file__).resolve().parents[1]
TASKS = 4


def test_subset_counts():
    tasks = [f"t{i}" for i in range(8)]
    assert len(subsets(tasks)) == 247  # sizes 2..8: 2^8 - 1 - 8
    assert len(subsets(tasks, min_size=1)) == 255
    assert subsets(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]


def test_only_the_next_svd_based_merge_is_made_ahead():
    from raymerge.methods import Candidate, Recipe
    from raymerge.sweep import make_ahead

    def cand(where: str) -> tuple:
        return (None, None, Candidate({}, recipe=Recipe(dict, where=where)), None)

    # the current candidate (SVD-based too), then elementwise, SVD, SVD, elementwise
    window = [cand("task"), cand("any"), cand("task"), cand("task"), cand("any")]
    position = {id(item[2]): i for i, item in enumerate(window)}
    started = []
    make_ahead(window, lambda *item: started.append(position[id(item[2])]) or True)
    assert started == [0, 1, 2, 4]
    # an SVD-based merge with nothing to make (its rows stored or cached) leaves the place to the next one
    started.clear()
    make_ahead(window, lambda *item: started.append(position[id(item[2])]) or position[id(item[2])] != 2)
    assert started == [0, 1, 2, 3, 4]


def test_after_the_current_candidate_one_svd_build_and_one_predict_candidates_merges_are_made_ahead():
    from raymerge.methods import Candidate, Recipe
    from raymerge.sweep import make_ahead

    def svd() -> tuple:
        return (None, None, Candidate({}, recipe=Recipe(dict, where="task")), None)

    def dawin() -> tuple:
        return (None, None, Candidate({}, predict=lambda pairs: None, ahead=lambda pairs: []), None)

    def started(window: list, makes: Callable[[int], bool] = lambda i: True) -> list[int]:
        position = {id(item[2]): i for i, item in enumerate(window)}
        out = []
        make_ahead(window, lambda *item: out.append(position[id(item[2])]) or makes(position[id(item[2])]))
        return out

    # the current candidate, then SVD, ahead, SVD, ahead: the kinds are counted apart
    window = [svd(), svd(), dawin(), svd(), dawin()]
    assert started(window) == [0, 1, 2]
    # a predict candidate with nothing to make ahead still holds its place: its phase 2 comes before the next one's
    assert started(window, lambda i: i != 2) == [0, 1, 2]
    # an SVD build with nothing to make leaves the place to the next one
    assert started(window, lambda i: i != 1) == [0, 1, 2, 3]
    # while the current candidate's phase 2 holds its merges, no other one's are made ahead
    assert started([dawin(), dawin(), svd(), dawin()]) == [0, 2]
    with pytest.raises(ValueError, match="ahead"):
        Candidate({}, recipe=Recipe(dict), ahead=lambda pairs: [])


def test_evaluations_are_queued_ahead_up_to_the_first_not_ready():
    """Run.queue submits the current item whatever it answers, then the next ones while each is queued: one whose
    merge is still being made (or that is not a recipe) stops it, so nothing overtakes it on the actors."""
    from types import SimpleNamespace

    from raymerge.pipeline import Run

    def queued(answers: list[bool], ahead: int, i: int = 0) -> list[tuple[int, bool]]:
        asked = []
        run = SimpleNamespace(evaluations_ahead=ahead, submit_ahead=lambda item, only_ready: asked.append(
            (item, only_ready)) or answers[item])
        Run.queue(run, [(k,) for k in range(len(answers))], i)
        return asked

    assert queued([False, True, True, True], 2) == [(0, False), (1, True), (2, True)]
    assert queued([True, False, True, True], 3) == [(0, False), (1, True)]
    assert queued([True, True, True], 1, i=2) == [(2, False)]
    assert queued([True, True], 0) == [(0, False)]


def _raw_rows(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(p).num_rows for p in (out / "rows").glob("part-*.parquet"))


def _by_key(out: Path) -> dict[str, float]:
    return {r["key"]: r["accuracy"] for r in ResultStore(out).rows()}


METHODS = {"weight_average": {}, "cart": {"rank_ratio": 0.25, "lam": 1.0}, "dawin": {"k": 1}}
KILLED_TASKS = 3  # 4 subsets × 3 methods: a kill after 5 parts lands mid-sweep, at a third of TASKS' cost in CI
EXPECTED_ROWS = sum(len(s) for s in subsets(range(KILLED_TASKS))) * len(METHODS)


def test_driver_killed_then_resumed_equals_uninterrupted(tiny_zoo, tmp_path, ray_local):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYMERGE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--address", "local", "--config",
           str(sweep_experiment(tiny_zoo, out, METHODS, KILLED_TASKS))]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "rows").glob("part-*.parquet"))) < 5:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(ResultStore(out).rows())
    assert 0 < partial < EXPECTED_ROWS
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial} rows already stored skipped" in resumed.stderr
    # uninterrupted, with a cache of its own, in this process's Ray (a job process of its own costs CI ~15 s)
    reference = tmp_path / "reference"
    run_sweep(config.load(sweep_experiment(tiny_zoo, reference, METHODS, KILLED_TASKS)), cache_dir=tmp_path / "cache2")
    assert _by_key(out) == _by_key(reference)
    assert len(_by_key(out)) == EXPECTED_ROWS == _raw_rows(out)  # no duplicate and no missing row


def test_worker_killed_mid_sweep_completes_identically(tiny_zoo, tmp_path, ray_local):
    from raymerge.pipeline import start_run

    methods = {"weight_average": {}, "task_arithmetic": {"lambdas": [0.3]}}
    out = tmp_path / "faulty"
    run = start_run(config.load(sweep_experiment(tiny_zoo, out, methods, TASKS)), cache_dir=tmp_path / "cache-a")
    victim = ray_local.get(run.pool.actors[0].pid.remote())
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / "rows").glob("part-*.parquet"))) < 3:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed.set()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        sweep_run(run)
        killed_mid_sweep = killed.is_set()  # the kill landed before the sweep finished
        restarted = ray_local.get(run.pool.actors[0].pid.remote())
    finally:
        thread.join()
        run.pool.shutdown()
    assert killed_mid_sweep and restarted != victim
    reference = run_sweep(config.load(sweep_experiment(tiny_zoo, tmp_path / "clean", methods, TASKS)), cache_dir=tmp_path / "cache-b")
    assert _by_key(out) == {r["key"]: r["accuracy"] for r in reference.rows()}
    assert len(_by_key(out)) == _raw_rows(out) == sum(len(s) for s in subsets(range(TASKS))) * len(methods)


def test_a_sweep_makes_dawins_first_merges_ahead_and_each_merge_once(tiny_zoo, tmp_path, ray_local, monkeypatch):
    """Multi-task DaWin (mixture mean: one merge per test set) with one merge in flight and its phase 1 cached:
    each DaWin candidate's first merge is started before its evaluation, the others by its phase 2, every one
    exactly once; phase 1 runs once per candidate, and no merged weight set is left registered."""
    from raymerge.dawin import merge_for
    from raymerge.methods import dawin as dawin_unit
    from raymerge.pipeline import start_run

    methods = {"task_arithmetic": {"lambdas": [0.3]}, "dawin": {"k": 1}}
    run = start_run(config.load(sweep_experiment(tiny_zoo, tmp_path / "out", methods, 3, max_merges_in_flight=1)),
                    cache_dir=tmp_path / "cache")
    tasks = run.exp.sweep.tasks  # phase 1 of every (model, task) pair cached, as after a sweep's first subsets
    pool = run.view([run.tasks[t].finetuned for t in tasks], tasks)
    dawin_unit.runner(pool, pool.names, 0.3, pool.eval_pairs())
    phase1, phase1_runs, inside, built = dawin_unit.phase1, [], [], []
    monkeypatch.setattr(dawin_unit, "phase1", lambda *a, **k: phase1_runs.append(1) or phase1(*a, **k))
    build = run.pool.build
    run.pool.build = lambda recipe, models: built.append((recipe, any(inside))) or build(recipe, models)
    evaluate = run.evaluate

    def evaluating(unit, *args):  # inside: while a DaWin candidate is evaluated
        inside.append(unit.name == "dawin")
        try:
            return evaluate(unit, *args)
        finally:
            inside.clear()
    run.evaluate = evaluating
    try:
        sweep_run(run)
        registered = set(run.pool.registered)
        rows = run.store.rows()
    finally:
        run.pool.shutdown()
    plan = subsets(range(3))
    merges = [(recipe.key(run.model_hashes), during) for recipe, during in built if recipe.fn is merge_for]
    assert len({key for key, _ in merges}) == len(merges) == sum(map(len, plan))  # one per test set, once each
    assert [during for _, during in merges].count(False) == len(plan)  # the first of each candidate: ahead
    assert not registered & {key for key, _ in merges}
    assert len(phase1_runs) == len(plan)  # ahead's, which the evaluation reused
    assert sum(1 for r in rows if r["method"] == "sweep/dawin") == sum(map(len, plan))
    assert all(r["merges"] == 1 for r in rows if r["method"] == "sweep/dawin")


def test_sampled_subsets_are_seeded_distinct_and_sized():
    from raymerge.sweep import sample_subsets

    tasks = [f"t{i}" for i in range(20)]
    plan = sample_subsets(tasks, 2, None, 5, seed=3)
    sizes = [len(s) for s in plan]
    assert sizes == sorted(sizes)
    # C(20, k) > 5 for 2 <= k <= 18: five each; C(20, 19) = 20 > 5: five; C(20, 20) = 1: the one subset
    assert {k: sizes.count(k) for k in set(sizes)} == {**{k: 5 for k in range(2, 20)}, 20: 1}
    assert len(set(plan)) == len(plan) and all(list(s) == sorted(s, key=tasks.index) for s in plan)
    assert sample_subsets(tasks, 2, None, 5, seed=3) == plan and sample_subsets(tasks, 2, None, 5, seed=4) != plan
    assert sample_subsets(tasks[:4], 2, None, 100, seed=0) == subsets(tasks[:4])  # small sizes: every subset


def test_a_resumed_sweep_continues_its_stored_sample(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from raymerge import sweep

    exp = SimpleNamespace(seed=0, output_dir=tmp_path, sweep=config.Sweep(2, None, None, {}, subsets_per_size=3))
    tasks = [f"t{i}" for i in range(14)]
    plan = sweep.sweep_plan(exp, tasks)
    assert (tmp_path / "sweep-plan.json").is_file() and len(plan) == 3 * 12 + 1
    monkeypatch.setattr(sweep, "sample_subsets", lambda *a, **k: pytest.fail("the stored sample was drawn again"))
    assert sweep.sweep_plan(exp, tasks) == plan
    exp.seed = 1  # other settings: a new sample
    monkeypatch.undo()
    assert sweep.sweep_plan(exp, tasks) != plan
    # full enumeration stays the default up to 10 tasks; 14 tasks are sampled by default
    exp.sweep = config.Sweep(2, None, None, {})
    assert sweep.sweep_plan(exp, tasks[:10]) == subsets(tasks[:10])
    assert len(sweep.sweep_plan(exp, tasks)) == sweep.DEFAULT_SUBSETS_PER_SIZE * 11 + 14 + 1  # C(14,13) = 14 < 20


def test_the_next_candidates_evaluation_is_queued_before_the_current_one_is_gathered(tiny_zoo, tmp_path, ray_local):
    """With one evaluation ahead, each static candidate's requests reach the actors before the candidate before it
    is gathered (the actors go on to it while the driver writes rows); never while its merge is still being made
    (it would hold up the calls queued behind it), when every gather finds nothing else in flight. The rows are the
    same either way. The actors build the merges (merge_on: actor), so that they are ready at once."""
    from raymerge.pipeline import start_run

    methods = {"weight_average": {}, "task_arithmetic": {"lambdas": [0.3]}}
    queued = {}
    for made in (True, False):
        run = start_run(config.load(sweep_experiment(tiny_zoo, tmp_path / f"made-{made}", methods, 3,
                                                     merge_on="actor")), cache_dir=tmp_path / f"cache-{made}")
        submit, gather, sent, waiting = run._submit, run._gather, {}, []

        def submitting(requests, submit=submit, sent=sent):
            out = submit(requests)
            sent.update({id(s): (s, key) for s, (key, *_) in zip(out, requests)})
            return out

        def gathering(submitted, gather=gather, sent=sent, waiting=waiting):
            keys = {sent.pop(id(s))[1] for s in submitted}
            waiting.append({key for _, key in sent.values()} - keys)  # other weights in flight at this gather
            return gather(submitted)

        run._submit, run._gather = submitting, gathering
        if not made:
            run.pool.ready = lambda key: False
        try:
            sweep_run(run)
            left = dict(run._submitted)
        finally:
            run.pool.shutdown()
        queued[made] = waiting
        assert not left, "an evaluation submitted ahead was never gathered"
    candidates = len(subsets(range(3))) * len(methods)
    assert len(queued[True]) == len(queued[False]) == candidates
    assert all(len(w) == 1 for w in queued[True][:-1]) and not queued[True][-1]
    assert not any(queued[False])
    assert _by_key(tmp_path / "made-True") == _by_key(tmp_path / "made-False")
    assert len(_by_key(tmp_path / "made-True")) == sum(len(s) for s in subsets(range(3))) * len(methods)


def test_a_sweeps_pool_shards_its_sets_for_the_subsets_it_evaluates(tiny_zoo, tmp_path, ray_local, monkeypatch):
    """run_sweep hands the pool its plan before the pool shards the sets: each subset's test sets form one group
    whose extra batches are spread over the actors (validation sets, evaluated alone, in none), and nothing is
    stored yet of a sampled plan."""
    from raymerge import sweep
    from raymerge.workers import WorkerPool

    groups = []
    add = WorkerPool.add_datasets
    monkeypatch.setattr(WorkerPool, "add_datasets", lambda self, sets, together=(): groups.append(
        (sorted(sets), [sorted(g) for g in together])) or add(self, sets, together))
    stored = []
    monkeypatch.setattr(sweep, "sweep_run",
                        lambda run: stored.append((run.exp.output_dir / "sweep-plan.json").exists()))
    path = sweep_experiment(tiny_zoo, tmp_path / "out", {"weight_average": {}}, 3)
    spec = yaml.safe_load(path.read_text())
    spec["sweep"]["subsets_per_size"] = 2  # a sample: 2 of the C(3, 2) = 3 pairs, and the one triple
    path.write_text(yaml.safe_dump(spec))
    exp = config.load(path)
    run_sweep(exp, cache_dir=tmp_path / "cache")
    tasks = exp.sweep.tasks
    plan = sweep.sample_subsets(tasks, 2, None, 2, exp.seed)
    assert len(plan) == 3 and stored == [False]
    (sets, together), = groups
    assert sets == sorted(f"{t}/{split}" for t in exp.tasks for split in ("test", "validation"))
    assert together == [sorted(f"{t}/test" for t in subset) for subset in plan]


def test_adaptations_run_side_by_side_with_the_same_results(tiny_zoo, tmp_path, ray_local, monkeypatch):
    """A sweep's AdaMerging candidates with adaptations_in_flight 2 adapt two at a time (their adaptations overlap)
    and store the same rows, learned coefficients included, as one at a time."""
    from raymerge.workers import WorkerPool

    spans = []
    adapt = WorkerPool.adapt

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return adapt(self, *args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))
    monkeypatch.setattr(WorkerPool, "adapt", timed)
    methods = {"adamerging": {"steps": 3, "batch_size": 8, "batches_per_step": 1}}
    rows = {}
    for flight in (1, 2):
        spans.clear()
        out = tmp_path / f"flight-{flight}"
        stores = run_sweep(config.load(sweep_experiment(tiny_zoo, out, methods, 3, adaptations_in_flight=flight)),
                           cache_dir=tmp_path / f"cache-{flight}")
        rows[flight] = {r["key"]: (r["accuracy"], r["details"]) for r in stores.rows()}
        spans.sort()
        overlapping = sum(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
        assert len(spans) == len(subsets(range(3)))
        assert (overlapping > 0) == (flight == 2), (flight, spans)
    assert rows[1] == rows[2] and len(rows[1]) == sum(len(s) for s in subsets(range(3)))
