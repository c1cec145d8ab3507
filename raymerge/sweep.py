"""Combinatorial sweeps: every merge method over every subset of the task pool (CART paper Fig. 6).

Each (subset, method) is one candidate of the driver in :mod:`raymerge.pipeline`, judged on the test split of
every task in its subset, so the results store makes sweeps resumable: a restarted sweep plans only the rows it
lacks. The merges of the next candidates are made off the driver (Ray tasks, or the actors from their resident
models: ``resources.merge_on``) while the actors evaluate the current one, so workers do not wait on the driver.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from raymerge import methods
from raymerge._io import write_text
from raymerge.config import Experiment, MethodConfigs
from raymerge.methods import Candidate, Method, Params, Pool
from raymerge.pipeline import Run, phase, start_run
from raymerge.results import ResultStore

log = logging.getLogger("raymerge")

MERGES_AHEAD = 4  # merges made ahead of the evaluation in flight


def label(name: str) -> str:
    """The method column of a sweep's rows: the report draws them as curves, apart from the main tables."""
    return f"sweep/{name}"


def subsets(tasks: Sequence[str], min_size: int = 2, max_size: int | None = None) -> list[tuple[str, ...]]:
    """All subsets of ``tasks`` with ``min_size <= |S| <= max_size``, by size then in order (8 tasks, 2..8: 247)."""
    top = len(tasks) if max_size is None else min(max_size, len(tasks))
    return [s for k in range(min_size, top + 1) for s in itertools.combinations(tasks, k)]


FULL_ENUMERATION_UP_TO = 10  # tasks: beyond, 2^T subsets (16,383 for 14, 1,048,575 for 20) are sampled by default
DEFAULT_SUBSETS_PER_SIZE = 20


def sample_subsets(tasks: Sequence[str], min_size: int, max_size: int | None, per_size: int,
                   seed: int) -> list[tuple[str, ...]]:
    """``per_size`` distinct subsets of each size (all of them where a size has fewer), drawn uniformly from
    ``numpy.random.default_rng(seed)``, each in task order, by size then in task order; no size is enumerated."""
    rng = np.random.default_rng(seed)
    top = len(tasks) if max_size is None else min(max_size, len(tasks))
    plan = []
    for k in range(min_size, top + 1):
        if math.comb(len(tasks), k) <= per_size:
            plan += list(itertools.combinations(tasks, k))
            continue
        chosen: set[tuple[int, ...]] = set()
        while len(chosen) < per_size:
            chosen.add(tuple(sorted(rng.choice(len(tasks), size=k, replace=False).tolist())))
        plan += [tuple(tasks[i] for i in c) for c in sorted(chosen)]
    return plan


def sweep_plan(exp: Experiment, tasks: Sequence[str], store: bool = True) -> list[tuple[str, ...]]:
    """The subsets a sweep evaluates: every one up to :data:`FULL_ENUMERATION_UP_TO` tasks unless
    ``sweep.subsets_per_size`` asks for a sample, a seeded sample beyond. A sample is stored with its parameters in
    ``<output_dir>/sweep-plan.json`` (with ``store``), and a resumed sweep with the same parameters continues that
    very sample."""
    cfg = exp.sweep
    per_size = cfg.subsets_per_size
    if per_size is None and len(tasks) > FULL_ENUMERATION_UP_TO:
        per_size = DEFAULT_SUBSETS_PER_SIZE
        log.info("sweep: %d tasks, sampling %d subsets per size (sweep.subsets_per_size)", len(tasks), per_size)
    if per_size is None:
        return subsets(tasks, cfg.min_size, cfg.max_size)
    spec = {"tasks": list(tasks), "min_size": cfg.min_size, "max_size": cfg.max_size, "subsets_per_size": per_size,
            "seed": exp.seed}
    stored = exp.output_dir / "sweep-plan.json"
    if stored.is_file():
        saved = json.loads(stored.read_text())
        if saved.get("spec") == spec:
            return [tuple(s) for s in saved["subsets"]]
        log.info("sweep: %s was drawn with other settings; drawing a new sample", stored)
    plan = sample_subsets(tasks, cfg.min_size, cfg.max_size, per_size, exp.seed)
    if not store:
        return plan
    stored.parent.mkdir(parents=True, exist_ok=True)
    write_text(stored, json.dumps({"spec": spec, "subsets": [list(s) for s in plan]}, indent=1))
    return plan


def sweep_candidates(run: Run, subset: tuple[str, ...], configs: MethodConfigs) -> Iterator[tuple[Method, Params, Candidate, Pool]]:
    """Every method configuration's candidates for ``subset``: each unit run on the pool of the subset's tasks and
    their fine-tuned models, judged on the subset's tasks, its params recording the subset."""
    pool = run.view(models=[run.tasks[t].finetuned for t in subset], tasks=list(subset))
    for name, params_list in configs.items():
        unit = methods.get(name)
        for params in params_list:
            for cand in unit.candidates(pool, params):
                cand.params["subset"] = list(subset)
                yield unit, params, cand, pool


def run_sweep(exp: Experiment, force: bool = False, cache_dir: Path | None = None, address: str | None = None
              ) -> ResultStore:
    """Run the experiment's ``sweep`` section over every task subset; rows already stored are skipped."""
    if not exp.sweep:
        raise ValueError(f"{exp.source}: no sweep section")
    # drawn again, and stored, once the inputs are checked and the pool started (sweep_run): the same seeded sample
    plan = sweep_plan(exp, exp.sweep.tasks or list(exp.tasks), store=False)
    run = start_run(exp, force, cache_dir, address, subsets=plan)
    try:
        sweep_run(run)
        run.store.write_current(exp.name, "sweep", run.planned)
    finally:
        run.close()
        run.store.write_summary()
    return run.store


def make_ahead(window: Sequence[tuple[Method, Params, Candidate, Pool]], start: Callable[..., bool]) -> None:
    """Start the merges of ``window`` (the candidate being evaluated, then those after it) with ``start``, which
    says whether it started (or had started) one. Two kinds of candidate hold several weight sets in the object store
    while they wait: an SVD-based build (copies of its pool models) and a predict candidate's ``ahead`` merges (up to
    ``max_merges_in_flight`` of DaWin's). After the current candidate, only the first SVD build that starts is made
    ahead, and only the first candidate with ``ahead`` is asked: whatever it answers, its phase 2 holds merges before
    any later one's, and none is asked while the current candidate has ``ahead``. DaWin's merged weight sets alive at
    once stay within ``max_merges_in_flight``."""
    held: set[str] = set()
    for j, (_, _, cand, _) in enumerate(window):
        kind = ("svd" if cand.recipe is not None and cand.recipe.where == "task" else
                "ahead" if cand.ahead is not None else None)
        if j == 0 or kind is None:
            start(*window[j])
            if j == 0 and kind == "ahead":  # its phase 2 runs now
                held.add(kind)
        elif kind not in held and (start(*window[j]) or kind == "ahead"):
            held.add(kind)


def sweep_run(run: Run) -> None:
    """The sweep loop over a started :class:`Run` (its worker pool stays up)."""
    cfg = run.exp.sweep
    plan = sweep_plan(run.exp, cfg.tasks or list(run.tasks))
    todo = []
    for s in plan:
        for unit, params, c, pool in sweep_candidates(run, s, cfg.methods):
            run.planned.update(run.keys(unit, params, c, pool, label(unit.name)))
            if run.pending(unit, params, c, pool, label(unit.name)):
                todo.append((unit, params, c, pool))
            else:
                run.skipped += len(pool.eval_pairs(c.tasks))
    log.info("sweep: %d subsets x %d method configurations; %d candidates to evaluate, %d rows already stored skipped",
             len(plan), sum(map(len, cfg.methods.values())), len(todo), run.skipped)
    evaluations = sum(len(pool.eval_pairs(c.tasks)) for _, _, c, pool in todo)
    log.info("sweep work: %d merged models, %d test-set evaluations (each one forward pass over a test split)",
             len(todo), evaluations)
    labelled = [(*item, label(item[0].name)) for item in todo]
    start = time.perf_counter()
    with phase("sweep"), run.evaluating():
        for i, item in enumerate(tqdm(labelled, desc="sweep", unit="merge")):
            # the next merges are made (Ray tasks, in parallel where CPUs are free) while this one is evaluated
            make_ahead(todo[i:i + MERGES_AHEAD + 1], lambda u, p, c, pl: run.prefetch_candidate(u, p, c, pl, label(u.name)))
            # at a subset's AdaMerging or CART++: the next subsets' adaptations beside it, each on an actor of its own
            run.adapt_ahead(labelled, i)
            # the next candidate's evaluation queues on the actors behind this one's, once its merge is made: they go
            # on to it while the driver gathers this one and writes its rows, instead of idling until its call comes
            run.queue(labelled, i)
            run.evaluate(*item)
    minutes = (time.perf_counter() - start) / 60
    done = len({tuple(c.params["subset"]) for _, _, c, _ in todo})
    if minutes > 0 and todo:
        log.info("sweep throughput: %.1f subsets/min, %.1f evaluations/min", done / minutes, evaluations / minutes)
