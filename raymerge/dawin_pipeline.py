"""DaWin's two-phase evaluation (METHODS §4), written once against a small :class:`Evaluator` interface.

1. phase 1: logits of every candidate model on every test set (sharded over the workers, cached);
2. central: temperatures on validation, entropies, coefficients with domain statistics, mixture fit
   (a Ray task on a cluster), component of each sample;
3. the K merged weight sets are built once each;
4. phase 2: each sample is evaluated with its component's merged model only.

The Ray worker pool (:class:`raymerge.pipeline.Run`) and :class:`LocalEvaluator` (one process, no Ray) both
implement :class:`Evaluator`, so the single-process reference runs exactly this code with another evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from raymerge import dawin, models
from raymerge.statedict import StateDict, to_numpy

Pair = tuple[str, str]  # (task, split)
Weights = Mapping[str, np.ndarray]


class Evaluator(Protocol):
    def logits(self, weights: Weights, pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        """(N, C) logits of ``weights`` on each whole (task, split)."""

    def logits_rows(self, assignments: Sequence[tuple[Weights, np.ndarray]], pair: Pair) -> np.ndarray:
        """(N, C) logits of ``pair`` where the rows of each assignment use that assignment's weights."""

    def central(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` where central statistics are computed (a Ray task, or inline)."""

    def labels(self, pair: Pair) -> np.ndarray: ...


class LocalEvaluator:
    """Single-process reference evaluator: one resident encoder, preprocessed datasets, no Ray."""

    def __init__(self, architecture: str, heads: Mapping[str, models.Head], sets: Mapping[Pair, Any], batch_size: int) -> None:
        self.encoder = models.build_encoder(architecture)
        size = models.image_size(architecture)
        self.heads = heads
        self.images = {p: models.preprocess(ds.images, size) for p, ds in sets.items()}
        self._labels = {p: ds.labels for p, ds in sets.items()}
        self.batch_size = batch_size

    def logits(self, weights: Weights, pairs: list[Pair]) -> dict[Pair, np.ndarray]:
        models.load_weights_in_place(self.encoder, weights)
        return {p: models.predict_logits(self.encoder, self.heads[p[0]], self.images[p], self.batch_size) for p in pairs}

    def logits_rows(self, assignments: Sequence[tuple[Weights, np.ndarray]], pair: Pair) -> np.ndarray:
        out = np.full((len(self.images[pair]), self.heads[pair[0]].num_classes), np.nan, dtype=np.float32)
        for weights, rows in assignments:
            models.load_weights_in_place(self.encoder, weights)
            out[rows] = models.predict_logits(self.encoder, self.heads[pair[0]], self.images[pair][rows], self.batch_size)
        return out

    def central(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def labels(self, pair: Pair) -> np.ndarray:
        return self._labels[pair]


@dataclass
class Phase1:
    """Candidate logits (N, M, C) and entropies (N, M) per test set, and the temperatures used."""

    logits: dict[Pair, np.ndarray]
    entropies: dict[Pair, np.ndarray]
    temperatures: dict[str, list[float]]  # task -> one temperature per candidate


@dataclass
class Outcome:
    """What one DaWin variant reports per test set: predictions (N,), per-sample extras, merges built."""

    predictions: dict[Pair, np.ndarray]
    extras: dict[Pair, dict[str, np.ndarray]] = field(default_factory=dict)
    merges: dict[Pair, int] = field(default_factory=dict)


def phase1(ev: Evaluator, candidates: Sequence[Weights], pairs: list[Pair], validation: Mapping[str, Pair | None]) -> Phase1:
    """Logits of each candidate on ``pairs`` and on each task's validation split; temperatures fitted there."""
    tasks = list(dict.fromkeys(t for t, _ in pairs))
    val_pairs = [validation[t] for t in tasks if validation.get(t)]
    per_model = [ev.logits(w, pairs + val_pairs) for w in candidates]
    temperatures = {}
    for t in tasks:
        vp = validation.get(t)
        # temperature scaling on validation (METHODS §4); without a validation split the logits are used as they are
        temperatures[t] = [dawin.fit_temperature(lg[vp], ev.labels(vp)) if vp else 1.0 for lg in per_model]
    logits = {p: np.stack([lg[p] for lg in per_model], axis=1) for p in pairs}
    entropies = {p: dawin.entropy(logits[p], temperatures[p[0]]) for p in pairs}
    return Phase1(logits, entropies, temperatures)


def _mixture_assignments(coefficients: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    mixture = dawin.fit_coefficient_mixture(coefficients, k, seed=seed)
    return dawin.mixture_merge_coefficients(mixture, coefficients)


@dataclass
class DawinRunner:
    """The DaWin variants over one evaluator. ``merge`` maps a coefficient row (M,) to a merged state dict."""

    ev: Evaluator
    p1: Phase1
    merge: Callable[[np.ndarray], StateDict]
    seed: int = 0

    def coefficients(self, pair: Pair, offset: bool) -> np.ndarray:
        return dawin.expertise_coefficients(self.p1.entropies[pair], offset=offset)

    def _evaluate(self, pair: Pair, rows_by_coeff: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Phase 2: each (coefficient row, member rows) gets one merged model evaluated on its members only."""
        assignments = [(to_numpy(self.merge(c)), rows) for c, rows in rows_by_coeff if len(rows)]
        return self.ev.logits_rows(assignments, pair).argmax(1)

    def mixture(self, pairs: list[Pair], k: int, offset: bool) -> Outcome:
        """DaWin with a K-component mixture per test set: K merges per set instead of N."""
        out = Outcome({})
        for pair in pairs:
            c = self.coefficients(pair, offset)
            if not 1 <= k <= len(c):
                raise ValueError(f"dawin k must be in [1, N={len(c)}] for {pair[0]}/{pair[1]}, got {k}")
            component, table = self.ev.central(_mixture_assignments, c, k, self.seed)
            groups = [(table[j], np.flatnonzero(component == j)) for j in range(len(table))]
            out.predictions[pair] = self._evaluate(pair, groups)
            out.extras[pair] = {"coefficients": c, "component": component, "entropies": self.p1.entropies[pair]}
            out.merges[pair] = sum(1 for _, rows in groups if len(rows))
        return out

    def samplewise(self, pairs: list[Pair], offset: bool, scores: Mapping[Pair, np.ndarray] | None = None) -> Outcome:
        """One merge per sample (the slow reference); ``scores`` replaces entropies (the oracle's losses)."""
        out = Outcome({})
        for pair in pairs:
            c = dawin.expertise_coefficients(scores[pair], offset=offset) if scores else self.coefficients(pair, offset)
            out.predictions[pair] = self._evaluate(pair, [(c[i], np.array([i])) for i in range(len(c))])
            out.extras[pair] = {"coefficients": c}
            out.merges[pair] = len(c)
        return out

    def oracle(self, pairs: list[Pair], offset: bool = False) -> Outcome:
        """Pilot oracle (upper bound, uses labels): cross-entropy with the true label in place of entropy."""
        scores = {}
        for pair in pairs:
            scores[pair] = dawin.oracle_losses(self.p1.logits[pair], self.ev.labels(pair), self.p1.temperatures[pair[0]])
        return self.samplewise(pairs, offset=offset, scores=scores)

    def selection(self, pairs: list[Pair], offset: bool) -> tuple[Outcome, Outcome]:
        """Dynamic classifier selection and dynamic output ensemble: logits only, no merged model."""
        dcs, doe = Outcome({}), Outcome({})
        for pair in pairs:
            c = self.coefficients(pair, offset)
            dcs.predictions[pair] = dawin.dynamic_classifier_selection(self.p1.logits[pair], c)
            doe.predictions[pair] = dawin.dynamic_output_ensemble(self.p1.logits[pair], c, self.p1.temperatures[pair[0]])
            dcs.extras[pair] = doe.extras[pair] = {"coefficients": c, "entropies": self.p1.entropies[pair]}
        return dcs, doe
