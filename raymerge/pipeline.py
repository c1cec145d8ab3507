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

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from raymerge import models
from raymerge.config import ConfigError, Experiment
from raymerge.data import DatasetError, ImageDataset, load_dataset
from raymerge.results import ResultStore, row_key
from raymerge.statedict import StateDict, StateDictError, check_compatible, state_dict_hash, to_numpy
from raymerge.workers import Resources, WorkerPool

log = logging.getLogger("raymerge")


@dataclass
class Candidate:
    """One thing to evaluate: a weight set, built lazily by ``build`` (so resumed runs skip the merge itself),
    judged on ``tasks`` (None: every task of the experiment)."""

    method: str
    params: dict[str, Any]
    build: Callable[[], StateDict] | None
    tasks: list[str] | None = None
    merges: int = 1
    # output-space methods (ensembles, DaWin) produce predictions, per-sample extras and their merge count
    # themselves instead of one weight set
    predict: Callable[[list[tuple[str, str]]], tuple[dict, dict, Mapping[tuple[str, str], int]]] | None = None


@dataclass
class LoadedTask:
    name: str
    head: models.Head
    head_hash: str
    sets: dict[str, ImageDataset]  # split or shift name -> dataset; "validation" included when given
    finetuned: str | None


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log the start and the wall time of a phase of the job."""
    log.info("phase %s: start", name)
    start = time.perf_counter()
    yield
    log.info("phase %s: done in %.1f s", name, time.perf_counter() - start)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYMERGE_CACHE", Path.home() / ".cache" / "raymerge"))


class LogitCache:
    """Per-sample logits on disk, keyed by (architecture, weights hash, head hash, dataset hash, batch size)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root / (hashlib.sha256("|".join(parts).encode()).hexdigest()[:32] + ".npy")

    def get(self, *parts: str) -> np.ndarray | None:
        p = self.path(*parts)
        return np.load(p) if p.exists() else None

    def put(self, logits: np.ndarray, *parts: str) -> None:
        p = self.path(*parts)
        tmp = p.with_name(f".{p.stem}.{os.getpid()}.npy")
        np.save(tmp, logits)
        os.replace(tmp, p)


def load_experiment_inputs(exp: Experiment) -> tuple[StateDict, dict[str, StateDict], dict[str, LoadedTask]]:
    """Read every checkpoint, head and dataset and check them against each other; no model runs yet."""
    base = models.load_encoder_weights(exp.architecture, exp.base)
    finetuned = {name: models.load_encoder_weights(exp.architecture, p) for name, p in exp.finetuned.items()}
    check_compatible([base, *finetuned.values()], [str(exp.base), *map(str, exp.finetuned.values())])
    tasks = {}
    for name, spec in exp.tasks.items():
        head = models.load_head(spec.head)
        models.check_head(head, exp.architecture, str(spec.head))
        sets = {split: load_dataset(path, f"{name}/{split}") for split, path in spec.eval_sets().items()}
        if spec.validation:
            sets["validation"] = load_dataset(spec.validation, f"{name}/validation")
        for ds in sets.values():
            ds.check_labels(head.num_classes, str(spec.head))
            if len(ds.class_names) != head.num_classes:
                raise DatasetError(
                    f"dataset {ds.source} has {len(ds.class_names)} classes but head {spec.head} has {head.num_classes}"
                )
        tasks[name] = LoadedTask(name, head, state_dict_hash(head.to_arrays()), sets, spec.finetuned)
    return base, finetuned, tasks


@dataclass
class Run:
    """One experiment being run: inputs, the worker pool, the logit cache and the results store."""

    exp: Experiment
    base: StateDict
    finetuned: dict[str, StateDict]
    tasks: dict[str, LoadedTask]
    pool: WorkerPool
    cache: LogitCache
    store: ResultStore
    force: bool = False
    pool_hash: str = ""
    skipped: int = 0
    evaluated: int = 0
    done: set[str] = field(default_factory=set)

    def eval_sets(self, tasks: list[str] | None = None) -> list[tuple[str, str]]:
        """(task, split) pairs a candidate is reported on: test and shifts of each task, never validation."""
        names = tasks if tasks is not None else list(self.tasks)
        return [(t, s) for t in names for s in self.tasks[t].sets if s != "validation"]

    def logits(self, weights: Mapping[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
        """Logits of ``weights`` on each (task, split), from the cache or the pool (all shards at once)."""
        whash = state_dict_hash(weights)
        out, pending, key = {}, {}, None
        for task, split in pairs:
            t = self.tasks[task]
            parts = (self.exp.architecture, whash, t.head_hash, t.sets[split].hash, str(self.pool.resources.batch_size))
            cached = self.cache.get(*parts)
            if cached is not None:
                out[(task, split)] = cached
                continue
            key = key or self.pool.put_weights(weights)
            pending[(task, split)] = (parts, self.pool.submit(key, task, f"{task}/{split}"))
        for (task, split), (parts, refs) in pending.items():
            t = self.tasks[task]
            logits = self.pool.gather(refs, len(t.sets[split]), t.head.num_classes)
            self.cache.put(logits, *parts)
            out[(task, split)] = logits
        if key:
            self.pool.drop_weights(key)
        return out

    def logits_rows(self, assignments: list[tuple[Mapping[str, np.ndarray], np.ndarray]], pair: tuple[str, str]) -> np.ndarray:
        """Phase 2 of DaWin: every (weights, rows) assignment at once, each actor evaluating its rows only."""
        task, split = pair
        t = self.tasks[task]
        keys, pending = [], []
        for weights, rows in assignments:
            keys.append(self.pool.put_weights(weights))
            pending += self.pool.submit(keys[-1], task, f"{task}/{split}", rows)
        out = self.pool.gather(pending, len(t.sets[split]), t.head.num_classes)
        for key in keys:
            self.pool.drop_weights(key)
        return out

    def central(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Central statistics (coefficients, mixture fit) as one Ray task beside the actors."""
        return ray.get(ray.remote(fn).options(num_cpus=0.5).remote(*args))

    def labels(self, pair: tuple[str, str]) -> np.ndarray:
        return self.tasks[pair[0]].sets[pair[1]].labels

    def accuracy(self, weights: Mapping[str, np.ndarray], pairs: list[tuple[str, str]]) -> float:
        """Mean accuracy over ``pairs`` (used for selection on validation splits)."""
        logits = self.logits(weights, pairs)
        return float(np.mean([np.mean(logits[p].argmax(1) == self.tasks[p[0]].sets[p[1]].labels) for p in pairs]))

    def keys_for(self, method: str, params: Mapping[str, Any], pairs: list[tuple[str, str]]) -> list[str]:
        return [row_key(method, dict(params), self.pool_hash, t, s) for t, s in pairs]

    def is_done(self, method: str, params: Mapping[str, Any], tasks: list[str] | None = None) -> bool:
        """True when every row of this (method, params) is stored already and ``--force`` is off."""
        keys = self.keys_for(method, params, self.eval_sets(tasks))
        if not self.force and all(k in self.done for k in keys):
            self.skipped += len(keys)
            return True
        return False

    def record(self, method: str, params: Mapping[str, Any], logits: Mapping[tuple[str, str], np.ndarray],
               seconds: float, merges: Mapping[tuple[str, str], int], extras: Mapping[tuple[str, str], Mapping[str, np.ndarray]] | None = None) -> None:
        """Write one row per (task, split) of ``logits`` and its per-sample outputs; ``merges`` counts the merged
        weight sets each (task, split) was evaluated with."""
        rows = []
        for (task, split), lg in logits.items():
            labels = self.tasks[task].sets[split].labels
            pred = lg.argmax(1) if lg.ndim == 2 else lg  # output-space methods hand over predictions
            key = row_key(method, dict(params), self.pool_hash, task, split)
            columns = {"prediction": pred, "label": labels, **((extras or {}).get((task, split), {}))}
            self.store.write_samples(key, columns)
            rows.append({
                "key": key, "experiment": self.exp.name, "method": method, "params": dict(params),
                "pool": self.pool_hash, "task": task, "split": split,
                "accuracy": float(np.mean(pred == labels)), "n": int(len(labels)),
                "seconds": seconds, "merges": int(merges.get((task, split), 0)),
            })
            self.done.add(key)
        self.store.append(rows)
        self.evaluated += len(rows)

    def evaluate_candidate(self, c: Candidate, weights: Mapping[str, np.ndarray] | None = None) -> None:
        """Evaluate ``c`` unless its rows are stored; ``weights`` are its merge, when built ahead of time."""
        if self.is_done(c.method, c.params, c.tasks):
            return
        start = time.perf_counter()
        pairs = self.eval_sets(c.tasks)
        if c.predict is not None:
            logits, extras, merges = c.predict(pairs)
        else:
            weights = to_numpy(c.build()) if weights is None else weights
            logits, extras, merges = self.logits(weights, pairs), None, dict.fromkeys(pairs, c.merges)
        self.record(c.method, c.params, logits, time.perf_counter() - start, merges, extras)

    def validation_pairs(self) -> list[tuple[str, str]]:
        pairs = [(t, "validation") for t, task in self.tasks.items() if "validation" in task.sets]
        if not pairs:
            raise ConfigError(self.exp.source, ["task_pool: a method that selects on validation needs a validation split"])
        return pairs


MethodFn = Callable[[Run, dict[str, Any]], Iterator[Candidate]]
METHODS: dict[str, MethodFn] = {}


def method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Register a method generator under the experiment-file name ``name``."""

    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return register


def _first_finetuned(run: Run) -> str:
    return next(iter(run.finetuned))


@method("zeroshot")
def _zeroshot(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    yield Candidate("zeroshot", {}, lambda: run.base, merges=0)


@method("finetuned")
def _finetuned(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    if run.exp.setting == "multitask":
        for task in run.tasks.values():
            if task.finetuned:
                # the individual fine-tuned model on its own task: the upper bound of multi-task tables
                yield Candidate("individual", {"model": task.finetuned}, lambda sd=run.finetuned[task.finetuned]: sd, [task.name], 0)
    else:
        for name, sd in run.finetuned.items():
            yield Candidate("finetuned", {"model": name}, lambda sd=sd: sd, merges=0)


@method("wise_ft")
def _wise_ft(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.merge import interpolate

    ft = _first_finetuned(run)
    for lam in params["lambdas"]:
        yield Candidate("wise_ft", {"lam": float(lam), "model": ft},
                        lambda lam=float(lam): interpolate(run.base, run.finetuned[ft], lam))


@method("weight_average")
def _weight_average(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.merge import weight_average

    yield Candidate("weight_average", {}, lambda: weight_average(list(run.finetuned.values()), list(run.finetuned)))


@method("task_arithmetic")
def _task_arithmetic(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.merge import task_arithmetic

    def build(lam: float) -> StateDict:
        return task_arithmetic(run.base, list(run.finetuned.values()), lam, names=list(run.finetuned))

    pairs = run.validation_pairs()
    scores = {float(lam): run.accuracy(to_numpy(build(float(lam))), pairs) for lam in params["lambdas"]}
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    log.info("task arithmetic: validation accuracy per lambda %s -> lambda %.2f", {k: round(v, 4) for k, v in scores.items()}, best)
    yield Candidate("task_arithmetic", {"lam": best, "selected_on": "validation"}, lambda: build(best), merges=len(scores))


@method("ties")
def _ties(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.merge import ties

    lam, density = float(params["lam"]), float(params["density"])
    yield Candidate("ties", {"lam": lam, "density": density},
                    lambda: ties(run.base, list(run.finetuned.values()), lam, density, names=list(run.finetuned)))


@method("model_stock")
def _model_stock(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.merge import model_stock

    yield Candidate("model_stock", {}, lambda: model_stock(run.base, list(run.finetuned.values()), names=list(run.finetuned)))


def greedy_soup(candidates: Mapping[str, StateDict], score: Callable[[StateDict], float]) -> tuple[StateDict, list[str]]:
    """Greedy soup (METHODS §1): add models in order of held-out score, keeping each only if the score does not drop.

    ``score`` evaluates a state dict on held-out data (higher is better). Returns the soup and the names kept.
    """
    from raymerge.merge import weight_average

    ranked = sorted(candidates, key=lambda name: -score(candidates[name]))
    kept = [ranked[0]]
    best = score(candidates[ranked[0]])
    for name in ranked[1:]:
        trial = weight_average([candidates[n] for n in [*kept, name]])
        value = score(trial)
        if value >= best:
            kept, best = [*kept, name], value
    return weight_average([candidates[n] for n in kept]), kept


@method("greedy_soup")
def _greedy_soup(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    pairs = run.validation_pairs()
    soup, kept = greedy_soup(run.finetuned, lambda sd: run.accuracy(to_numpy(sd), pairs))
    yield Candidate("greedy_soup", {"models": kept, "selected_on": "validation"}, lambda: soup)


@method("output_ensemble")
def _output_ensemble(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.dawin import output_ensemble

    if run.exp.setting == "multitask":
        members = dict(run.finetuned)
    else:
        ft = _first_finetuned(run)
        members = {"zeroshot": run.base, ft: run.finetuned[ft]}

    def predict(pairs: list[tuple[str, str]]) -> tuple[dict, dict]:
        per_model = [run.logits(to_numpy(sd), pairs) for sd in members.values()]
        return {p: output_ensemble([lg[p] for lg in per_model]) for p in pairs}, {}, {}

    yield Candidate("output_ensemble", {"models": list(members)}, None, merges=0, predict=predict)


@method("cart")
def _cart(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    from raymerge.workers import distributed_cart

    for cfg in params["configs"]:
        rho, lam = float(cfg["rank_ratio"]), float(cfg.get("lam", 1.0))
        yield Candidate("cart", {"rank_ratio": rho, "lam": lam, "svd": params["svd"]},
                        lambda rho=rho, lam=lam: distributed_cart(
                            run.base, list(run.finetuned.values()), rho, lam, params["svd"], run.exp.seed,
                            names=list(run.finetuned)))


@method("rank_sweep")
def _rank_sweep(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    """Accuracy versus rank ratio (cart-2025.md Fig. 1/5): CART and task arithmetic with rank-k task vectors."""
    from raymerge.merge import task_arithmetic
    from raymerge.workers import distributed_cart

    ft, names, svd = list(run.finetuned.values()), list(run.finetuned), params["svd"]
    for rho in params["rank_ratios"]:
        rho = float(rho)
        yield Candidate("rank_sweep/cart", {"rank_ratio": rho, "lam": float(params["cart_lam"])},
                        lambda rho=rho: distributed_cart(run.base, ft, rho, float(params["cart_lam"]), svd, run.exp.seed, names=names))
        yield Candidate("rank_sweep/task_arithmetic", {"rank_ratio": rho, "lam": float(params["task_arithmetic_lam"])},
                        lambda rho=rho: task_arithmetic(run.base, ft, float(params["task_arithmetic_lam"]), rank_ratio=rho,
                                                        svd=svd, seed=run.exp.seed, names=names))


def dawin_merge_fn(run: Run, names: list[str], lam0: float) -> Callable[[np.ndarray], StateDict]:
    """The merge a DaWin coefficient row (M,) over candidate models ``names`` stands for (METHODS §4).

    Robust (``names`` = zeroshot, θ1): ``(1−λ) θ0 + λ θ1``. Multi-task (``names`` = T fine-tuned models):
    ``θ0 + λ0·T·Σt λt τt``, so uniform coefficients give task arithmetic at λ0.
    """
    from raymerge.merge import interpolate, task_arithmetic

    if names[0] == "zeroshot":
        ft = run.finetuned[names[1]]
        return lambda c: interpolate(run.base, ft, float(c[1]))
    fts = [run.finetuned[n] for n in names]
    return lambda c: task_arithmetic(run.base, fts, [lam0 * len(fts) * float(x) for x in c], names=names)


def dawin_runner(run: Run, names: list[str], lam0: float, pairs: list[tuple[str, str]]):
    """Phase 1 of DaWin for candidates ``names`` on ``pairs`` (logits cached), ready to run any variant."""
    from raymerge.dawin_pipeline import DawinRunner, phase1

    weights = {"zeroshot": run.base, **run.finetuned}
    tasks = dict.fromkeys(t for t, _ in pairs)
    validation = {t: (t, "validation") if "validation" in run.tasks[t].sets else None for t in tasks}
    p1 = phase1(run, [to_numpy(weights[n]) for n in names], pairs, validation)
    log.debug("dawin temperatures per task: %s", p1.temperatures)
    return DawinRunner(run, p1, dawin_merge_fn(run, names, lam0), run.exp.seed)


def dawin_merge(run: Run, names: list[str], params: Mapping[str, Any]) -> Callable:
    """``Candidate.predict`` for multi-task DaWin with a Dirichlet mixture over the models ``names``."""

    def predict(pairs: list[tuple[str, str]]) -> tuple[dict, dict, dict]:
        outcome = dawin_runner(run, names, float(params["lam0"]), pairs).mixture(pairs, int(params["k"]), offset=False)
        return outcome.predictions, outcome.extras, outcome.merges

    return predict


@method("dawin")
def _dawin(run: Run, params: dict[str, Any]) -> Iterator[Candidate]:
    robust = run.exp.setting != "multitask"
    names = ["zeroshot", _first_finetuned(run)] if robust else list(run.finetuned)
    state: dict[str, Any] = {}

    def runner(pairs: list[tuple[str, str]]):
        # phase 1 and the temperatures are shared by every variant below
        if "r" not in state:
            with phase("dawin phase 1 (candidate logits, temperatures, entropies)"):
                state["r"] = dawin_runner(run, names, float(params["lam0"]), pairs)
        return state["r"]

    def variant(label: str, extra: dict[str, Any], fn: Callable[[Any, list], Any]) -> Candidate:
        def predict(pairs: list[tuple[str, str]]) -> tuple[dict, dict, dict]:
            outcome = fn(runner(pairs), pairs)
            return outcome.predictions, outcome.extras, outcome.merges
        return Candidate(label, {"models": names, **extra}, None, predict=predict)

    k = int(params["k"])
    offsets = [True, False] if robust else [False]
    for offset in offsets:
        yield variant("dawin", {"k": k, "offset": offset}, lambda r, p, o=offset: r.mixture(p, k, o))
    if params["samplewise"]:
        yield variant("dawin/samplewise", {"offset": offsets[0]}, lambda r, p: r.samplewise(p, offsets[0]))
    if robust:
        yield variant("dawin/dcs", {"offset": True}, lambda r, p: r.selection(p, True)[0])
        yield variant("dawin/doe", {"offset": True}, lambda r, p: r.selection(p, True)[1])
        if params["oracle"]:
            yield variant("dawin/oracle (upper bound)", {}, lambda r, p: r.oracle(p))


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True when the Ray in use runs on this machine only (started here, or already running).

    A cluster address (or RAY_ADDRESS, which ``ray job submit`` sets) joins that cluster; ``"local"`` always starts
    a fresh local Ray; nothing lets plain ``ray.init()`` decide (a recorded local head, else a new local Ray).
    ``num_cpus`` applies only to a local start (RAY-NOTES.md).
    """
    if ray.is_initialized():
        return True
    if address not in (None, "local") or (address is None and os.environ.get("RAY_ADDRESS")):
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


# Errors a user can fix in their files; jobs report them in one line instead of a traceback.
INPUT_ERRORS = (models.CheckpointError, models.ModelError, DatasetError, StateDictError, ConfigError)


def start_run(exp: Experiment, force: bool = False, cache_dir: Path | None = None, address: str | None = None) -> Run:
    """Load and check every input, then (and only then) join Ray and start the worker pool."""
    with phase("load"):
        base, finetuned, tasks = load_experiment_inputs(exp)
    local = connect(address)
    store = ResultStore(exp.output_dir)
    pool_hash = state_dict_hash({"base": np.frombuffer(state_dict_hash(base).encode(), np.uint8),
                                 **{n: np.frombuffer(state_dict_hash(sd).encode(), np.uint8) for n, sd in finetuned.items()}})
    with phase("start workers"):
        pool = WorkerPool(exp.architecture, Resources(**exp.resources), cpu_fallback=local)
        for name, task in tasks.items():
            pool.add_head(name, task.head)
            for split, ds in task.sets.items():
                pool.add_dataset(f"{name}/{split}", ds)
        pool.prepare()
    return Run(exp, base, finetuned, tasks, pool, LogitCache((cache_dir or default_cache_dir()) / "logits"), store,
               force=force, pool_hash=pool_hash, done=set() if force else store.keys())


def run_experiment(exp: Experiment, force: bool = False, cache_dir: Path | None = None, address: str | None = None) -> ResultStore:
    """Run every method of ``exp`` and return the results store (rows already present are skipped).

    All inputs are loaded and checked before Ray is started or joined, so bad input wastes no cluster time.
    """
    run = start_run(exp, force, cache_dir, address)
    try:
        for name, params in exp.methods.items():
            with phase(f"method {name}"):
                for cand in tqdm(list(METHODS[name](run, params)), desc=name, unit="model", leave=False):
                    run.evaluate_candidate(cand)
    finally:
        run.pool.shutdown()
        run.store.write_summary()
    log.info("%d rows evaluated, %d rows already present skipped (use --force to recompute)", run.evaluated, run.skipped)
    return run.store
