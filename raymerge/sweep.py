"""Combinatorial sweeps: every merge method over every subset of the task pool (CART paper Fig. 6).

Each (subset, method) is one candidate of the driver in :mod:`raymerge.pipeline`, judged on the test split of
every task in its subset, so the results store makes sweeps resumable: a restarted sweep plans only the rows it
lacks. Merges for the next candidates are built in a background thread while the actors evaluate the current one,
so workers do not wait on the driver.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from raymerge.config import Experiment
from raymerge.pipeline import Candidate, Run, dawin_merge, phase, start_run
from raymerge.results import ResultStore
from raymerge.statedict import to_numpy
from tqdm import tqdm

log = logging.getLogger("raymerge")

PREFETCH = 2  # merges built ahead of the evaluation in flight


def subsets(tasks: Sequence[str], min_size: int = 2, max_size: int | None = None) -> list[tuple[str, ...]]:
    """All subsets of ``tasks`` with ``min_size <= |S| <= max_size``, by size then in order (8 tasks, 2..8: 247)."""
    top = len(tasks) if max_size is None else min(max_size, len(tasks))
    return [s for k in range(min_size, top + 1) for s in itertools.combinations(tasks, k)]


def sweep_candidates(run: Run, subset: tuple[str, ...], methods: dict[str, dict[str, Any]]) -> Iterator[Candidate]:
    """One candidate per method for ``subset``: the merge of the subset's fine-tuned models."""
    from raymerge.merge import task_arithmetic, ties, weight_average
    from raymerge.workers import distributed_cart

    names = [run.tasks[t].finetuned for t in subset]
    fts = [run.finetuned[n] for n in names]
    tasks = list(subset)
    for name, p in methods.items():
        params = {"subset": tasks, **p}
        if name == "weight_average":
            build = lambda: weight_average(fts, names)  # noqa: E731
        elif name == "task_arithmetic":
            build = lambda p=p: task_arithmetic(run.base, fts, float(p["lam"]), names=names)  # noqa: E731
        elif name == "ties":
            build = lambda p=p: ties(run.base, fts, float(p["lam"]), float(p["density"]), names=names)  # noqa: E731
        elif name == "cart":
            build = lambda p=p: distributed_cart(run.base, fts, float(p["rank_ratio"]), float(p["lam"]), p["svd"],  # noqa: E731
                                                 run.exp.seed, names=names)
        elif name == "dawin":
            yield Candidate(f"sweep/{name}", params, None, tasks, predict=dawin_merge(run, names, p))
            continue
        else:
            raise ValueError(f"sweep method {name!r} is not one of weight_average, task_arithmetic, ties, cart, dawin")
        yield Candidate(f"sweep/{name}", params, build, tasks)


def run_sweep(exp: Experiment, force: bool = False, cache_dir=None, address: str | None = None) -> ResultStore:
    """Run the experiment's ``sweep`` section over every task subset; rows already stored are skipped."""
    if not exp.sweep:
        raise ValueError(f"{exp.source}: no sweep section")
    run = start_run(exp, force, cache_dir, address)
    try:
        sweep_run(run)
    finally:
        run.pool.shutdown()
        run.store.write_summary()
    return run.store


def sweep_run(run: Run) -> None:
    """The sweep loop over a started :class:`Run` (its worker pool stays up)."""
    cfg = run.exp.sweep
    plan = subsets(cfg["tasks"] or list(run.tasks), cfg["min_size"], cfg["max_size"])
    todo = [c for s in plan for c in sweep_candidates(run, s, cfg["methods"]) if not run.is_done(c.method, c.params, c.tasks)]
    log.info("sweep: %d subsets x %d methods; %d candidates to evaluate, %d rows already stored skipped",
             len(plan), len(cfg["methods"]), len(todo), run.skipped)
    evaluations = sum(len(c.tasks or []) for c in todo)
    log.info("sweep work: %d merged models, %d test-set evaluations (each one forward pass over a test split)",
             len(todo), evaluations)
    start = time.perf_counter()
    with phase("sweep"), ThreadPoolExecutor(max_workers=1) as builder:
        futures: list[Future | None] = []

        def schedule(i: int) -> None:
            c = todo[i]
            futures.append(builder.submit(lambda: to_numpy(c.build())) if c.build else None)

        for i in range(min(PREFETCH, len(todo))):
            schedule(i)
        for i, cand in enumerate(tqdm(todo, desc="sweep", unit="merge")):
            if i + PREFETCH < len(todo):
                schedule(i + PREFETCH)
            weights = futures[i].result() if futures[i] else None
            futures[i] = None
            run.evaluate_candidate(cand, weights)
    minutes = (time.perf_counter() - start) / 60
    done = len({tuple(c.params["subset"]) for c in todo})
    if minutes > 0 and todo:
        log.info("sweep throughput: %.1f subsets/min, %.1f evaluations/min", done / minutes, evaluations / minutes)
