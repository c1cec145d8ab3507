"""The driver: loads and checks an experiment, plans evaluations, runs them on the worker pool, writes results.

Phases (each logged with its time):
1. load: checkpoints, heads and datasets are read and checked against each other before any model runs;
2. start: Ray actors are started and each receives its shard of every dataset and every head;
3. methods: each method turns the pool into *candidates* (a weight set plus the tasks it is judged on, or, for
   output-space methods, logits of other candidates); weights are put in the object store once and every
   actor evaluates its shard;
4. write: one row per (candidate, task, split) in the results store, per-sample outputs beside it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from raymerge import dawin as dawin_math
from raymerge import methods, models
from raymerge._io import default_cache_dir
from raymerge.cache import LogitCache
from raymerge.config import Experiment, MethodConfigs, TaskSpec, ZeroShotHead
from raymerge.data import DatasetError, ImageDataset, load_dataset
from raymerge.methods import Candidate, Method, Params, Pool, Prediction, Recipe
from raymerge.results import ResultsError, ResultStore, row_key
from raymerge.statedict import StateDict, check_compatible, numpy_views, state_dict_hash, to_numpy
from raymerge.cluster import connect
from raymerge.dawin_pipeline import CENTRAL_CPUS
from raymerge.errors import InputError
from raymerge.workers import MERGE_CPUS, Pending, Reduce, Request, WorkerPool

log = logging.getLogger("raymerge")

Pair = tuple[str, str]  # (task, split)


@dataclass
class LoadedTask:
    """A task's data as evaluated: each set (split or shift name -> dataset; "validation" included when given), the
    head each set is scored with (the task's head, or its rows for the set's class subset) and their hashes."""

    name: str
    sets: dict[str, ImageDataset]
    heads: dict[str, models.Head]
    head_hashes: dict[str, str]
    finetuned: str | None

    def head_name(self, split: str) -> str:
        """The name the worker pool knows ``split``'s head by: shared by the sets scored on the whole head."""
        return self.name if self.head_hashes[split] == self.head_hashes.get("*") else f"{self.name}/{split}"


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log the start and the wall time of a phase of the job."""
    log.info("phase %s: start", name)
    start = time.perf_counter()
    yield
    log.info("phase %s: done in %.1f s", name, time.perf_counter() - start)


def _head(exp: Experiment, spec: TaskSpec) -> models.Head:
    if isinstance(spec.head, ZeroShotHead):
        from raymerge import heads

        return heads.zero_shot_head(exp.architecture, spec.head.weights or exp.base, spec.head.classes,
                                    spec.head.templates)
    return models.load_head(spec.head)


def scored_on(head: models.Head, ds: ImageDataset, classes: Sequence[str | int] | None, head_source: str
              ) -> tuple[models.Head, ImageDataset]:
    """The head ``ds`` is scored with and ``ds`` with labels indexing it.

    The head, or with ``classes`` its rows for those classes (:meth:`Head.subset`). ``ds``'s labels are matched to
    the head's classes by name wherever ``ds`` names them (an image folder sorts its class directories, which need
    not be the head's order: EuroSAT, Cars, GTSRB), and kept as positions only when ``ds`` names none of them and has
    exactly as many classes; a partial overlap is an error naming the classes the head lacks."""
    scored = head if classes is None else head.subset(classes, head_source)
    position = {name: i for i, name in enumerate(scored.class_names)}
    if set(ds.class_names) <= set(position):
        mapping = np.array([position[name] for name in ds.class_names], dtype=np.int64)
    elif len(ds.class_names) == scored.num_classes and not set(ds.class_names) & set(position):
        mapping = np.arange(scored.num_classes)
    else:
        unknown = sorted(set(ds.class_names) - set(position))
        hint = "" if classes is not None else "; restrict the head with `classes:` if the set covers a subset"
        raise DatasetError(f"dataset {ds.source}: classes {unknown[:10]} are not among the {scored.num_classes} "
                           f"classes of head {head_source} it is scored on{hint}")
    ds.check_labels(len(ds.class_names), ds.source)
    return scored, ds.relabel(mapping[ds.labels], scored.class_names)


def load_experiment_inputs(exp: Experiment) -> tuple[StateDict, dict[str, StateDict], dict[str, LoadedTask]]:
    """Read every checkpoint, head and dataset and check them against each other; no model runs yet.

    Every problem is collected and reported together, as one :class:`InputError` naming each file."""
    problems: list[str] = []

    def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            problems.append(str(err))
            return None

    base = attempt(models.load_encoder_weights, exp.architecture, exp.base, projection_from=exp.projection_from)
    finetuned = {name: attempt(models.load_encoder_weights, exp.architecture, p,
                               projection_from=exp.projection_from or exp.base) for name, p in exp.finetuned.items()}
    if not problems:
        attempt(check_compatible, [base, *finetuned.values()], [str(exp.base), *map(str, exp.finetuned.values())])
    tasks = {}
    for name, spec in exp.tasks.items():
        head = attempt(_head, exp, spec)
        source = str(spec.head) if isinstance(spec.head, Path) else f"task_pool.{name}.head (zero-shot)"
        if head is not None:
            attempt(models.check_head, head, exp.architecture, source)
        paths = {**spec.eval_sets(), **({"validation": spec.validation} if spec.validation else {})}
        loaded = {split: attempt(load_dataset, path, f"{name}/{split}") for split, path in paths.items()}
        if head is None:
            continue
        sets, heads = {}, {}
        for split, ds in loaded.items():
            scored = None if ds is None else attempt(scored_on, head, ds, spec.classes.get(split), source)
            if scored is not None:
                heads[split], sets[split] = scored
        hashes = {split: h.hash for split, h in heads.items()}
        tasks[name] = LoadedTask(name, sets, heads, {"*": head.hash, **hashes}, spec.finetuned)
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the experiment's inputs:\n" + "\n".join(f"  - {p}" for p in problems))
    return base, finetuned, tasks


@cache
def _central_task(fn: Callable[..., Any]) -> Any:
    """``fn`` as a Ray remote function, made once per function: each one made anew is pickled and exported again."""
    return ray.remote(fn).options(num_cpus=CENTRAL_CPUS)


class Uncached(Exception):
    """An output that :meth:`Run.cached_only` forbids computing: it is not in the logit cache."""


@dataclass
class Run:
    """One experiment being run: inputs, the worker pool, the logit cache and the results store.

    It is the :class:`raymerge.methods.Evaluator` the method units and DaWin's phases evaluate through.
    """

    exp: Experiment
    base: StateDict
    finetuned: dict[str, StateDict]
    tasks: dict[str, LoadedTask]
    pool: WorkerPool
    cache: LogitCache
    store: ResultStore
    force: bool = False
    model_hashes: dict[str, str] = field(default_factory=dict)
    model_refs: dict[str, ray.ObjectRef] = field(default_factory=dict)
    skipped: int = 0
    evaluated: int = 0
    done: set[str] = field(default_factory=set)
    planned: set[str] = field(default_factory=set)  # every row key this run evaluated or found stored
    evaluations_ahead: int = 1  # static candidates whose evaluation queues on the actors behind the one in flight
    # one writer thread: a candidate's rows are written while the next one is evaluated (Parquet releases the GIL)
    _writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "raymerge-results"),
                                        init=False, repr=False)
    _writing: Future | None = field(default=None, init=False, repr=False)
    _loops: int = field(default=0, init=False, repr=False)  # evaluating() blocks entered: rows written behind them
    # predict candidates whose ``ahead`` was asked, by id: the keys of the merges it started and its seconds
    _ahead: dict[int, tuple[Candidate, list[str], float]] = field(default_factory=dict, init=False, repr=False)
    _cached_only: bool = field(default=False, init=False, repr=False)  # inside cached_only()
    # evaluations submitted before their turn (:meth:`submit_ahead`), by the cache entry they fill: its pending
    # parts on the actors and its output's shape
    _submitted: dict[tuple[str, ...], tuple[Pending, tuple[int, int, type]]] = field(
        default_factory=dict, init=False, repr=False)
    # adapting candidates looked at by adapt_ahead, by id: the candidate (held, so that its id stays its own) and its
    # build running on a thread of _adapter, or None where its rows were all stored
    _adapting: dict[int, tuple[Candidate, Future | None]] = field(default_factory=dict, init=False, repr=False)
    _adapter: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    # --- weights: recipes built off the driver -------------------------------------------------------------------

    def prefetch(self, recipe: Recipe) -> str:
        """Start making ``recipe``'s weights where :attr:`Resources.merge_on` says (a Ray task, or each actor when
        it evaluates them) and return their key; a pool model as it is needs nothing made. Idempotent."""
        key = recipe.key(self.model_hashes)
        if key not in self.pool.registered:
            name = recipe.single_model
            if name is not None:
                made: Any = self.model_refs[name]
            else:
                made = self.pool.build(recipe, {m: self.model_refs[m] for m in recipe.models()})
            self.pool.put_built(key, made)
        return key

    def prefetch_candidate(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str) -> bool:
        """Start making ``cand``'s merge ahead of its evaluation, unless none is needed: every row stored, or every
        pending row's scores cached. Whether a merge was started (or already had been). A predict candidate's
        merges are those its ``ahead`` lists (DaWin's first phase-2 batch), asked for once."""
        if cand.recipe is None:
            if cand.ahead is None:
                return False
            if id(cand) not in self._ahead:  # the candidate held, so that its id stays its own
                self._ahead[id(cand)] = (cand, *self._make_ahead(unit, params, cand, pool, label))
            return bool(self._ahead[id(cand)][1])
        key = cand.recipe.key(self.model_hashes)
        if key in self.pool.registered:  # a sweep asks again at each step while the candidate is in its window
            return True
        pending = self.pending(unit, params, cand, pool, label)
        if any(not self.cache.has(*self._cache_parts(key, pair, Reduce(self.labels(pair)))) for pair in pending):
            self.prefetch(cand.recipe)
            return True
        return False

    def _make_ahead(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str
                    ) -> tuple[list[str], float]:
        """Start the merges ``cand.ahead`` lists for its pending rows: their keys, and the seconds it took (the
        candidate's own work, done early, which its rows count)."""
        start = time.perf_counter()
        pending = list(self.pending(unit, params, cand, pool, label))
        keys: list[str] = []
        try:
            with self.cached_only():
                made = cand.ahead(pending) if pending else []
            for weights in made:
                keys.append(self._register(self._numpy(weights)))
        except Uncached:  # what is not cached is the evaluation's to compute, in its turn, on idle actors
            pass
        except Exception:  # a head start only: its evaluation meets the same error, under its own name
            log.debug("%s: making its merges ahead failed; left to its evaluation", unit.name, exc_info=True)
        return keys, time.perf_counter() - start

    @contextmanager
    def cached_only(self) -> Iterator[None]:
        """Within it, an output not in the logit cache raises :class:`Uncached` instead of being computed: work
        done ahead, in the sweep loop, must not hold it up with evaluations (they would also compete with the
        merges just started for the CPUs)."""
        outer, self._cached_only = self._cached_only, True
        try:
            yield
        finally:
            self._cached_only = outer

    def _cache_parts(self, key: str, pair: Pair, reduce: Reduce | None = None) -> tuple[str, ...]:
        """What a cache entry is keyed by: the weights (or recipe), the head, the data, the evaluation, and what
        the logits were reduced to (the score columns and their temperature)."""
        t = self.tasks[pair[0]]
        parts = (self.exp.architecture, key, t.head_hashes[pair[1]], t.sets[pair[1]].hash,
                 str(self.pool.resources.batch_size), self.pool.precision)
        if reduce is None:
            return parts
        return (*parts, "scores:" + ",".join(dawin_math.SCORE_COLUMNS), float(reduce.temperature).hex())

    def _register(self, weights: Recipe | Mapping[str, np.ndarray]) -> str:
        return self.prefetch(weights) if isinstance(weights, Recipe) else self.pool.put_weights(weights)

    def _keyed(self, weights: Recipe | Mapping[str, Any]) -> tuple[Recipe | Mapping[str, np.ndarray], str]:
        """``weights`` as the store holds them, and the key that names them (a recipe's without building it)."""
        weights = self._numpy(weights)
        return weights, weights.key(self.model_hashes) if isinstance(weights, Recipe) else state_dict_hash(weights)

    @staticmethod
    def _numpy(weights: Recipe | Mapping[str, Any]) -> Recipe | Mapping[str, np.ndarray]:
        """Weight sets as numpy (what the object store holds and keys hash), recipes as they are."""
        if isinstance(weights, Recipe) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
            return weights
        return to_numpy(weights)

    # --- the Evaluator protocol ---------------------------------------------------------------------------------

    def logits(self, weights: Recipe | Mapping[str, Any], pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        """(N, C) logits of ``weights`` (a recipe, or a weight set) on each (task, split), from the cache or the
        pool (all shards at once). A recipe is keyed without being built, so cached outputs cost no merge."""
        return self._outputs(weights, pairs, lambda pair: None)

    def predictions(self, weights: Recipe | Mapping[str, Any], pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        """(N,) int64 predicted classes like :meth:`logits`, the argmax taken on the actors: from the cached
        :meth:`scores` at temperature 1, which DaWin reads its static reference from."""
        return {p: dawin_math.score_predictions(s) for p, s in self.scores(weights, pairs).items()}

    def temperature(self, weights: Recipe | Mapping[str, Any], pair: Pair) -> float:
        """:func:`raymerge.dawin.fit_temperature` on the logits of ``weights`` on ``pair``, kept in the cache beside
        them: a sweep asks for the same (model, validation split) once per candidate."""
        weights, key = self._keyed(weights)
        fit = (*dawin_math.TEMPERATURE_BOUNDS, dawin_math.TEMPERATURE_XATOL)
        parts = (*self._cache_parts(key, pair), "temperature", *(float(b).hex() for b in fit))
        cached = self.cache.get(*parts)
        if cached is None:
            cached = np.array([dawin_math.fit_temperature(self.logits(weights, [pair])[pair], self.labels(pair))])
            self.cache.put(cached, *parts)
        return float(cached[0])

    def scores(self, weights: Recipe | Mapping[str, Any], pairs: list[Pair],
               temperatures: Mapping[str, float] | None = None) -> dict[Pair, np.ndarray]:
        """(N, 4) per-sample scores (:func:`raymerge.dawin.sample_scores`) like :meth:`logits`, computed on the
        actors at each task's temperature (default 1)."""
        return self._outputs(weights, pairs, lambda pair: Reduce(self.labels(pair), (temperatures or {}).get(pair[0], 1.0)))

    def _outputs(self, weights: Recipe | Mapping[str, Any], pairs: list[Pair],
                 reduce_for: Callable[[Pair], Reduce | None]) -> dict[Pair, np.ndarray]:
        """Logits, or their reduction ``reduce_for(pair)``, of ``weights`` on ``pairs``, cached under what
        determines them."""
        weights, key = self._keyed(weights)
        out, missing = {}, {}
        for pair in pairs:
            reduce = reduce_for(pair)
            parts = self._cache_parts(key, pair, reduce)
            cached = self.cache.get(*parts)
            if cached is None:
                missing[pair] = (parts, reduce)
            else:
                out[pair] = cached
                self._submitted.pop(parts, None)  # cached since it was submitted (another run sharing the cache)
        if missing:
            if self._cached_only:
                raise Uncached(f"{len(missing)} output(s) of {key} not cached, first on {'/'.join(next(iter(missing)))}")
            fresh = [(pair, reduce) for pair, (parts, reduce) in missing.items() if parts not in self._submitted]
            submitted: Iterator[tuple[Pending, tuple[int, int, type]]] = iter(())
            if fresh:
                registered = self._register(weights)
                submitted = iter(self._submit([(registered, pair, None, reduce) for pair, reduce in fresh]))
            got = self._gather([self._submitted.pop(parts) if parts in self._submitted else next(submitted)
                                for parts, _ in missing.values()])
            for (pair, (parts, _)), value in zip(missing.items(), got):
                out[pair] = value
                self.cache.put(value, *parts)
        self.pool.drop_weights(key)
        return out

    def submit_ahead(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str,
                     only_ready: bool = False) -> bool:
        """Submit the evaluations a static candidate's pending rows need now, before its turn: each actor queues
        them behind the calls already submitted and starts on them as soon as it is done with those, while the
        driver is still busy with the candidate before (its rows, DaWin's coefficients). :meth:`evaluate` then
        gathers them. Outputs already cached or submitted are not asked again. Whether nothing of it is left to
        submit; a candidate that is not a recipe (DaWin, the output-space methods) submits in its own turn.

        ``only_ready``: not while its merge is still being made (the merge is started). An actor runs its calls
        in the order they were submitted, so a call waiting for its weights would hold up every call queued
        behind it (the current candidate's DaWin phases, say) for the whole build."""
        if cand.recipe is None or cand.predict is not None:
            return False
        key = cand.recipe.key(self.model_hashes)
        todo = []
        for pair in self.pending(unit, params, cand, pool, label):
            reduce = Reduce(self.labels(pair))
            parts = self._cache_parts(key, pair, reduce)
            if parts not in self._submitted and not self.cache.has(*parts):
                todo.append((parts, pair, reduce))
        if todo:
            registered = self.prefetch(cand.recipe)
            if only_ready and not self.pool.ready(registered):
                return False
            sent = self._submit([(registered, pair, None, reduce) for _, pair, reduce in todo])
            self._submitted.update(zip((parts for parts, _, _ in todo), sent))
        return True

    def adapt_ahead(self, items: Sequence[tuple[Method, Params, Candidate, Pool, str]], i: int) -> None:
        """At the turn of a test-time adaptation (``Candidate.adapts``) ``items[i]``: start it and the next
        adaptations after it whose rows are not all stored, in order, each on a thread of its own (and so on an actor
        of its own: :meth:`WorkerPool.adapt`), while fewer than ``resources.adaptations_in_flight`` (at most one per
        actor) are started and not yet evaluated. An actor runs its calls in order, so while one adapts, the
        evaluations queued behind wait for it: the rows evaluated meanwhile count its time in their ``seconds``."""
        if not items[i][2].adapts:
            return
        limit = min(self.exp.resources.adaptations_in_flight, len(self.pool.actors))
        started = sum(future is not None for _, future in self._adapting.values())
        for unit, params, cand, pool, label in items[i:]:
            if started >= limit:
                return
            if cand.adapts and id(cand) not in self._adapting:
                future = None
                if self.pending(unit, params, cand, pool, label):
                    if self._adapter is None:
                        self._adapter = ThreadPoolExecutor(limit, "raymerge-adapt")
                    future, started = self._adapter.submit(_timed, cand.build), started + 1
                self._adapting[id(cand)] = (cand, future)

    def _built(self, cand: Candidate) -> tuple[StateDict | Recipe, float]:
        """``cand``'s weights from its build, and the seconds of that build that ran before its turn: started ahead
        (:meth:`adapt_ahead`), or built now."""
        _, future = self._adapting.pop(id(cand), (cand, None))
        if future is None:
            return cand.build(), 0.0
        waited = time.perf_counter()
        weights, seconds = future.result()
        return weights, seconds - (time.perf_counter() - waited)

    def queue(self, items: Sequence[tuple[Method, Params, Candidate, Pool, str]], i: int) -> None:
        """Before ``items[i]`` is evaluated: submit its evaluation, then those of the :attr:`evaluations_ahead`
        items after it, each queued on the actors behind the one before, up to the first that is not a recipe or
        whose merge is still being made (none overtakes another on the actors)."""
        for j, item in enumerate(items[i:i + self.evaluations_ahead + 1]):
            if not self.submit_ahead(*item, only_ready=j > 0) and j > 0:
                break

    def _submit(self, requests: Sequence[tuple[str, Pair, np.ndarray | None, Reduce | None]]
                ) -> list[tuple[Pending, tuple[int, int, type]]]:
        """Per (weights key, pair, global rows or None, reduce): its parts submitted to the actors, every request
        at once, and the shape of its (N, width) output over the whole set."""
        shapes, sent = [], []
        for key, pair, rows, reduce in requests:
            t = self.tasks[pair[0]]
            n = len(t.sets[pair[1]])
            shapes.append((n, t.heads[pair[1]].num_classes, np.float32) if reduce is None else
                          (n, reduce.width, np.float64))
            sent.append(Request(key, t.head_name(pair[1]), "/".join(pair), rows, reduce))
        return list(zip(self.pool.submit(sent), shapes))

    def _gather(self, submitted: Sequence[tuple[Pending, tuple[int, int, type]]]) -> list[np.ndarray]:
        """The outputs of :meth:`_submit`'s requests (rows not asked for are NaN), gathered in one round."""
        return self.pool.gather([pending for pending, _ in submitted], [shape for _, shape in submitted])

    def _evaluate(self, requests: Sequence[tuple[str, Pair, np.ndarray | None, Reduce | None]]) -> list[np.ndarray]:
        """Per (weights key, pair, global rows or None, reduce): the (N, width) outputs over the whole set (rows not
        asked for are NaN), every request submitted at once and gathered in one round."""
        return self._gather(self._submit(requests))

    def scores_rows(self, assignments: Sequence[tuple[Recipe | Mapping[str, Any], Pair, np.ndarray]]
                    ) -> list[np.ndarray]:
        """Phase 2 of DaWin: every (weights, pair, rows) assignment at once, each actor scoring its rows only; the
        merges all start (Ray tasks side by side) before any evaluation is waited for."""
        keys = [self._register(self._numpy(weights)) for weights, _, _ in assignments]
        got = self._evaluate([(key, pair, rows, Reduce(self.labels(pair)))
                              for key, (_, pair, rows) in zip(keys, assignments)])
        out = [value[rows] for value, (_, _, rows) in zip(got, assignments)]
        for key in keys:
            self.pool.drop_weights(key)
        return out

    def central(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Central statistics (a mixture fit, DaWin's diagnostics) as one Ray task beside the actors."""
        return _central_task(fn).remote(*args).future()

    def labels(self, pair: Pair) -> np.ndarray:
        return self.tasks[pair[0]].sets[pair[1]].labels

    def adapt(self, merge: Any, tasks: Sequence[str], settings: Any, seed: int) -> Any:
        """Test-time adaptation on one actor, on each task's whole test split (unlabeled)."""
        label = f"adapting {len(tasks)} tasks ({', '.join(tasks)})"
        with phase(label):
            return self.pool.adapt(merge, {self.tasks[t].head_name("test"): self.tasks[t].sets["test"] for t in tasks},
                                   settings, seed, label)

    # --- pools, keys and rows ----------------------------------------------------------------------------------

    def view(self, models: list[str] | None = None, tasks: list[str] | None = None) -> Pool:
        """The :class:`Pool` a method runs on: every fine-tuned model and task, or a sweep's subset."""
        names = list(self.finetuned) if models is None else models
        tasks = list(self.tasks) if tasks is None else tasks
        return Pool(
            setting=self.exp.setting, seed=self.exp.seed, base=self.base,
            finetuned={n: self.finetuned[n] for n in names}, tasks=tasks,
            splits={t: [s for s in self.tasks[t].sets if s != "validation"] for t in tasks},
            validation={t: "validation" in self.tasks[t].sets for t in tasks},
            task_models={t: self.tasks[t].finetuned for t in tasks}, evaluator=self,
            max_in_flight=self.exp.resources.max_merges_in_flight,
        )

    def identity(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str, pair: Pair) -> dict[str, Any]:
        """Everything that determines the row of ``cand`` on ``pair``: what its key hashes."""
        task, split = pair
        reads = unit.reads_for(params)
        data = {pair, *((task, s) for s in reads.own if s in self.tasks[task].sets),
                *((t, s) for t in pool.tasks for s in reads.every_task if s in self.tasks[t].sets)}
        models = cand.models if cand.models is not None else ["base", *pool.names]
        return {
            "method": label,
            "params": cand.params,
            "seed": self.exp.seed if unit.is_random(params, pool.setting) else None,
            "architecture": self.exp.architecture,
            "models": {m: self.model_hashes[m] for m in models},
            "task": task,
            "split": split,
            "data": {f"{t}/{s}": self.tasks[t].sets[s].hash for t, s in sorted(data)},
            "heads": {f"{t}/{s}": self.tasks[t].head_hashes[s] for t, s in sorted(data)},
            "evaluation": {"batch_size": self.pool.resources.batch_size, "precision": self.pool.precision},
        }

    def _rows(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str
              ) -> dict[Pair, tuple[str, dict[str, Any]]]:
        """(row key, identity) of each (task, split) ``cand`` is judged on."""
        rows = {}
        for pair in pool.eval_pairs(cand.tasks):
            identity = self.identity(unit, params, cand, pool, label, pair)
            rows[pair] = (row_key(identity), identity)
        return rows

    def keys(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str) -> list[str]:
        """The row keys of ``cand``, one per (task, split) it is judged on."""
        return [key for key, _ in self._rows(unit, params, cand, pool, label).values()]

    def pending(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str) -> dict[Pair, dict[str, Any]]:
        """The identities of the rows of ``cand`` still to compute: those not stored yet, or all under ``--force``."""
        return self._pending(self._rows(unit, params, cand, pool, label))

    def _pending(self, rows: Mapping[Pair, tuple[str, dict[str, Any]]]) -> dict[Pair, dict[str, Any]]:
        return {pair: i for pair, (key, i) in rows.items() if self.force or key not in self.done}

    def evaluate(self, unit: Method, params: Params, cand: Candidate, pool: Pool, label: str | None = None) -> None:
        """Evaluate ``cand`` on the pairs whose rows are not stored (all of them under ``--force``). Rows are
        independent per pair, so a changed test set recomputes its own rows only."""
        label = label or unit.name
        _, made_ahead, ahead_s = self._ahead.pop(id(cand), (cand, [], 0.0))
        if self._writing is not None and self._writing.done():
            self.flush()  # a write that failed stops the run before another evaluation, not after it
        judged = self._rows(unit, params, cand, pool, label)
        self.planned.update(key for key, _ in judged.values())
        identities = self._pending(judged)
        self.skipped += len(judged) - len(identities)
        if not identities:  # made ahead for nothing (an identical configuration stored these rows)
            self._adapting.pop(id(cand), None)  # an adaptation started ahead finishes on its thread, unused
            for key in made_ahead if cand.recipe is None else [cand.recipe.key(self.model_hashes)]:
                self.pool.drop_weights(key)
                for parts in [parts for parts in self._submitted if parts[1] == key]:
                    del self._submitted[parts]
            return
        keys = {pair: judged[pair][0] for pair in identities}
        pairs = list(identities)
        start = time.perf_counter()
        if cand.predict is not None:
            try:
                outcome = cand.predict(pairs)
            finally:
                for key in made_ahead:  # its evaluation dropped those it reached
                    self.pool.drop_weights(key)
        else:
            weights, built_s = (cand.recipe, 0.0) if cand.recipe is not None else self._built(cand)
            ahead_s += built_s
            outcome = Prediction(self.predictions(weights, pairs), merges=dict.fromkeys(pairs, cand.merges))
        seconds = time.perf_counter() - start + ahead_s
        rows, samples = [], {}
        for pair in pairs:
            labels = self.labels(pair)
            pred = outcome.outputs[pair]
            if pred.shape != labels.shape:
                raise ValueError(f"method {unit.name} handed over outputs of shape {pred.shape} for {pair[0]}/{pair[1]}, "
                                 f"which has {len(labels)} samples: a Prediction holds predicted classes (N,)")
            samples[keys[pair]] = {"prediction": pred, "label": labels, **outcome.extras.get(pair, {})}
            rows.append({
                "key": keys[pair], "experiment": self.exp.name, "method": label, "params": cand.params,
                "pool": hashlib.sha256(json.dumps(identities[pair]["models"], sort_keys=True).encode()).hexdigest()[:24],
                "task": pair[0], "split": pair[1], "accuracy": float(np.mean(pred == labels)), "n": int(len(labels)),
                "seconds": seconds, "merges": int(outcome.merges.get(pair, 0)),
                "details": json.dumps(cand.details, sort_keys=True, default=str),
                "identity": json.dumps(identities[pair], sort_keys=True, default=str),
            })
            self.done.add(keys[pair])
        # the store writes each samples file under a fresh name and names it in its row; --force supersedes.
        # Inside evaluating(), one write in flight beside the next candidate; a lone call writes before returning
        self.flush()
        if self._loops:
            self._writing = self._writer.submit(self.store.append, rows, samples=samples, replace=self.force)
        else:
            self.store.append(rows, samples=samples, replace=self.force)
        self.evaluated += len(rows)

    def close(self) -> None:
        """End the run: adaptations not yet started never start (those running end with the actors), then the
        worker pool's actors are stopped."""
        if self._adapter is not None:
            self._adapter.shutdown(wait=False, cancel_futures=True)
        self._adapting.clear()
        self.pool.shutdown()

    def flush(self) -> None:
        """Wait until the rows :meth:`evaluate` handed to the writer thread are in the store; raise its error."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around a loop of :meth:`evaluate` calls, whose rows it writes on the writer thread while the next
        candidate is evaluated; every row is in the store when it ends, also on an error.

        What is alive when it starts (inputs, Ray, torch, the plan) lives through the loop, so it is frozen out of
        the cyclic collector's full passes, which otherwise rescan every tracked object: ~0.25 s of driver CPU at
        the half million objects of a sweep's driver, every few candidates. Only the outermost block freezes, and
        only when nothing else has: the freeze is the whole process's."""
        freeze = self._loops == 0 and gc.get_freeze_count() == 0
        if freeze:
            gc.collect()  # cycles that are garbage already would otherwise stay frozen in memory for the loop
            gc.freeze()
        self._loops += 1
        try:
            yield
        except BaseException:
            try:
                self.flush()
            except Exception:  # the loop's own error is the one to report; this one is logged beside it
                log.exception("writing the last results rows failed as well")
            raise
        else:
            self.flush()
        finally:
            self._loops -= 1
            if freeze:
                gc.unfreeze()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def _probe_writable(directory: Path) -> None:
    """Raise OSError unless ``directory`` can be written, without creating it: bad input leaves nothing behind."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if existing != directory:
        # the directory will be made under its nearest existing ancestor, which must take new entries
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OSError(f"{existing} does not take new entries")
        return
    probe = directory / f".raymerge-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def start_run(exp: Experiment, force: bool = False, cache_dir: Path | None = None, address: str | None = None,
              subsets: Sequence[Sequence[str]] = ()) -> Run:
    """Load and check every input, then (and only then) join Ray and start the worker pool, its test sets sharded
    so that the sets evaluated together (each of ``subsets``, lists of task names, or else all tasks at once) keep
    every actor about equally busy."""
    store = ResultStore(exp.output_dir)
    problems = []
    try:
        store.check()  # a corrupt or older-format results directory is refused before anything is started
        _probe_writable(exp.output_dir)
    except ResultsError as err:
        problems.append(str(err))
    except OSError as err:
        problems.append(f"output_dir {exp.output_dir} cannot be written: {err.strerror or err}")
    try:
        with phase("load"):
            base, finetuned, tasks = load_experiment_inputs(exp)
    except InputError as err:
        problems.append(str(err))
    if problems:
        raise InputError("\n".join(problems))
    local = connect(address)
    hashes = {"base": state_dict_hash(base), **{n: state_dict_hash(sd) for n, sd in finetuned.items()}}
    # the pool models go into the object store once, where merge tasks and actors read them; the driver keeps
    # zero-copy views of them instead of its own copies, each dropped as soon as it is stored (peak: one extra model)
    models_ = {"base": base, **finetuned}
    del base, finetuned
    refs = {}
    for name in list(models_):
        refs[name] = ray.put(to_numpy(models_[name]))
        models_[name] = numpy_views(ray.get(refs[name]))
    base, finetuned = models_.pop("base"), models_
    with phase("start workers"):
        configs = {**exp.methods, **(exp.sweep.methods if exp.sweep else {})}
        # Ray tasks beside the actors (merges, SVD jobs, mixture fits) must find CPUs the actors do not hold, or
        # they would wait forever: the resource check refuses such a request up front
        merges = MERGE_CPUS if exp.resources.merge_on == "task" else 0.0
        task_cpus = max([merges, *(methods.get(name).task_cpus for name in configs)])
        pool = WorkerPool(exp.architecture, exp.resources, cpu_fallback=local, task_cpus=task_cpus)
        for name, task in tasks.items():
            for split in task.sets:
                pool.add_head(task.head_name(split), task.heads[split])
        together = [[f"{t}/{split}" for t in subset for split in tasks[t].sets if split != "validation"]
                    for subset in subsets or [list(tasks)]]
        pool.add_datasets({f"{name}/{split}": ds for name, task in tasks.items() for split, ds in task.sets.items()},
                          together)
        pool.prepare()
    cache = LogitCache((cache_dir or default_cache_dir()) / "logits", bypass_reads=force)
    return Run(exp, base, finetuned, tasks, pool, cache, store, force=force, model_hashes=hashes, model_refs=refs,
               done=set() if force else store.keys())


def run_methods(run: Run, configs: MethodConfigs) -> None:
    """Evaluate every configuration of every method in ``configs`` on the whole experiment's pool."""
    pool = run.view()
    # every configuration's candidates first, so that test-time adaptations can start ahead of their turn
    lists = {name: [[(methods.get(name), params, c, pool, name) for c in methods.get(name).candidates(pool, params)]
                    for params in params_list] for name, params_list in configs.items()}
    everything = [item for per_params in lists.values() for candidates in per_params for item in candidates]
    at = 0
    with run.evaluating():
        for name, per_params in lists.items():
            with phase(f"method {name}"):
                for candidates in per_params:
                    for i, item in enumerate(tqdm(candidates, desc=name, unit="model", leave=False)):
                        run.adapt_ahead(everything, at)
                        run.queue(candidates, i)
                        run.evaluate(*item)
                        at += 1


def run_experiment(exp: Experiment, force: bool = False, cache_dir: Path | None = None, address: str | None = None) -> ResultStore:
    """Run every method of ``exp`` and return the results store (rows already present are skipped).

    All inputs are loaded and checked before Ray is started or joined, so bad input wastes no cluster time.
    """
    run = start_run(exp, force, cache_dir, address)
    try:
        run_methods(run, exp.methods)
        run.store.write_current(exp.name, "eval", run.planned)
    finally:
        run.close()
        run.store.write_summary()
    log.info("%d rows evaluated, %d rows already present skipped (use --force to recompute)", run.evaluated, run.skipped)
    return run.store
