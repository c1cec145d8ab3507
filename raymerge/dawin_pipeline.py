"""DaWin's two-phase evaluation (METHODS §4), written once against a small :class:`Evaluator` interface.

1. phase 1: temperatures fitted on each task's validation logits; then every candidate's per-sample scores
   (:func:`raymerge.dawin.sample_scores`: entropies, cross-entropy, prediction) on every test set, computed by
   the workers from their shard's logits, so four numbers per sample travel instead of C (cached);
2. central: coefficients with domain statistics, mixture fit (a Ray task on a cluster), component of each sample;
3. the merged weight sets are built once each, every test set's side by side;
4. phase 2: each sample is evaluated with its component's merged model only, every test set's merges submitted
   together, at most ``max_in_flight`` merged weight sets alive at once; again only scores travel back (the
   static reference merge's scores come from the evaluator's cache when the run evaluates that merge too);
5. per-sample diagnostics (:mod:`raymerge.diagnostics`): does entropy track the loss on this test set? (central
   tasks, started before phase 2 and running beside it)

The Ray worker pool (:class:`raymerge.pipeline.Run`) and :class:`LocalEvaluator` (one process, no Ray) both
implement :class:`Evaluator`, so the single-process reference runs exactly this code with another evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from raymerge import dawin, diagnostics, models
from raymerge.diagnostics import Diagnostics
from raymerge.errors import InputError
from raymerge.methods.base import Evaluator, Recipe, done
from raymerge.statedict import StateDict

Pair = tuple[str, str]  # (task, split)
CENTRAL_CPUS = 0.5  # what a central-statistics task (a mixture fit) asks Ray for, beside the actors
Weights = Mapping[str, np.ndarray]


class LocalEvaluator:
    """Single-process reference evaluator: one resident encoder, preprocessed datasets, no Ray."""

    def __init__(self, architecture: str, heads: Mapping[str, models.Head], sets: Mapping[Pair, Any], batch_size: int,
                 pool_models: Mapping[str, StateDict] | None = None) -> None:
        """``pool_models``: the models recipes name (``"base"`` and the fine-tuned ones), built here when asked."""
        self.encoder = models.build_encoder(architecture)
        self.heads = heads
        self.images = {p: models.prepare_images(ds, architecture) for p, ds in sets.items()}
        self._labels = {p: ds.labels for p, ds in sets.items()}
        self.batch_size = batch_size
        self.pool_models = pool_models or {}

    def _load(self, weights: Recipe | Weights) -> None:
        models.load_weights_in_place(self.encoder, weights.build(self.pool_models) if isinstance(weights, Recipe) else weights)

    def logits(self, weights: Recipe | Weights, pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        self._load(weights)
        return {p: models.predict_logits(self.encoder, self.heads[p[0]], self.images[p], self.batch_size) for p in pairs}

    def predictions(self, weights: Recipe | Weights, pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        return {p: lg.argmax(1) for p, lg in self.logits(weights, pairs).items()}

    def temperature(self, weights: Recipe | Weights, pair: Pair) -> float:
        return dawin.fit_temperature(self.logits(weights, [pair])[pair], self._labels[pair])

    def scores(self, weights: Recipe | Weights, pairs: list[Pair], temperatures: Mapping[str, float] | None = None
               ) -> dict[Pair, np.ndarray]:
        logits = self.logits(weights, pairs)
        return {p: dawin.sample_scores(logits[p], self._labels[p], (temperatures or {}).get(p[0], 1.0)) for p in pairs}

    def scores_rows(self, assignments: Sequence[tuple[Recipe | Weights, Pair, np.ndarray]]) -> list[np.ndarray]:
        out = []
        for weights, pair, rows in assignments:
            self._load(weights)
            logits = models.predict_logits(self.encoder, self.heads[pair[0]], self.images[pair][rows], self.batch_size)
            out.append(dawin.sample_scores(logits, self._labels[pair][rows]))
        return out

    def central(self, fn: Callable[..., Any], *args: Any) -> Future:
        return done(fn(*args))

    def labels(self, pair: Pair) -> np.ndarray:
        return self._labels[pair]

    def adapt(self, merge: Any, tasks: Sequence[str], settings: Any, seed: int) -> Any:
        from raymerge.adamerging import adapt

        return adapt(self.encoder, merge, {t: self.heads[t] for t in tasks}, {t: self.images[(t, "test")] for t in tasks},
                     settings, seed)


@dataclass
class Phase1:
    """Candidate scores (N, M, 4) per test set (:func:`raymerge.dawin.sample_scores` of each candidate, stacked
    on axis 1), the temperatures used, and the candidates themselves (DOE asks for their logits)."""

    scores: dict[Pair, np.ndarray]
    temperatures: dict[str, list[float]]  # task -> one temperature per candidate
    candidates: Sequence[Recipe | Weights] = ()

    @property
    def entropies(self) -> dict[Pair, np.ndarray]:
        """(N, M) entropies at the fitted temperatures."""
        return {p: s[..., dawin.SCORE_COLUMNS.index("entropy")] for p, s in self.scores.items()}


@dataclass
class Outcome:
    """What one DaWin variant reports per test set: predictions (N,), per-sample extras (the columns of
    :mod:`raymerge.diagnostics`, written to the samples Parquet), merged weight sets evaluated, and the
    diagnostics of the set."""

    predictions: dict[Pair, np.ndarray]
    extras: dict[Pair, dict[str, np.ndarray]] = field(default_factory=dict)
    merges: dict[Pair, int] = field(default_factory=dict)
    diagnostics: dict[Pair, Diagnostics] = field(default_factory=dict)


def _temperature(ev: Evaluator, weights: Recipe | Weights, pair: Pair, m: int) -> float:
    try:
        return ev.temperature(weights, pair)
    except ValueError as err:  # non-finite validation logits
        raise ValueError(f"{pair[0]}/{pair[1]}: candidate {m}: {err}; DaWin cannot fit its temperature there: evaluate "
                         f"in fp32 (resources.precision) or check that candidate's weights") from err


def phase1(ev: Evaluator, candidates: Sequence[Recipe | Weights], pairs: list[Pair],
           validation: Mapping[str, Pair | None]) -> Phase1:
    """Temperatures fitted on each task's validation split (its logits travel: temperature scaling needs them,
    and validation splits are small), then each candidate's scores on ``pairs`` at those temperatures."""
    tasks = list(dict.fromkeys(t for t, _ in pairs))
    temperatures = {}
    for t in tasks:
        vp = validation.get(t)
        # temperature scaling on validation (METHODS §4); without a validation split the logits are used as they are
        temperatures[t] = [_temperature(ev, w, vp, m) if vp else 1.0 for m, w in enumerate(candidates)]
    per_model = [ev.scores(w, pairs, {t: temperatures[t][m] for t in tasks}) for m, w in enumerate(candidates)]
    scores = {p: np.stack([s[p] for s in per_model], axis=1) for p in pairs}
    for (task, split), s in scores.items():
        bad = np.isnan(s).any(-1)  # sample_scores leaves NaN where a logit was not finite
        if bad.any():
            n, m = np.argwhere(bad)[0]
            raise ValueError(f"{task}/{split}: candidate {m} has non-finite logits on {int(bad[:, m].sum())} sample(s) "
                             f"(the first: row {n}), so DaWin's entropies are undefined there; evaluate in fp32 "
                             f"(resources.precision) or check that candidate's weights")
    return Phase1(scores, temperatures, candidates)


@dataclass
class DawinRunner:
    """The DaWin variants over one evaluator. ``merge`` maps a coefficient row (M,) to its merge: a recipe (made
    off the driver) or a merged state dict (e.g. ``lambda c: dawin.merge_for(base, finetuned, c, robust=...,
    lam0=...)``).

    ``max_in_flight`` bounds the merged weight sets that exist at once in phase 2: merges are built, evaluated and
    dropped in batches of at most that many (a ViT-L/14 merge is ~1.2 GB in float32). ``names`` label the
    candidates in the diagnostics. ``reference`` is the static merge DaWin is compared with (the merge of uniform
    coefficients: weight average of the two candidates, or task arithmetic at λ0), whose entropy at temperature 1
    on each test set goes beside DaWin's for the mean-entropy comparison. Its scores are read with
    :meth:`Evaluator.scores`, the cached call its own candidate's rows came from: free when the run evaluates that
    merge too, else one more pass per test set, shared by all variants. None: no comparison.

    Every variant returns an :class:`Outcome` whose extras hold the per-sample columns of
    :mod:`raymerge.diagnostics` (stored in the samples Parquet; the report recomputes the diagnostics from them),
    and whose ``diagnostics`` holds the same numbers for the job log (:func:`raymerge.diagnostics.warn_if_weak`).
    """

    ev: Evaluator
    p1: Phase1
    merge: Callable[[np.ndarray], Recipe | StateDict]
    seed: int = 0
    max_in_flight: int = 4
    names: Sequence[str] | None = None
    reference: Recipe | Weights | None = None
    _columns: dict[Pair, dict[str, np.ndarray]] = field(default_factory=dict, init=False, repr=False)
    _reference: dict[Pair, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _coefficients: dict[tuple[Pair, bool], np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer, got {self.max_in_flight!r}")

    def coefficients(self, pair: Pair, offset: bool) -> np.ndarray:
        """(N, M) expertise coefficients of ``pair`` (computed once: :meth:`ahead` asks before the variant runs)."""
        if (pair, offset) not in self._coefficients:
            self._coefficients[pair, offset] = dawin.expertise_coefficients(self.p1.entropies[pair], offset=offset)
        return self._coefficients[pair, offset]

    def sample_columns(self, pairs: Sequence[Pair]) -> dict[Pair, dict[str, np.ndarray]]:
        """The coefficient-independent per-sample columns of each pair (computed once): entropies,
        cross-entropies, oracle coefficients, candidate predictions and correctness."""
        for pair in pairs:
            if pair not in self._columns:
                self._columns[pair] = diagnostics.columns_from_scores(self.p1.scores[pair], self.ev.labels(pair))
        return {p: self._columns[p] for p in pairs}

    @staticmethod
    def _jobs(groups: Mapping[Pair, dawin.MergeGroups]) -> list[tuple[np.ndarray, Pair, np.ndarray]]:
        """Phase 2's merges in the order it makes them: (coefficients (M,), pair, rows) per non-empty group."""
        jobs = []
        for pair, g in groups.items():
            order = np.argsort(g.component, kind="stable")
            counts = np.bincount(g.component, minlength=len(g.table))
            jobs += [(g.table[j], pair, rows) for j, rows in enumerate(np.split(order, np.cumsum(counts)[:-1]))
                     if len(rows)]
        return jobs

    def ahead(self, pairs: Sequence[Pair], offset: bool, mixture: str) -> list[Recipe | StateDict]:
        """The merges of phase 2's first batch in :meth:`mixture`, where phase 1 alone fixes them (mixture ``mean``
        or ``none``: no fit), for a sweep to start making while earlier candidates are evaluated; none for a fitted
        mixture, whose fit runs as a central task when the variant runs."""
        if mixture not in ("mean", "none"):
            return []
        groups = {pair: dawin.merge_groups(self.coefficients(pair, offset), mixture) for pair in pairs}
        return [self.merge(c) for c, _, _ in self._jobs(groups)[: self.max_in_flight]]

    def _phase2(self, groups: Mapping[Pair, dawin.MergeGroups]) -> dict[Pair, np.ndarray]:
        """Phase 2 of every pair at once: scores (N, 4) at temperature 1 where each sample is evaluated by the
        merge of its group only.

        The merges of all pairs go to the evaluator together, so they are made side by side and evaluated back to
        back, in batches of at most ``max_in_flight`` merged weight sets: each batch is merged, evaluated and
        dropped before the next batch is merged. Empty groups get no merge.
        """
        jobs = self._jobs(groups)
        width = len(dawin.SCORE_COLUMNS)
        out = {pair: np.full((len(self.p1.scores[pair]), width), np.nan) for pair in groups}
        for start in range(0, len(jobs), self.max_in_flight):
            batch = jobs[start:start + self.max_in_flight]
            assignments = [(self.merge(c), pair, rows) for c, pair, rows in batch]
            scores = self.ev.scores_rows(assignments)
            del assignments  # before the next batch is merged, so only one batch is ever alive
            for (_, pair, rows), got in zip(batch, scores):
                out[pair][rows] = got
        for (task, split), got in out.items():
            missing = np.isnan(got[:, dawin.SCORE_COLUMNS.index("prediction")])
            if missing.any():
                raise RuntimeError(f"phase 2 of {task}/{split} left {int(missing.sum())} sample(s) unevaluated "
                                   f"(the first: row {int(np.argmax(missing))})")
        return out

    def _outcome(self, pairs: Sequence[Pair], coefficients: Callable[[Pair], np.ndarray], mixture: str | None,
                 k: int = 1) -> Outcome:
        """Per-sample columns, diagnostics and, unless ``mixture`` is None (logit-only variants), the phase-2
        evaluation with the merges of :func:`raymerge.dawin.merge_groups` (every pair's at once)."""
        out = Outcome({})
        columns = self.sample_columns(pairs)
        c = {pair: coefficients(pair) for pair in pairs}
        # the diagnostics' correlations need phase 1 and the coefficients only: central tasks compute them while
        # phase 2 runs on the actors, off the driver (the merged models' mean entropies are added after)
        premise = {pair: self.ev.central(diagnostics.diagnose, {**columns[pair], "coefficients": c[pair]}, self.names)
                   for pair in pairs}
        groups: dict[Pair, dawin.MergeGroups] = {}
        if mixture is not None:
            fitted = mixture in ("beta", "dirichlet")  # EM runs where central statistics run, every pair's at once
            fits = {pair: self.ev.central(dawin.merge_groups, c[pair], mixture, k, self.seed) if fitted else
                    done(dawin.merge_groups(c[pair], mixture, k, self.seed)) for pair in pairs}
            reference = [p for p in pairs if p not in self._reference] if self.reference is not None else []
            if reference:  # while the mixtures are fitted
                static = self.ev.scores(self.reference, reference)
                self._reference.update({p: s[:, dawin.SCORE_COLUMNS.index("entropy_t1")] for p, s in static.items()})
            groups = {pair: fit.result() for pair, fit in fits.items()}
            scores = self._phase2(groups)
        for pair in pairs:
            extras = {**columns[pair], "coefficients": c[pair]}
            if pair in groups:
                g = groups[pair]
                out.predictions[pair] = dawin.score_predictions(scores[pair])
                out.merges[pair] = int(np.count_nonzero(np.bincount(g.component)))
                extras.update(component=g.component, merge_coefficients=g.table[g.component],
                              output_entropy=scores[pair][:, dawin.SCORE_COLUMNS.index("entropy_t1")])
                if pair in self._reference:
                    extras["reference_entropy"] = self._reference[pair]
            out.extras[pair] = extras
            out.diagnostics[pair] = premise[pair].result().with_merged(extras)
        return out

    def mixture(self, pairs: list[Pair], k: int, offset: bool, mixture: str | None = None) -> Outcome:
        """DaWin with its coefficients reduced per test set by ``mixture`` (:func:`raymerge.dawin.merge_groups`:
        ``mean``, ``dirichlet``, ``beta`` or ``none``); the default fits a K-component ``beta`` mixture for two
        candidates and a ``dirichlet`` one for more. A fitted mixture runs where central statistics run."""
        for pair in pairs:
            n = len(self.p1.scores[pair])
            if mixture in (None, "beta", "dirichlet") and not 1 <= k <= n:
                raise InputError(f"methods.dawin.k: {k} mixture components for {pair[0]}/{pair[1]}, which has {n} "
                                 f"samples: k must be in [1, {n}]")
        if mixture is None:
            mixture = dawin.default_mixture(robust=next(iter(self.p1.scores.values())).shape[1] == 2)
        return self._outcome(pairs, lambda pair: self.coefficients(pair, offset), mixture, k)

    def samplewise(self, pairs: list[Pair], offset: bool, scores: Mapping[Pair, np.ndarray] | None = None) -> Outcome:
        """One merge per distinct coefficient row (the slow reference), at most ``max_in_flight`` alive at once;
        ``scores`` replaces the entropies (the oracle's losses)."""
        score = scores if scores else self.p1.entropies
        return self._outcome(pairs, lambda pair: dawin.expertise_coefficients(score[pair], offset=offset), "none")

    def oracle(self, pairs: list[Pair], offset: bool = False) -> Outcome:
        """Pilot oracle (upper bound, uses labels): cross-entropy with the true label in place of entropy."""
        columns = self.sample_columns(pairs)
        return self.samplewise(pairs, offset=offset, scores={p: columns[p]["cross_entropies"] for p in pairs})

    def selection(self, pairs: list[Pair], offset: bool, variant: Literal["dcs", "doe"]) -> Outcome:
        """Dynamic classifier selection (``dcs``: from the candidates' predictions in the scores) or dynamic
        output ensemble (``doe``: from the candidates' logits, which it gathers); no merged model."""
        out = self._outcome(pairs, lambda pair: self.coefficients(pair, offset), None)
        per_model = [self.ev.logits(w, pairs) for w in self.p1.candidates] if variant == "doe" else []
        for pair in pairs:
            c = out.extras[pair]["coefficients"]
            if variant == "dcs":
                out.predictions[pair] = dawin.dynamic_classifier_selection(out.extras[pair]["candidate_predictions"], c)
            else:
                logits = np.stack([lg[pair] for lg in per_model], axis=1)
                out.predictions[pair] = dawin.dynamic_output_ensemble(logits, c, self.p1.temperatures[pair[0]])
        return out
