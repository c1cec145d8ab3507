"""Does prediction entropy stand in for the loss on this test set? DaWin's premise, checked per test set.

DaWin (METHODS §4) weights each candidate by ``exp(−H)``, its prediction entropy, as a label-free stand-in for
``exp(−CE)``, its cross-entropy with the true label (the pilot oracle). Where entropy does not track the loss,
the coefficients carry no information about which candidate is right and DaWin lands on the static
interpolation. The paper checks its premise (DaWin Fig. 2, Figs. 9–12); this module makes the same checks from a
test set's candidate scores (entropies, cross-entropies, predictions; or their logits), pure numpy/scipy:

- the samples split by which candidates are right (Figs. 9–11): for two candidates ``TT``, ``TF``, ``FT``,
  ``FF`` (T = right, F = wrong; first letter = candidate 0, θ0 in the robust setting); for M > 2 candidates one
  group per candidate m, the samples m gets right (groups overlap), and ``none right``; always ``all`` first;
- per split: Pearson and Spearman correlation of each candidate's entropy with its cross-entropy (Fig. 9), and
  of DaWin's entropy-based coefficient with the oracle coefficient (Eq. 1 with cross-entropy in place of
  entropy; Figs. 2, 10). For two candidates the compared value is λ(x), the weight of candidate 1. For M > 2 it
  is the whole (N, M) coefficient matrix flattened: with one coefficient vector per test set (multi-task DaWin)
  what decides the merge is which candidates get weight, i.e. agreement across candidates as well as across
  samples, which per-column correlations would miss;
- the values behind the histograms of entropy-based against oracle coefficients (Fig. 11);
- mean entropies of the candidates, the static merge and DaWin's own output per split (Fig. 12);
- a one-line verdict per test set from ``r``, the Pearson correlation of the coefficient with the oracle
  coefficient over all samples (:func:`verdict`, thresholds :data:`STRONG_CORRELATION` and
  :data:`WEAK_CORRELATION`), and :func:`warn_if_weak` for the job log.

Degenerate splits (fewer than :data:`MIN_SAMPLES` samples, or a constant value) give NaN correlations with the
reason, and no numpy warning. Entropies and cross-entropies are in nats.

Per-sample columns (:func:`sample_columns`; what DaWin stores in the samples Parquet, so the report recomputes
every number here from the stored file and a user can redo the analysis):

=====================  =======  =====================================================================
``entropies``          (N, M)   candidate entropies with the fitted temperatures (what DaWin uses)
``cross_entropies``    (N, M)   candidate cross-entropies with the true label, fitted temperatures
``entropies_t1``       (N, M)   candidate entropies at temperature 1 (compared with merged models')
``coefficients``       (N, M)   per-sample coefficients the variant computed (rows sum to 1)
``oracle_coefficients`` (N, M)  Eq. 1 on ``cross_entropies`` (the pilot oracle's coefficients)
``candidate_predictions`` (N, M) argmax class of each candidate
``candidate_correct``  (N, M)   bool, candidate prediction equals the label
``merge_coefficients`` (N, M)   coefficient row of the merge that evaluated the sample (after the mixture)
``component``          (N,)     merge group of the sample (index into the distinct merges)
``output_entropy``     (N,)     entropy of DaWin's own (phase-2) logits, temperature 1
``reference_entropy``  (N,)     entropy of the static merge (uniform coefficients: task arithmetic at λ0, or the
                                two candidates' weight average), temperature 1
=====================  =======  =====================================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from raymerge import dawin

MIN_SAMPLES = 3
"""Fewer samples than this in a split give NaN correlations (with 2 points any correlation is ±1)."""

STRONG_CORRELATION = 0.7
WEAK_CORRELATION = 0.4
"""Verdict thresholds on r: Schober et al. 2018 (the reference DaWin cites for "strong" correlation) call
|r| ≥ 0.7 strong, 0.4–0.69 moderate and below 0.4 weak. Below :data:`WEAK_CORRELATION` the coefficients say little
about which candidate is right, so DaWin's merges sit near the static interpolation."""

STATIC_LABEL = "static merge"
"""Label of the uniform-coefficient merge's entropy in :attr:`SplitDiagnostics.mean_entropies`: the weight average
of the two candidates (robust setting), task arithmetic at λ0 (multi-task)."""
OUTPUT_LABEL = "DaWin"

log = logging.getLogger("raymerge.dawin")


class Correlation(NamedTuple):
    """Pearson r and Spearman ρ of two per-sample quantities over ``n`` samples; NaN with ``reason`` when undefined."""

    pearson: float
    spearman: float
    n: int
    reason: str = ""

    def __str__(self) -> str:
        if self.reason:
            return f"n/a ({self.reason})"
        # "+ 0.0" turns a rounded −0.00 into 0.00
        return f"{round(self.pearson, 2) + 0.0:.2f} / {round(self.spearman, 2) + 0.0:.2f}"


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    # Pearson r = Σ dx·dy / √(Σ dx² · Σ dy²), clipped against rounding just past ±1
    return float(np.clip((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()), -1.0, 1.0))


def correlation(x: ArrayLike, y: ArrayLike, what: tuple[str, str] = ("x", "y")) -> Correlation:
    """Pearson and Spearman (Pearson on average ranks) correlation of equal-length finite 1-D ``x`` and ``y``.

    NaN, with a reason naming ``what``, for fewer than :data:`MIN_SAMPLES` samples or a constant input.
    """
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    return _correlate(a, b, what, lambda: (rankdata(a), rankdata(b)))


def _correlate(a: np.ndarray, b: np.ndarray, what: tuple[str, str],
               ranks: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Correlation:
    """:func:`correlation` of 1-D float64 ``a`` and ``b`` whose average ranks ``ranks()`` gives (asked for only when
    the correlation is defined)."""
    if a.shape != b.shape:
        raise ValueError(f"{what[0]} has {a.size} values but {what[1]} has {b.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"{what[0]} and {what[1]} must be finite")
    n = a.size
    if n < MIN_SAMPLES:
        return Correlation(math.nan, math.nan, n, f"{n} sample{'s' * (n != 1)}")
    for values, name in ((a, what[0]), (b, what[1])):
        if values.min() == values.max():
            return Correlation(math.nan, math.nan, n, f"constant {name}")
    return Correlation(_pearson(a, b), _pearson(*ranks()), n)


class _Ranks:
    """A column (n,) sorted once, then ranked within any subset of its entries in O(n): a test set's splits
    (:func:`correctness_groups`) would otherwise sort every column once per split."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="stable")
        ordered = values[self.order]
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first sorted position of each tie
        self.ends = np.r_[self.starts[1:], len(values)]
        tie = np.repeat(np.arange(len(self.starts)), self.ends - self.starts)  # tie group of each sorted position
        self.tie = np.empty_like(tie)
        self.tie[self.order] = tie  # ... and of each entry

    def within(self, mask: np.ndarray) -> np.ndarray:
        """The average ranks (1-based; ties share the mean of their ranks, as ``scipy.stats.rankdata``) of the
        entries ``mask`` (n,) bool selects, among themselves, in their order: (mask.sum(),) float64."""
        # masked entries before each sorted position: a tie group's masked members hold the ranks after those
        # before it, up to those at its end, and share their mean
        before = np.r_[0, np.cumsum(mask[self.order])]
        return ((before[self.starts] + 1 + before[self.ends]) / 2)[self.tie[mask]]


def correctness_groups(correct: ArrayLike, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Boolean masks (N,) of the samples split by which candidates are right, ``all`` first.

    ``correct`` (N, M) bool. M = 2: ``TT``, ``TF``, ``FT``, ``FF`` (first letter = candidate 0), disjoint.
    M > 2: ``<name> right`` per candidate (overlapping; ``names`` default ``model m``), then ``none right``.
    """
    ok = np.asarray(correct, dtype=bool)
    if ok.ndim != 2 or ok.shape[1] < 2:
        raise ValueError(f"candidate_correct must be (N, M) with M ≥ 2, got shape {ok.shape}")
    labels = _names(names, ok.shape[1])
    groups = {"all": np.ones(len(ok), dtype=bool)}
    if ok.shape[1] == 2:
        for a in (True, False):
            for b in (True, False):
                groups["TF"[not a] + "TF"[not b]] = (ok[:, 0] == a) & (ok[:, 1] == b)
        return groups
    for m, name in enumerate(labels):
        groups[f"{name} right"] = ok[:, m].copy()
    groups["none right"] = ~ok.any(1)
    return groups


def _names(names: Sequence[str] | None, m: int) -> list[str]:
    if names is None:
        return [f"model {j}" for j in range(m)]
    if len(names) != m:
        raise ValueError(f"got {len(names)} candidate names for M = {m} candidates")
    return [str(n) for n in names]


def compared_values(coefficients: np.ndarray) -> np.ndarray:
    """The coefficient values the diagnostics compare, for (rows of) an (N, M) matrix: λ = column 1 for M = 2
    (N,), the flattened matrix (N·M,) for M > 2 (see the module docstring)."""
    return coefficients[:, 1] if coefficients.shape[1] == 2 else coefficients.ravel()


@dataclass(frozen=True)
class SplitDiagnostics:
    """One split of a test set (see :func:`correctness_groups`)."""

    name: str
    size: int
    entropy_vs_loss: tuple[Correlation, ...]  # one per candidate: its entropy against its cross-entropy
    coefficient_vs_oracle: Correlation  # entropy-based against oracle coefficient (λ for M = 2, all for M > 2)
    mean_entropies: dict[str, float]  # label -> mean entropy over the split in nats (NaN for an empty split)


@dataclass(frozen=True)
class Diagnostics:
    """DaWin's premise on one test set. ``splits[0]`` is ``all``; ``groups`` holds the masks (N,) of the splits;
    ``coefficients`` and ``oracle_coefficients`` are (N, M)."""

    names: tuple[str, ...]
    splits: tuple[SplitDiagnostics, ...]
    groups: dict[str, np.ndarray]
    coefficients: np.ndarray
    oracle_coefficients: np.ndarray

    @property
    def overall(self) -> Correlation:
        """Coefficient against oracle coefficient over all samples: the ``r`` of the verdict."""
        return self.splits[0].coefficient_vs_oracle

    @property
    def weak(self) -> bool:
        """True when r is below :data:`WEAK_CORRELATION` or undefined."""
        r = self.overall.pearson
        return math.isnan(r) or r < WEAK_CORRELATION

    @property
    def verdict(self) -> str:
        return verdict(self.overall)

    def with_merged(self, columns: Mapping[str, Any]) -> Diagnostics:
        """These diagnostics with the mean entropies of the merged models' columns (``reference_entropy``,
        ``output_entropy``) added: :func:`diagnose` of the columns with them, without redoing the correlations."""
        merged = _merged_entropies(columns, len(self.coefficients))
        return replace(self, splits=tuple(
            replace(s, mean_entropies={**s.mean_entropies, **_means(self.groups[s.name], merged)}) for s in self.splits))

    def split(self, name: str) -> SplitDiagnostics:
        return next(s for s in self.splits if s.name == name)

    def histogram(self, split: str, bins: int | ArrayLike = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histogram data of entropy-based against oracle coefficients on ``split`` (DaWin Fig. 11): bin edges over
        [0, 1] and the counts of each (the values of :func:`compared_values`)."""
        edges = np.linspace(0.0, 1.0, bins + 1) if isinstance(bins, int) else np.asarray(bins, dtype=np.float64)
        mask = self.groups[split]
        counts = [np.histogram(compared_values(c[mask]), bins=edges)[0]
                  for c in (self.coefficients, self.oracle_coefficients)]
        return edges, counts[0], counts[1]


def _merged_entropies(columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    """The merged models' per-sample entropies among ``columns`` (the static merge's, DaWin's own), by label."""
    return {label: np.asarray(columns[column], dtype=np.float64).reshape(n)
            for column, label in (("reference_entropy", STATIC_LABEL), ("output_entropy", OUTPUT_LABEL))
            if column in columns}


def _means(mask: np.ndarray, per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean entropy (nats) over the samples of ``mask`` of each per-sample column, by label; NaN for no sample."""
    return {label: float(v[mask].mean()) if mask.any() else math.nan for label, v in per_sample.items()}


def verdict(r: Correlation) -> str:
    """One line on whether entropy tracks the loss, from the coefficient–oracle correlation over a test set."""
    if r.reason:
        return f"cannot tell whether entropy tracks the loss here ({r.reason})"
    if r.pearson >= STRONG_CORRELATION:
        return f"entropy tracks the loss here (r = {r.pearson:.2f})"
    if r.pearson >= WEAK_CORRELATION:
        return f"entropy tracks the loss only moderately here (r = {r.pearson:.2f})"
    return f"entropy does not track the loss here (r = {r.pearson:.2f}): expect DaWin ≈ static interpolation"


def _matrix(columns: Mapping[str, Any], name: str, shape: tuple[int, ...] | None, dtype: type) -> np.ndarray:
    if name not in columns:
        raise KeyError(f"per-sample column {name!r} is missing")
    a = np.asarray(columns[name], dtype=dtype)
    if a.ndim != 2 or (shape is not None and a.shape != shape):
        raise ValueError(f"per-sample column {name!r} must be {shape or '(N, M)'}, got shape {a.shape}")
    return a


def diagnose(columns: Mapping[str, Any], names: Sequence[str] | None = None) -> Diagnostics:
    """Diagnostics of one test set from its per-sample columns (:func:`sample_columns`, or a samples file).

    Needs ``entropies``, ``cross_entropies``, ``coefficients``, ``oracle_coefficients`` and
    ``candidate_correct``, each (N, M). The mean-entropy table uses ``entropies_t1`` (labelled by ``names``),
    ``reference_entropy`` (:data:`STATIC_LABEL`) and ``output_entropy`` (:data:`OUTPUT_LABEL`) where present:
    all at temperature 1, since merged models have no fitted temperature.
    """
    h = _matrix(columns, "entropies", None, np.float64)
    n, m = h.shape
    ce = _matrix(columns, "cross_entropies", (n, m), np.float64)
    coefficients = _matrix(columns, "coefficients", (n, m), np.float64)
    oracle = _matrix(columns, "oracle_coefficients", (n, m), np.float64)
    groups = correctness_groups(_matrix(columns, "candidate_correct", (n, m), bool), names)
    labels = _names(names, m)
    per_sample: dict[str, np.ndarray] = {}
    if "entropies_t1" in columns:
        per_sample.update(zip(labels, _matrix(columns, "entropies_t1", (n, m), np.float64).T))
    per_sample.update(_merged_entropies(columns, n))

    # entropy against cross-entropy per candidate, then coefficient against oracle coefficient (compared values:
    # (N,) for M = 2, the (N·M,) flattened matrix for M > 2), each column sorted once for every split
    pairs = [(h[:, j], ce[:, j]) for j in range(m)] + [(compared_values(coefficients), compared_values(oracle))]
    ranks = [(_Ranks(x), _Ranks(y)) for x, y in pairs]
    what = [("entropy", "cross-entropy")] * m + [("coefficient", "oracle coefficient")]

    def corr(i: int, rows: np.ndarray) -> Correlation:
        (x, y), (rx, ry) = pairs[i], ranks[i]
        return _correlate(x[rows], y[rows], what[i], lambda: (rx.within(rows), ry.within(rows)))

    splits = []
    for name, mask in groups.items():
        size = int(mask.sum())
        splits.append(SplitDiagnostics(
            name, size, tuple(corr(j, mask) for j in range(m)), corr(m, mask if m == 2 else np.repeat(mask, m)),
            _means(mask, per_sample),
        ))
    return Diagnostics(tuple(labels), tuple(splits), groups, coefficients, oracle)


def sample_columns(
    logits: ArrayLike, labels: ArrayLike, temperatures: float | ArrayLike, coefficients: ArrayLike | None = None
) -> dict[str, np.ndarray]:
    """Per-sample columns of one test set from the candidates' logits (N, M, C), labels (N,), temperatures (M,)
    (or one scalar) and, when given, the coefficients (N, M) the variant computed.

    Returns ``entropies``, ``cross_entropies``, ``entropies_t1``, ``oracle_coefficients``,
    ``candidate_predictions``, ``candidate_correct`` (and ``coefficients``); see the module docstring.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3 or z.shape[1] < 2:
        raise ValueError(f"need the logits of M ≥ 2 candidates, (N, M, C), got shape {z.shape}")
    t = np.broadcast_to(np.asarray(temperatures, dtype=np.float64), (z.shape[1],))
    scores = np.stack([dawin.sample_scores(z[:, m], labels, t[m]) for m in range(z.shape[1])], axis=1)
    return columns_from_scores(scores, labels, coefficients)


def columns_from_scores(scores: ArrayLike, labels: ArrayLike, coefficients: ArrayLike | None = None
                        ) -> dict[str, np.ndarray]:
    """:func:`sample_columns` from the candidates' per-sample scores (N, M, 4) of
    :func:`raymerge.dawin.sample_scores` (what the actors send back instead of logits) and the labels (N,)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3 or s.shape[1] < 2 or s.shape[2] != len(dawin.SCORE_COLUMNS):
        raise ValueError(f"need the scores of M ≥ 2 candidates, (N, M, {len(dawin.SCORE_COLUMNS)}), got shape {s.shape}")
    entropies, entropies_t1, ce = (s[..., dawin.SCORE_COLUMNS.index(c)] for c in ("entropy", "entropy_t1", "cross_entropy"))
    predictions = dawin.score_predictions(s)
    columns = {
        "entropies": entropies,
        "cross_entropies": ce,
        "entropies_t1": entropies_t1,
        # the pilot oracle: Eq. 1 with the cross-entropy in place of the entropy
        "oracle_coefficients": dawin.expertise_coefficients(ce),
        "candidate_predictions": predictions,
        "candidate_correct": predictions == np.asarray(labels)[:, None],
    }
    if coefficients is not None:
        c = np.asarray(coefficients, dtype=np.float64)
        if c.shape != s.shape[:2]:
            raise ValueError(f"coefficients of shape {c.shape} do not match scores of shape {s.shape}")
        columns["coefficients"] = c
    return columns


def diagnose_logits(
    logits: ArrayLike,
    labels: ArrayLike,
    temperatures: float | ArrayLike,
    coefficients: ArrayLike,
    *,
    names: Sequence[str] | None = None,
    static_logits: ArrayLike | None = None,
    output_logits: ArrayLike | None = None,
) -> Diagnostics:
    """:func:`diagnose` straight from logits: candidates (N, M, C), labels (N,), temperatures (M,), the
    coefficients used (N, M); optionally the static merge's logits and DaWin's own logits, each (N, C), for the
    mean-entropy comparison (temperature 1)."""
    columns = sample_columns(logits, labels, temperatures, coefficients)
    if static_logits is not None:
        columns["reference_entropy"] = dawin.entropy(static_logits)
    if output_logits is not None:
        columns["output_entropy"] = dawin.entropy(output_logits)
    return diagnose(columns, names)


def warn_if_weak(diagnostics: Mapping[Any, Diagnostics], logger: logging.Logger | None = None) -> list[str]:
    """Log a warning for each test set whose r is weak or undefined; returns the messages.

    Keys name the test sets (a ``(task, split)`` pair is written ``task/split``). ``logger`` defaults to
    ``raymerge.dawin``.
    """
    messages = []
    for key, d in diagnostics.items():
        if d.weak:
            name = "/".join(key) if isinstance(key, tuple) else str(key)
            messages.append(f"DaWin on {name}: {d.verdict}")
            (logger or log).warning(messages[-1])
    return messages
