"""What a merge method is: one registered unit that declares its name, paper, parameters and settings, and yields
*candidates* (things to evaluate) from a :class:`Pool` of models and tasks.

A unit wires the pure math (:mod:`raymerge.merge`, :mod:`raymerge.cart`, :mod:`raymerge.dawin`) to the pool; it does
no math itself and knows nothing of Ray or files. Validation (:mod:`raymerge.config`), the sweep's dispatch, row keys,
``raymerge methods`` and the README's method table all read the registry, so a method is added in one file::

    class MyParams(Params):
        lam: float = Field(0.5, description="scale of the merged task vector")

    @register("my_merge", paper=Paper("My merge", "2401.00000"), params=MyParams, settings=MERGES)
    def my_merge(pool: Pool, p: MyParams) -> Iterator[Candidate]:
        yield Candidate(p.record(), build=lambda: ...)

Third-party packages register units through the ``raymerge.methods`` entry-point group.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from raymerge.statedict import StateDict

ROBUST, MULTITASK, SWEEP = "robust", "multitask", "sweep"
SETTINGS = (ROBUST, MULTITASK, SWEEP)
MERGES = frozenset(SETTINGS)  # a merge of every fine-tuned model: meaningful in every setting

Pair = tuple[str, str]  # (task, split)


class Params(BaseModel):
    """Base of every method's parameters: unknown keys, wrong types, NaN/Inf and out-of-range values are errors.

    Each field carries its type, default, allowed range and a one-line ``description`` (shown by ``raymerge
    methods`` and the README's table).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    def record(self, exclude: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
        """What a row records: the full validated parameters, defaults included, minus ``exclude`` (a grid), plus
        per-candidate ``extra`` (resolved defaults, the grid point)."""
        return {**self.model_dump(mode="json", exclude=set(exclude)), **extra}


class NoParams(Params):
    """A method without parameters."""


def default_of(fn: Callable[..., Any], name: str) -> Any:
    """The default of parameter ``name`` of the pure function ``fn``: a unit's defaults are the math's own."""
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str | None = None

    def __str__(self) -> str:
        return f"{self.title} (arXiv:{self.arxiv})" if self.arxiv else self.title


def done(value: Any) -> Future:
    """A future that already holds ``value`` (what an evaluator without workers returns from ``central``)."""
    future: Future = Future()
    future.set_result(value)
    return future


class Evaluator(Protocol):
    """What a unit may ask of the running experiment (the Ray worker pool, or a single process)."""

    def logits(self, weights: Recipe | Mapping[str, np.ndarray], pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        """(N, C) float32 logits of ``weights`` (a recipe, or numpy arrays) on each whole (task, split)."""

    def predictions(self, weights: Recipe | Mapping[str, np.ndarray], pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        """(N,) int64 predicted classes of ``weights`` on each whole (task, split), the argmax taken where the
        logits are."""

    def temperature(self, weights: Recipe | Mapping[str, np.ndarray], pair: Pair) -> float:
        """The temperature of ``weights`` fitted on the labelled split ``pair``
        (:func:`raymerge.dawin.fit_temperature` on its logits)."""

    def scores(self, weights: Recipe | Mapping[str, np.ndarray], pairs: list[Pair],
               temperatures: Mapping[str, float] | None = None) -> dict[Pair, np.ndarray]:
        """(N, 4) :func:`raymerge.dawin.sample_scores` of ``weights`` on each whole (task, split), at each task's
        temperature (default 1), computed where the logits are: what travels instead of (N, C) logits."""

    def scores_rows(self, assignments: Sequence[tuple[Recipe | Mapping[str, np.ndarray], Pair, np.ndarray]]
                    ) -> list[np.ndarray]:
        """Scores (len(rows), 4) at temperature 1 per (weights, pair, rows) assignment: those rows of that
        (task, split) under those weights; all assignments are started before any is waited for."""

    def central(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` started where central statistics are computed (a Ray task beside the actors, or inline):
        its future, so that the caller goes on (submits phase 2) while it runs."""

    def labels(self, pair: Pair) -> np.ndarray: ...

    def adapt(self, merge: Any, tasks: Sequence[str], settings: Any, seed: int) -> Any:
        """:func:`raymerge.adamerging.adapt` of ``merge`` (a ``DifferentiableMerge``) on the unlabeled test sets of
        ``tasks``, where the models are evaluated (one actor, its GPU when it has one); an ``AdaptResult``."""


@dataclass
class Pool:
    """The models and tasks one method is run on: the whole experiment, or one subset of a sweep.

    ``finetuned`` keeps the experiment's order; ``task_models`` maps each task to its own fine-tuned model
    (multi-task) or None; ``splits`` lists each task's evaluated sets (test first, then shifts), never validation.
    """

    setting: str
    seed: int
    base: StateDict
    finetuned: dict[str, StateDict]
    tasks: list[str]
    splits: dict[str, list[str]]
    validation: dict[str, bool]
    task_models: dict[str, str | None]
    evaluator: Evaluator
    max_in_flight: int = 4

    @property
    def names(self) -> list[str]:
        return list(self.finetuned)

    @property
    def models(self) -> list[StateDict]:
        return list(self.finetuned.values())

    def eval_pairs(self, tasks: Sequence[str] | None = None) -> list[Pair]:
        """(task, split) pairs a candidate is reported on: test and shifts of each task, never validation."""
        return [(t, s) for t in (self.tasks if tasks is None else tasks) for s in self.splits[t]]

    def validation_pairs(self) -> list[Pair]:
        """Every task's validation split; a :class:`ValueError` (caught by validation earlier) when one lacks it."""
        missing = [t for t in self.tasks if not self.validation[t]]
        if missing:
            raise ValueError(f"tasks {missing} have no validation split, which this method selects on")
        return [(t, "validation") for t in self.tasks]

    def accuracy(self, weights: Recipe | Mapping[str, np.ndarray], pairs: list[Pair]) -> float:
        """Mean accuracy of ``weights`` over ``pairs`` (selection on validation splits)."""
        predictions = self.evaluator.predictions(weights, pairs)
        return float(np.mean([np.mean(predictions[p] == self.evaluator.labels(p)) for p in pairs]))


@dataclass(frozen=True)
class Model:
    """A placeholder for one of the pool's models (``"base"`` or a fine-tuned model's name) in a :class:`Recipe`."""

    name: str


def _substitute(value: Any, models: Mapping[str, Any]) -> Any:
    if isinstance(value, Model):
        return models[value.name]
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, models) for v in value)
    return value


def _placeholders(value: Any) -> Iterator[str]:
    if isinstance(value, Model):
        yield value.name
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _placeholders(v)


def resident(sd: StateDict) -> StateDict:
    """The identity merge: a pool model evaluated as it is (zero-shot, fine-tuned)."""
    return sd


@dataclass(frozen=True)
class Recipe:
    """A merge as a pure function of pool models: ``fn(*args, **kwargs)`` with each :class:`Model` placeholder in
    ``args`` or ``kwargs`` replaced by that model's state dict. The driver never builds it: the pipeline runs it
    where it is cheapest (a Ray task reading the models from the object store, or the evaluation actors, which hold
    the models), once per merged weight set, and it is identified by :meth:`key` without being built."""

    fn: Callable[..., StateDict]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # "task": the merge runs Ray tasks of its own (the SVD-based merges), so it is built as a task, never on an actor
    where: str = "any"

    @classmethod
    def model(cls, name: str) -> Recipe:
        """One pool model as it is."""
        return cls(resident, (Model(name),))

    @property
    def single_model(self) -> str | None:
        """The model's name when this recipe is one pool model as it is."""
        return self.args[0].name if self.fn is resident else None

    def models(self) -> list[str]:
        """The pool models the recipe reads, in first-use order."""
        return list(dict.fromkeys([*_placeholders(self.args), *_placeholders(tuple(self.kwargs.values()))]))

    def build(self, models: Mapping[str, StateDict]) -> StateDict:
        """The merged state dict, from ``models`` by name."""
        return self.fn(*_substitute(self.args, models), **{k: _substitute(v, models) for k, v in self.kwargs.items()})

    def key(self, hashes: Mapping[str, str]) -> str:
        """A hash of what determines the merged weights: the function, its arguments and the models' hashes."""
        def canonical(value: Any) -> Any:
            if isinstance(value, Model):
                return {"model": hashes[value.name]}
            if isinstance(value, (list, tuple)):
                return [canonical(v) for v in value]
            return value

        blob = json.dumps([f"{self.fn.__module__}.{self.fn.__qualname__}", canonical(self.args),
                           {k: canonical(v) for k, v in sorted(self.kwargs.items())}], default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Candidate:
    """One thing to evaluate, described before any work so the results store can be asked first.

    ``params``: what the row records (a unit's full validated parameters plus per-candidate values such as a grid
    point). Exactly one of ``recipe`` (a merge, built off the driver), ``build`` (driver-side work that yields the
    weights or a recipe: selection on validation, test-time adaptation; a stored candidate skips it) and ``predict``
    (output-space methods: predictions and per-sample extras per pair) is set.
    ``details`` is filled while building (e.g. the λ a selection chose) and stored beside the row.
    ``models``: the pool models the candidate reads (``"base"`` and fine-tuned names); None means all of them.
    ``tasks``: the tasks it is judged on; None means every task of the pool.
    ``adapts`` (``build`` candidates only): its build is test-time adaptation, one actor's work (``Evaluator.adapt``)
    that asks the evaluator for no outputs (logits, predictions, scores, temperatures: the run's own state, kept by
    its loop's thread), so it may start ahead of its turn on a thread of its own, beside others
    (:attr:`raymerge.config.Resources.adaptations_in_flight`).
    ``ahead`` (``predict`` candidates only): given the pairs ``predict`` will be asked for, the merges it will
    evaluate first, where they can be known before it runs (DaWin's first phase-2 batch, which its phase 1 fixes
    when no mixture is fitted), so that a sweep starts making them while earlier candidates are evaluated. It runs
    under :meth:`raymerge.pipeline.Run.cached_only`: it reads what is cached (DaWin's phase 1, after a sweep's
    first subsets) and evaluates nothing. A candidate whose evaluation makes merges has one even where it can list
    none (``[]``), so that a sweep counts the merges its evaluation will hold.
    """

    params: dict[str, Any]
    recipe: Recipe | None = None
    build: Callable[[], StateDict | Recipe] | None = None
    predict: Callable[[list[Pair]], Prediction] | None = None
    models: list[str] | None = None
    tasks: list[str] | None = None
    merges: int = 1
    details: dict[str, Any] = field(default_factory=dict)
    ahead: Callable[[list[Pair]], list[Recipe | StateDict]] | None = None
    adapts: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.recipe, self.build, self.predict)) != 1:
            raise ValueError("a candidate has exactly one of recipe, build (a weight set) and predict (output-space)")
        if self.adapts and self.build is None:
            raise ValueError("adapts marks a build that is test-time adaptation; this candidate has no build")
        if self.ahead is not None and self.predict is None:
            raise ValueError("ahead lists the merges a predict candidate makes; a recipe is made ahead as it is")
        if self.recipe is not None and self.models is None:
            self.models = self.recipe.models()


@dataclass
class Prediction:
    """What an output-space candidate returns: predictions (N,) per pair, per-sample extras per pair
    (equal-length columns for the samples file), and the merged weight sets evaluated per pair."""

    outputs: dict[Pair, np.ndarray]
    extras: dict[Pair, dict[str, np.ndarray]] = field(default_factory=dict)
    merges: dict[Pair, int] = field(default_factory=dict)


CandidateFn = Callable[[Pool, Any], Iterator[Candidate]]
CheckFn = Callable[[Any, str], list[str]]


@dataclass(frozen=True)
class Reads:
    """Data a candidate's rows depend on beyond their own (task, split) and its head, so row keys cover it.

    ``own``: other splits of the row's task (DaWin's temperatures on ``validation``); ``every_task``: splits of every
    task of the pool, with their heads (selection on all validation splits, adaptation on all test sets).
    """

    own: tuple[str, ...] = ()
    every_task: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A registered method: see the module docstring."""

    name: str
    paper: Paper | None
    params: type[Params]
    settings: frozenset[str]
    candidates: CandidateFn
    random: bool | Callable[[Any, str], bool] = False
    reads: Reads | Callable[[Any], Reads] = Reads()
    check: CheckFn | None = None
    summary: str = ""
    task_cpus: float = 0.0
    min_models: int = 1

    def reads_for(self, params: Params) -> Reads:
        """What rows made with ``params`` read beyond their own set and head (see :class:`Reads`)."""
        return self.reads(params) if callable(self.reads) else self.reads

    def is_random(self, params: Params, setting: str) -> bool:
        """Whether results depend on the seed for these parameters in ``setting`` (then the seed is part of every
        row key)."""
        return self.random(params, setting) if callable(self.random) else self.random

    def problems(self, params: Params, setting: str, sweep: bool = False) -> list[str]:
        """Setting-dependent problems of valid parameters (e.g. an option defined for two models only); ``sweep``:
        the parameters are a sweep's (the pool is then a multi-task subset)."""
        if (SWEEP if sweep else setting) not in self.settings:
            where = ", ".join(s for s in SETTINGS if s in self.settings)
            return [f"applies to the {where} setting(s), not to {'a sweep' if sweep else setting}"]
        return self.check(params, setting) if self.check else []


REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    *,
    params: type[Params],
    settings: frozenset[str] | set[str],
    paper: Paper | None = None,
    random: bool | Callable[[Any, str], bool] = False,
    reads: Reads | Callable[[Any], Reads] = Reads(),
    check: CheckFn | None = None,
    task_cpus: float = 0.0,
    min_models: int = 1,
) -> Callable[[CandidateFn], CandidateFn]:
    """Register the decorated candidate generator as method ``name``; its docstring's first line is its summary.

    ``task_cpus``: the CPUs one of its Ray tasks asks for (SVD jobs, mixture fits), which must stay free beside the
    evaluation actors or the tasks would wait forever. ``min_models``: the fewest fine-tuned models it merges.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"method {name!r}: unknown settings {sorted(unknown)} (known: {', '.join(SETTINGS)})")

    def decorate(fn: CandidateFn) -> CandidateFn:
        if name in REGISTRY and REGISTRY[name].candidates is not fn:
            raise ValueError(f"method {name!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        REGISTRY[name] = Method(name, paper, params, frozenset(settings), fn, random, reads, check, summary, task_cpus,
                                min_models)
        return fn

    return decorate
