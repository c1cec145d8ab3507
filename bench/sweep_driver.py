"""The sweep driver's own CPU per candidate at ViT-B/32 test-set sizes, with the evaluation actors stood in for.

Measured: :func:`raymerge.sweep.sweep_run` — the real :class:`raymerge.pipeline.Run` and the real
:class:`raymerge.workers.WorkerPool` methods (``build``: merge recipes submitted as Ray tasks, ``submit``, ``gather``),
the real logit cache and results store — over the 8 tasks of the task_vectors benchmark at their real test-set sizes
and class counts (logits of SUN397: 19,850 × 397), sharded over 16 actors with batch 256. Only two things are
not real: each actor is a :class:`CannedActor` that answers ``evaluate`` with fixed logits of the right shape for its
shard (so every CPU second of the driver process is the driver's own, not a model's), and the pool models are 4 × 4
stand-ins, so the merge tasks the driver submits finish at once (their cost is the estimate's merge rows, not the
driver's). Time is the driver process's CPU time (``time.process_time``: all its threads, Ray's included), so other
users' load on this shared machine barely moves it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Context, progress

EMBED = 4  # the stand-in heads' feature width: only the number of classes matters here


class CannedActor:
    """Stands in for :class:`raymerge.workers.EvalWorker`: the same ``evaluate`` signature, answered with fixed
    logits (N_shard, C) for the shard and head it is asked about (the label's logit raised by 3, so that predictions
    look like a model's: ~80% right), generated on first use and kept, scaled by a factor in [0.5, 1.5) drawn from
    the weights' key, so that each model has its own entropies (DaWin's coefficients then vary by sample)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.logits: dict[tuple[str, str], np.ndarray] = {}

    def evaluate(self, jobs: list, *weights: Any) -> list[np.ndarray]:
        return [self._evaluate(job) for job in jobs]

    def _evaluate(self, job: Any) -> np.ndarray:
        import ray

        key = (job.head, job.shard_spec[0].hex())
        if key not in self.logits:
            dataset = ray.get(job.shard_spec[0])
            classes = len(ray.get(job.head_spec[0])[1])
            rng = np.random.default_rng([self.seed, len(self.logits)])
            out = rng.standard_normal((len(dataset), classes), dtype=np.float32)
            out[np.arange(len(dataset)), dataset.labels] += 3.0
            self.logits[key] = out
        out = self.logits[key] * np.float32(0.5 + zlib.crc32(job.weights_key.encode()) / 2**32)
        out = out if job.rows is None else out[np.asarray(job.rows)]
        return out if job.reduce is None else job.reduce(out)  # as EvalWorker does: on the actor, not the driver


def canned_pool(resources, handles: list):
    """A :class:`raymerge.workers.WorkerPool` whose ``resources.num_actors`` actors are ``handles`` taken in turn
    (16 logical actors on 2 processes: the driver's cost per call is the same). Only ``__init__`` is bypassed (it
    would start real actors); every method the driver calls is WorkerPool's own."""
    from raymerge.data import Sharder
    from raymerge.workers import WorkerPool

    pool = WorkerPool.__new__(WorkerPool)
    pool.architecture, pool.resources, pool.precision = "stand-in", resources, resources.precision
    pool.actors = [handles[i % len(handles)] for i in range(resources.num_actors)]
    pool.shards, pool.shard_specs, pool.head_specs, pool.head_classes, pool._weights = {}, {}, {}, {}, {}
    pool._sharder = Sharder(resources.num_actors, resources.batch_size)
    return pool


def _tasks(test_sizes: dict[str, int], classes: dict[str, int], val_sizes: dict[str, int], seed: int = 0):
    """LoadedTask per benchmark task: test and validation sets of the real sizes (1 × 1 placeholder images, seeded
    labels) and a stand-in head with the real number of classes."""
    import torch

    from raymerge import models
    from raymerge.data import ImageDataset
    from raymerge.pipeline import LoadedTask

    rng = np.random.default_rng(seed)
    tasks = {}
    for name, n in test_sizes.items():
        names = tuple(f"{name}-{i}" for i in range(classes[name]))
        head = models.Head(torch.from_numpy(rng.standard_normal((classes[name], EMBED), dtype=np.float32)), None, names)
        sets = {split: ImageDataset(name, np.zeros((size, 1, 1), np.uint8),
                                    rng.integers(0, classes[name], size).astype(np.int64), names, split)
                for split, size in (("test", n), ("validation", val_sizes[name]))}
        hashes = {"*": head.hash, **dict.fromkeys(sets, head.hash)}
        tasks[name] = LoadedTask(name, sets, dict.fromkeys(sets, head), hashes, f"ft-{name}")
    return tasks


def measure(ctx: Context, test_sizes: dict[str, int], classes: dict[str, int], val_sizes: dict[str, int],
            actors: int, batch: int, pick: Callable[[list], list]) -> dict[str, Any]:
    """Driver CPU seconds: per evaluated candidate (method, subset, seconds in all, the CPU seconds of the central
    Ray tasks that computed DaWin's diagnostics beside phase 2, not the driver's, and the seconds on the loop's
    critical path: all but the results writer thread's), the one-time planning of the whole sweep (with the loop's
    own overhead), and the one-time phase 1 of DaWin (every (model, task) pair's validation logits and test
    scores). ``pick`` chooses the subsets evaluated from the plan; the others count as stored."""
    import ray
    import torch

    from raymerge import config, dawin_pipeline
    from raymerge.cache import LogitCache
    from raymerge.dawin_pipeline import phase1
    from raymerge.methods import Recipe
    from raymerge.pipeline import Run
    from raymerge.results import ResultStore
    from raymerge.statedict import state_dict_hash, to_numpy
    from raymerge.sweep import label, subsets, sweep_candidates, sweep_run

    out = ctx.scratch("driver")
    exp = config.load(Path(config.__file__).parent / "experiments" / "sweep.yaml", [
        f"zoo={ctx.manifest()}", f"output_dir={out / 'results'}",
        f"sweep.methods={json.dumps(config.DEFAULT_SWEEP_METHODS)}",
        f"resources.num_actors={actors}", f"resources.batch_size={batch}", "resources.precision=bf16"])
    tasks = _tasks(test_sizes, classes, val_sizes)
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 4)}
    finetuned = {t.finetuned: {"w": base["w"] + 0.1 * torch.randn(4, 4)} for t in tasks.values()}
    hashes = {"base": state_dict_hash(base), **{n: state_dict_hash(sd) for n, sd in finetuned.items()}}
    refs = {n: ray.put(to_numpy(sd)) for n, sd in {"base": base, **finetuned}.items()}
    handles = [ray.remote(CannedActor).options(num_cpus=0).remote(i) for i in range(2)]
    pool = canned_pool(exp.resources, handles)
    for name, task in tasks.items():
        pool.add_head(name, task.heads["test"])
        for split, ds in task.sets.items():
            pool.add_dataset(f"{name}/{split}", ds)
    run = Run(exp, base, finetuned, tasks, pool, LogitCache(out / "cache"), ResultStore(out / "results"),
              model_hashes=hashes, model_refs=refs)
    # DaWin's diagnostics would warn about the canned logits (their entropies track no loss): not news about a model
    quiet = logging.getLogger("raymerge")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        cfg = exp.sweep
        plan = subsets(list(tasks), cfg.min_size, cfg.max_size)
        chosen = set(pick(plan))
        warm = next(s for s in plan if s not in chosen)
        for s in plan:  # the other subsets count as stored, as in a resumed sweep
            if s not in chosen and s != warm:
                for unit, params, c, p in sweep_candidates(run, s, cfg.methods):
                    run.done.update(run.keys(unit, params, c, p, label(unit.name)))
        # DaWin's phase 1 runs once per (model, task) over the whole sweep (the logit cache keeps it): done here first,
        # so that the sampled candidates see what almost every candidate of the full sweep sees, cache hits
        progress(f"sweep driver: DaWin's phase 1 for every (model, task) pair ({len(tasks) ** 2} pairs × test and "
                 "validation), canned logits")
        start = time.process_time()
        for t in tasks:
            for model in (task.finetuned for task in tasks.values()):
                phase1(run, [Recipe.model(model)], [(t, "test")], {t: (t, "validation")})
        phase1_s = time.process_time() - start
        # one subset's candidates first, untimed: the first calls pay one-off costs (imports, the first Parquet write)
        for unit, params, c, p in sweep_candidates(run, warm, cfg.methods):
            run.evaluate(unit, params, c, p, label(unit.name))
        run.flush()

        cpu: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        beside: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        # the results store writes a candidate's rows on the run's writer thread while the next one is evaluated:
        # that CPU is counted for the candidate whose rows it wrote, apart from the loop's own (its critical path)
        written: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        clock: list[int] = []  # the writer thread's CPU clock, once it has run
        evaluate, prefetch, submit = run.evaluate, run.prefetch_candidate, run.submit_ahead
        diagnose = dawin_pipeline.diagnostics.diagnose
        append = run.store.append

        def writer_s() -> float:
            """The writer thread's CPU seconds so far, read from any thread: what of a window it ran in."""
            return time.clock_gettime(clock[0]) if clock else 0.0

        def timed_append(rows, samples=None, replace=False):
            if not clock:
                clock.append(time.pthread_getcpuclockid(threading.get_ident()))
            start = time.thread_time()
            try:
                return append(rows, samples=samples, replace=replace)
            finally:
                key = (rows[0]["method"].removeprefix("sweep/"), tuple(rows[0]["params"]["subset"]))
                written[key] += time.thread_time() - start
        # DaWin's diagnostics run as central Ray tasks, off the driver: each appends its CPU seconds here
        diagnosed = out / "diagnostics-seconds.txt"

        def diagnosed_s() -> float:
            return sum(map(float, diagnosed.read_text().split())) if diagnosed.exists() else 0.0

        def timed(fn):
            def wrapper(unit, params, cand, p, lbl=None, **kwargs):
                start, before, wrote = time.process_time(), diagnosed_s(), writer_s()
                try:
                    return fn(unit, params, cand, p, lbl, **kwargs)
                finally:
                    key = (unit.name, tuple(cand.params["subset"]))
                    cpu[key] += time.process_time() - start - (writer_s() - wrote)
                    beside[key] += diagnosed_s() - before
            return wrapper

        def timed_diagnose(*args, **kwargs):  # pickled by value into the Ray task, ``diagnosed`` with it
            start = time.process_time()
            try:
                return diagnose(*args, **kwargs)
            finally:
                with open(diagnosed, "a") as f:
                    f.write(f"{time.process_time() - start}\n")

        run.evaluate, run.prefetch_candidate, run.submit_ahead = timed(evaluate), timed(prefetch), timed(submit)
        run.store.append = timed_append
        dawin_pipeline.diagnostics.diagnose = timed_diagnose
        progress(f"sweep driver: sweep_run over {len(chosen)} of {len(plan)} subsets, {actors} canned actors, batch "
                 f"{batch}")
        start = time.process_time()
        wrote = writer_s()
        sweep_run(run)
        total = time.process_time() - start - (writer_s() - wrote)
    finally:
        dawin_pipeline.diagnostics.diagnose = diagnose
        quiet.setLevel(level)
        for h in handles:
            ray.kill(h)
    evaluated = [(m, s, c + written[(m, s)], beside[(m, s)], c) for (m, s), c in cpu.items() if s in chosen]
    return {"candidates": evaluated, "planning": total - sum(cpu.values()), "phase1": phase1_s,
            "plan_candidates": len(plan) * len(cfg.methods), "sample": len(chosen), "plan": len(plan)}
