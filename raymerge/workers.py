"""Ray actors and tasks: the one evaluation primitive, and the distributed SVD jobs of the low-rank merges.

An :class:`EvalWorker` keeps one resident encoder, every head, and its shard of every dataset (preprocessed once).
It is told *which weights* (an ObjectRef to a dict of numpy arrays, loaded in place into the resident model)
go with *which samples*; it never knows which merge method it serves. :class:`WorkerPool` is the driver-side
handle that shards datasets across the actors and gathers their outputs back in dataset order: logits, or what
the actors reduce them to (:class:`Reduce`: per-sample entropies, cross-entropy and prediction).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import ray
import torch
from tqdm import tqdm

from raymerge import cluster, dawin, models
from raymerge._arith import check_real
from raymerge.adamerging import AdaptResult, AdaptSettings, DifferentiableMerge
from raymerge.cart import plan_cart
from raymerge.config import Resources
from raymerge.data import DatasetError, ImageDataset, Sharder
from raymerge.iso import plan_iso_c, plan_iso_cts
from raymerge.lowrank import LowRankPlan, LowRankRule, Operand, Output, RuleLike, SvdJob, assemble, run_job
from raymerge.methods.base import Recipe
from raymerge.statedict import numpy_views, state_dict_hash, to_numpy
from raymerge.tsv import plan_tsv_merge

log = logging.getLogger(__name__)

Weights = Mapping[str, np.ndarray]


# a merge task's CPUs: elementwise merges are memory-bound, one core each; several run at once where CPUs are free
MERGE_CPUS = 1.0


@dataclass(frozen=True)
class OnActors:
    """A merge each actor builds itself, on its device, from the pool models it keeps resident: the recipe travels
    instead of dense weights. ``models`` maps the recipe's model names to their object-store references (nested in
    a mapping, so Ray hands the actor the references, not the arrays)."""

    recipe: Recipe
    models: dict[str, ray.ObjectRef]


class Job(NamedTuple):
    """One evaluation an actor call carries: ``index`` picks its weights among the call's weight arguments."""

    weights_key: str
    index: int
    head: str
    head_spec: list
    shard: str
    shard_spec: list
    rows: np.ndarray | None  # local rows of the shard; None: all of it
    reduce: Reduce | None


class Request(NamedTuple):
    """One evaluation the driver asks of the pool: global ``rows`` (None: all) of ``dataset`` under the weights
    registered as ``weights_key`` and head ``head``, reduced by ``reduce`` over the whole dataset."""

    weights_key: str
    head: str
    dataset: str
    rows: np.ndarray | None = None
    reduce: Reduce | None = None


Pending = list[tuple[np.ndarray, ray.ObjectRef, int]]  # per busy actor: its global rows, its call, the job's place


@dataclass(frozen=True, eq=False)  # an ndarray field: identity, not value, comparison
class Reduce:
    """What an actor sends back instead of its (n, C) logits, computed where they are: the (n, 4)
    :func:`raymerge.dawin.sample_scores` (columns :data:`raymerge.dawin.SCORE_COLUMNS`: entropies, cross-entropy,
    prediction) of the rows it evaluates, with their ``labels`` (n,), at ``temperature``. Static candidates need
    only the prediction; the rest costs a float64 log-softmax over the logits after the forward pass, and lets
    DaWin read its static reference from the same cached entry."""

    labels: np.ndarray
    temperature: float = 1.0

    width = len(dawin.SCORE_COLUMNS)

    def rows(self, rows: np.ndarray) -> Reduce:
        """The same reduction for ``rows`` (global indices) of the dataset whose labels this one holds."""
        return Reduce(self.labels[rows], self.temperature)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return dawin.sample_scores(logits, self.labels, self.temperature)


def build_merge(recipe: Recipe, names: list[str], *arrays: Weights) -> dict[str, np.ndarray]:
    """A Ray task: ``recipe`` built from its models (numpy arrays read zero-copy from the object store), as numpy,
    so every actor that evaluates it reads it from its node's object store without a copy."""
    return to_numpy(recipe.build({name: numpy_views(a) for name, a in zip(names, arrays)}))


# made once: a remote function built per call is pickled and exported again each time (~3 ms of driver CPU)
_build_merge_task = ray.remote(num_cpus=MERGE_CPUS)(build_merge)


class EvalWorker:
    """Holds a resident model and dataset shards; returns logits (or a :class:`Reduce` of them) for the weights it
    is handed.

    Every call carries references to the head and shard it needs (wrapped in a list, so Ray passes the reference
    rather than the value); the actor builds what it lacks and keeps it. A restarted actor (``max_restarts``) thus
    rebuilds its state on the first call that needs it, and methods are idempotent, as Ray's retries require.
    """

    def __init__(self, architecture: str, batch_size: int, num_threads: int = 1, precision: str = "fp32") -> None:
        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = models.resolve_precision(precision, self.device)
        self.encoder = models.build_encoder(architecture).to(self.device)
        self.architecture = architecture
        self.batch_size = batch_size
        self.heads: dict[str, models.Head] = {}
        self.shards: dict[str, torch.Tensor] = {}
        self.resident: dict[str, dict[str, torch.Tensor]] = {}  # pool models, for recipes built here
        self.loaded: str | None = None

    def _head(self, name: str, spec: list) -> models.Head:
        if name not in self.heads:
            arrays, class_names, normalize = ray.get(spec[0])
            bias = arrays.get("bias")
            self.heads[name] = models.Head(
                torch.from_numpy(np.array(arrays["weight"])).to(self.device),
                None if bias is None else torch.from_numpy(np.array(bias)).to(self.device),
                tuple(class_names),
                normalize,
            )
        return self.heads[name]

    def _shard(self, key: str, spec: list) -> torch.Tensor:
        """This actor's shard of dataset ``key`` (the :class:`ImageDataset` behind ``spec[0]``), decoded and
        preprocessed here, once."""
        if key not in self.shards:
            self.shards[key] = models.prepare_images(ray.get(spec[0]), self.architecture).to(self.device)
        return self.shards[key]

    def prepare(self, heads: dict[str, list], shards: dict[str, list]) -> int:
        """Build heads and shards ahead of the first evaluation (keeps preprocessing out of timed phases)."""
        for name, spec in heads.items():
            self._head(name, spec)
        return sum(len(self._shard(key, spec)) for key, spec in shards.items())

    def _models(self, refs: Mapping[str, ray.ObjectRef]) -> dict[str, dict[str, torch.Tensor]]:
        """The pool models ``refs`` names, kept resident: views of the object store on a CPU, copies on a GPU."""
        for name, ref in refs.items():
            if name not in self.resident:
                arrays = numpy_views(ray.get(ref))
                self.resident[name] = arrays if self.device.type == "cpu" else {
                    k: v.to(self.device) for k, v in arrays.items()}
        return {name: self.resident[name] for name in refs}

    def evaluate(self, jobs: list[Job], *weights: Weights | OnActors) -> list[np.ndarray]:
        """Each job's output, in order: float32 logits (n, C) of shard ``shard`` (or its local ``rows``) under
        ``weights[index]`` (numpy arrays, or a recipe to build here from the resident models) and head ``head``;
        with ``reduce``, what it makes of them instead (per-sample scores and prediction), so that the C numbers per
        sample stay here. One call carries this actor's part of everything the driver submits at once: Ray's cost
        per call (~1 ms of driver CPU) is paid once per actor, not once per set. The weights are arguments of their
        own, so Ray moves them to this node before the call starts."""
        return [self._evaluate(job, weights[job.index]) for job in jobs]

    def _evaluate(self, job: Job, weights: Weights | OnActors) -> np.ndarray:
        if self.loaded != job.weights_key:
            if isinstance(weights, OnActors):
                with torch.no_grad():
                    weights = weights.recipe.build(self._models(weights.models))
            models.load_weights_in_place(self.encoder, weights)
            self.loaded = job.weights_key
        images = self._shard(job.shard, job.shard_spec)
        if job.rows is not None:
            images = images[torch.from_numpy(np.array(job.rows, dtype=np.int64)).to(images.device)]
        logits = models.predict_logits(self.encoder, self._head(job.head, job.head_spec), images, self.batch_size,
                                       self.precision)
        return logits if job.reduce is None else job.reduce(logits)

    def adapt(self, merge: list, heads: dict[str, list], datasets: dict[str, list], settings: AdaptSettings, seed: int,
              label: str) -> AdaptResult:
        """Learn ``merge``'s coefficients (:func:`raymerge.adamerging.adapt`) on this actor's device, on the whole
        unlabeled test set of each task (``datasets[task]`` = [ref to its :class:`ImageDataset`]), each through its
        head; progress is printed ten times (the driver shows actors' output)."""
        from raymerge.adamerging import adapt

        every = max(1, settings.steps // 10)

        def on_step(step: int, loss: float, c: torch.Tensor) -> None:
            if step == 0 or (step + 1) % every == 0:
                print(f"{label}: step {step + 1}/{settings.steps}, mean entropy {loss:.4f} nats, coefficients mean "
                      f"{c.mean():.3f} (min {c.min():.3f}, max {c.max():.3f})", flush=True)

        images = {t: models.adaptation_images(ray.get(ref[0]), self.architecture) for t, ref in datasets.items()}
        return adapt(self.encoder, ray.get(merge[0]), {t: self._head(t, spec) for t, spec in heads.items()}, images,
                     settings, seed, on_step, self.device)

    def resolved_precision(self) -> str:
        return self.precision

    def pid(self) -> int:
        return os.getpid()


class WorkerPool:
    """Driver-side handle: starts the actors, shards datasets over them, and evaluates weight sets.

    Shards are contiguous and aligned to the batch size, so a sharded evaluation is bit-identical to
    :func:`evaluate_local` with the same batch size.
    """

    def __init__(self, architecture: str, resources: Resources, max_restarts: int = -1, cpu_fallback: bool = True,
                 task_cpus: float = 0.0) -> None:
        """``cpu_fallback``: drop the GPU request when the cluster has no GPU. Only for a Ray the driver started
        itself: an autoscaling cluster whose GPU workers scale from 0 has none *yet*, and must see the request.
        ``task_cpus``: CPUs that tasks run beside the actors will need (see :func:`cluster.check_resources`).

        Returns once every actor runs; :class:`cluster.ClusterResourceError` if the cluster can never run them,
        or (autoscaling, busy) they have not started within ``resources.start_timeout_s``.
        """
        self.architecture = architecture
        self.resources = resources
        gpus = resources.num_gpus_per_actor
        if gpus and cpu_fallback and ray.cluster_resources().get("GPU", 0) == 0:
            log.warning("this local Ray has no GPUs: actors fall back to CPU")
            gpus = 0.0
        cluster.check_resources(resources.num_actors, resources.num_cpus_per_actor, gpus, task_cpus=task_cpus)
        actor = ray.remote(EvalWorker).options(
            num_cpus=resources.num_cpus_per_actor,
            num_gpus=gpus,
            max_restarts=max_restarts,
            max_task_retries=-1 if max_restarts else 0,
        )
        threads = max(1, int(resources.num_cpus_per_actor))
        self.actors = [actor.remote(architecture, resources.batch_size, threads, resources.precision)
                       for _ in range(resources.num_actors)]
        cluster.wait_for_actors(self.actors, cluster.actor_bundle(resources.num_cpus_per_actor, gpus),
                                resources.start_timeout_s)
        resolved = set(ray.get([a.resolved_precision.remote() for a in self.actors]))
        if len(resolved) > 1:
            raise cluster.ClusterError(f"resources.precision {resources.precision!r} resolves to {sorted(resolved)} on "
                                       "different actors (some on a GPU, some not): name one precision")
        # what evaluation actually runs in: part of every row key and logit-cache key
        self.precision = resolved.pop()
        self.shards: dict[str, list[np.ndarray]] = {}
        self.shard_specs: dict[str, list[list]] = {}
        self.head_specs: dict[str, list] = {}
        self.head_classes: dict[str, int] = {}
        self._weights: dict[str, ray.ObjectRef] = {}
        self._sharder = Sharder(len(self.actors), resources.batch_size)
        self._adapting = [0] * len(self.actors)  # test-time adaptations running on each actor
        self._adapting_lock = threading.Lock()

    def add_head(self, name: str, head: models.Head) -> None:
        self.head_specs[name] = [ray.put((head.to_arrays(), head.class_names, head.normalize))]
        self.head_classes[name] = head.num_classes

    def add_datasets(self, datasets: Mapping[str, ImageDataset], together: Sequence[Sequence[str]] = ()) -> None:
        """Assign each actor a batch-aligned shard of each dataset and put each shard in the object store once
        (encoded files stay encoded: the actors decode them). The extra batches of a dataset go to the actors after
        the ones the dataset before it used, then, given the groups of dataset names evaluated together (a
        sweep's subsets), are spread so that each group's call keeps every actor about equally busy
        (:class:`raymerge.data.Sharder`)."""
        parts = self._sharder({key: len(ds) for key, ds in datasets.items()}, together)
        for key, ds in datasets.items():
            self.shards[key] = parts[key]
            self.shard_specs[key] = [[ray.put(ds.subset(idx))] for idx in parts[key]]

    def add_dataset(self, key: str, dataset: ImageDataset) -> None:
        """:meth:`add_datasets` of one dataset."""
        self.add_datasets({key: dataset})

    def prepare(self) -> None:
        """Have every actor build its heads and shards now rather than inside the first timed evaluation.

        Images that cannot be decoded on any actor are reported together, as one :class:`DatasetError`."""
        calls = [actor.prepare.remote(self.head_specs, {k: specs[i] for k, specs in self.shard_specs.items()})
                 for i, actor in enumerate(self.actors)]
        problems = []
        for call in calls:
            try:
                ray.get(call)
            except ray.exceptions.RayTaskError as err:
                if not isinstance(err.cause, DatasetError):
                    raise
                problems.append(str(err.cause))
        if problems:
            raise DatasetError("\n".join(problems))

    @property
    def registered(self) -> set[str]:
        """Keys of the weight sets the actors can be asked to evaluate now."""
        return set(self._weights)

    def build(self, recipe: Recipe, models: Mapping[str, ray.ObjectRef]) -> ray.ObjectRef | OnActors:
        """Start making ``recipe``'s weights: with ``resources.merge_on: actor``, each actor builds them itself from
        its resident models when it first evaluates them (recipes that run Ray tasks of their own, the SVD-based
        merges, still run as a task); otherwise a Ray task builds them once, into the object store."""
        if self.resources.merge_on == "actor" and recipe.where == "any":
            return OnActors(recipe, dict(models))
        names = list(models)
        return _build_merge_task.remote(recipe, names, *models.values())

    def put_built(self, key: str, weights: ray.ObjectRef | OnActors) -> None:
        """Register weights made elsewhere under ``key``: a reference to numpy arrays, or a recipe the actors build."""
        self._weights.setdefault(key, weights)

    def put_weights(self, weights: Weights) -> str:
        """Store ``weights`` (numpy arrays) once and return the key that names them in later calls."""
        key = state_dict_hash(weights)
        if key not in self._weights:
            self._weights[key] = ray.put(dict(weights))
        return key

    def ready(self, key: str) -> bool:
        """Whether the weights under ``key`` can be evaluated without waiting: made (a merge task finished), or
        made by the actors themselves. Made on another node counts: nothing is pulled to the driver's."""
        weights = self._weights[key]
        return not isinstance(weights, ray.ObjectRef) or bool(ray.wait([weights], timeout=0, fetch_local=False)[0])

    def drop_weights(self, key: str) -> None:
        self._weights.pop(key, None)

    def submit(self, requests: Sequence[Request]) -> list[Pending]:
        """Start every request at once, with one call per actor that has a part of any; returns, per request, its
        parts (global rows, call, place in the call's outputs). With a ``reduce``, each actor sends back that
        reduction of its rows, not their logits."""
        jobs: list[list[Job]] = [[] for _ in self.actors]
        weights: list[dict[str, int]] = [{} for _ in self.actors]  # per actor, its weight arguments' places
        places = []
        for req in requests:
            parts = []
            for i, part in enumerate(self.shards[req.dataset]):
                if req.rows is None:
                    mine, local = part, None
                else:
                    mine = req.rows[(req.rows >= part[0]) & (req.rows <= part[-1])] if len(part) else req.rows[:0]
                    local = mine - (part[0] if len(part) else 0)
                if len(mine):
                    index = weights[i].setdefault(req.weights_key, len(weights[i]))
                    jobs[i].append(Job(req.weights_key, index, req.head, self.head_specs[req.head], req.dataset,
                                       self.shard_specs[req.dataset][i], local,
                                       None if req.reduce is None else req.reduce.rows(mine)))
                    parts.append((mine, i, len(jobs[i]) - 1))
            places.append(parts)
        calls = {i: actor.evaluate.remote(jobs[i], *(self._weights[key] for key in weights[i]))
                 for i, actor in enumerate(self.actors) if jobs[i]}
        return [[(mine, calls[i], j) for mine, i, j in parts] for parts in places]

    def gather(self, pending: Sequence[Pending], shapes: Sequence[tuple[int, int, type]]) -> list[np.ndarray]:
        """Assemble the outputs of :meth:`submit`: per request, an (n, width) array of ``dtype`` for its
        ``shapes`` entry, indexed by global row (unasked rows are NaN)."""
        # one ray.get for every call: one round of requests to the object store, not one per actor or request
        calls = list(dict.fromkeys(call for parts in pending for _, call, _ in parts))
        outputs = dict(zip(calls, ray.get(calls)))
        out = []
        for parts, (n, width, dtype) in zip(pending, shapes):
            assembled = np.full((n, width), np.nan, dtype=dtype)
            for mine, call, j in parts:
                assembled[mine] = outputs[call][j]
            out.append(assembled)
        return out

    def evaluate(self, weights_key: str, head: str, dataset: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Logits (len(rows) or N, C) of ``dataset`` under the stored weights and ``head``."""
        n = int(sum(len(p) for p in self.shards[dataset]))
        [out] = self.gather(self.submit([Request(weights_key, head, dataset, rows)]),
                            [(n, self.head_classes[head], np.float32)])
        return out if rows is None else out[rows]

    def adapt(self, merge: DifferentiableMerge, datasets: Mapping[str, ImageDataset], settings: AdaptSettings, seed: int,
              label: str) -> AdaptResult:
        """Test-time adaptation of ``merge`` on one actor (:meth:`EvalWorker.adapt`), whose device and resident
        encoder it uses: the first of those running the fewest adaptations, so that adaptations started side by side
        (from threads) run on different actors. ``datasets``: the unlabeled test set of each task, by head name.
        Which one adapts changes nothing learned where the actors run on the same kind of device (a cluster mixing
        GPU models could differ in rounding: the row keys name the precision, not the device)."""
        with self._adapting_lock:
            actor = self._adapting.index(min(self._adapting))
            self._adapting[actor] += 1
        try:
            call = self.actors[actor].adapt.remote([ray.put(merge)], {t: self.head_specs[t] for t in datasets},
                                                   {t: [ray.put(ds)] for t, ds in datasets.items()}, settings, seed,
                                                   label)
            return ray.get(call)
        finally:
            with self._adapting_lock:
                self._adapting[actor] -= 1

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._weights.clear()


def evaluate_local(architecture: str, weights: Weights, head: models.Head, dataset: ImageDataset, batch_size: int) -> np.ndarray:
    """Single-process reference for :meth:`WorkerPool.evaluate`: (N, C) float32 logits."""
    encoder = models.build_encoder(architecture)
    models.load_weights_in_place(encoder, weights)
    images = models.prepare_images(dataset, architecture)
    return models.predict_logits(encoder, head, images, batch_size)


def _svd_job(job: SvdJob, keys: tuple, *values) -> object:
    """One low-rank job in a Ray worker. ``values`` (resolved by Ray from ObjectRefs: source state dicts as numpy
    arrays, earlier jobs' results) are named by ``keys``; the job runs through the same
    :func:`raymerge.lowrank.run_job` as the local merge."""
    lookup = dict(zip(keys, values))
    return run_job(job, lambda source: lookup[("source", source)], lambda name: lookup[("output", name)])


def run_svd_jobs(plan: LowRankPlan, num_cpus: float = 1.0) -> dict:
    """The Ray counterpart of :func:`raymerge.lowrank.run_jobs`: every job of ``plan`` as a Ray task.

    Each source state dict goes into the object store once, as numpy; a job gets its sources and the results of
    the jobs it depends on by reference (top-level arguments, so Ray schedules it when they are ready and moves them
    to its node). Only the results :func:`~raymerge.lowrank.assemble` needs come back to the driver, with a
    progress bar on stderr.
    """

    used = {arg.source for job in plan.jobs for arg in job.args if isinstance(arg, Operand)}
    source_refs = {source: ray.put(to_numpy(plan.sources[source])) for source in plan.sources if source in used}
    task = ray.remote(_svd_job).options(num_cpus=num_cpus)
    refs = {}
    for job in plan.jobs:
        deps = {}
        for arg in job.args:
            if isinstance(arg, Operand):
                deps[("source", arg.source)] = source_refs[arg.source]
            elif isinstance(arg, Output):
                deps[("output", arg.name)] = refs[arg.name]
        refs[job.name] = task.remote(job, tuple(deps), *deps.values())
    names = plan.output_names
    by_ref = {refs[name]: name for name in names}
    pending, results = list(by_ref), {}
    with tqdm(total=len(pending), desc=f"{plan.method} SVD jobs", unit="job", file=sys.stderr, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref, value in zip(done, ray.get(done)):
                results[by_ref[ref]] = value
            bar.update(len(done))
    return results


LOW_RANK_PLANNERS = {"cart": plan_cart, "tsv_merge": plan_tsv_merge, "iso_c": plan_iso_c, "iso_cts": plan_iso_cts}


def distributed_low_rank(
    method: str,
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    *,
    num_cpus: float = 1.0,
    **params,
) -> dict[str, torch.Tensor]:
    """A low-rank merge with its SVD jobs run as Ray tasks of ``num_cpus`` CPUs: ``method`` one of
    :data:`LOW_RANK_PLANNERS` (``cart``, ``tsv_merge``, ``iso_c``, ``iso_cts``), ``params`` its planner's other
    arguments (e.g. ``rank_ratio=0.12, qkv="split"`` for CART, ``common_space_fraction=0.8`` for Iso-CTS).

    The same plan, the same job functions (on the same fixed thread count) and the same assembly as the local merge,
    so the result equals ``raymerge.merge.<method>(base, finetuned, lam, ...)`` bit for bit. Arguments are validated
    (by the planner) before anything goes into the object store.
    """
    if method not in LOW_RANK_PLANNERS:
        raise ValueError(f"unknown low-rank method {method!r}: expected one of {', '.join(LOW_RANK_PLANNERS)}")
    lam = check_real("lam", lam)
    plan = LOW_RANK_PLANNERS[method](base, finetuned, **params)
    return assemble(plan, run_svd_jobs(plan, num_cpus), lam)


def distributed_cart(
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rank_ratio: float = 0.08,
    lam: float = 1.0,
    svd: str = "exact",
    seed: int = 0,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    num_cpus: float = 1.0,
    *,
    qkv: str = "fused",
    precision: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """:func:`raymerge.cart.cart` with its per-(block, task) SVDs as Ray tasks (:func:`distributed_low_rank`);
    equal to ``cart(...)`` bit for bit (same seed for the randomized SVD)."""
    return distributed_low_rank("cart", base, finetuned, lam, num_cpus=num_cpus, rank_ratio=rank_ratio, svd=svd,
                                seed=seed, rule=rule, qkv=qkv, names=names, precision=precision)
