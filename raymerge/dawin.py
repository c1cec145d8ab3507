"""DaWin: per-sample merge coefficients from the candidates' output entropies (METHODS §4, DaWin §3 and App. A.1).

Everything here is pure math on arrays of logits, entropies and coefficients, computed in float64:

- :func:`entropy`, :func:`oracle_losses` and :func:`fit_temperature` turn logits into expertise scores;
  :func:`sample_scores` is all of them for one model, the reduction the actors run on their shard's logits;
- :func:`expertise_coefficients` turns scores into coefficients (Eq. 1, its many-model softmax, Eq. 2);
- :func:`dynamic_classifier_selection` (on the candidates' predictions), :func:`dynamic_output_ensemble` and
  :func:`output_ensemble` are the logit-only variants (DaWin Table 6), which need no merged model;
- :func:`merge_groups` reduces N per-sample coefficients to the few merges actually built (``mixture``: the
  per-test-set ``mean`` of the released multi-task code, a fitted ``beta`` or ``dirichlet`` mixture, or ``none``:
  one merge per distinct coefficient row); :func:`fit_coefficient_mixture` and
  :func:`mixture_merge_coefficients` are its fitted-mixture steps;
- :func:`merge_for` is the merge one coefficient row stands for, over state dicts.

Shapes: ``N`` samples, ``M`` candidate models, ``C`` classes, ``K`` mixture components. Logits of several models
are passed as one (N, M, C) array or as a list of M arrays (N, C). Entropies and losses are in nats.
Coefficient matrices are (N, M) with rows summing to 1; for two models, column 1 is the paper's λ(x), the weight
of the fine-tuned model θ1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from raymerge.merge import interpolate, task_arithmetic
from raymerge.mixture import BetaMixture, DirichletMixture, check_finite_array
from raymerge.statedict import StateDict

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Search range of :func:`fit_temperature`; the released code hard-codes T ≈ 0.96–0.97 for CLIP ViT-B/32."""

TEMPERATURE_XATOL = 1e-6


def _as_logits(logits: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Validated float64 logits, (N, C) or (N, M, C); a list of M arrays (N, C) is stacked to (N, M, C)."""
    if isinstance(logits, (list, tuple)):
        logits = np.stack([np.asarray(z, dtype=np.float64) for z in logits], axis=1)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim not in (2, 3) or z.shape[0] == 0 or z.shape[-1] == 0:
        raise ValueError(f"logits must be (N, C) or (N, M, C) with N, C ≥ 1, got shape {z.shape}")
    check_finite_array(z, "logits")
    return z


def _as_temperature(temperature: float | ArrayLike, z: np.ndarray) -> np.ndarray:
    """Temperatures broadcastable against ``z``: a scalar, or one per model (M,) for (N, M, C) logits."""
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim == 1 and z.ndim == 3 and len(t) == z.shape[1]:
        t = t[:, None]
    elif t.ndim != 0:
        raise ValueError(f"temperature must be a scalar or one per model ({z.shape[1:-1]}), got shape {t.shape}")
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"temperatures must be positive and finite, got {temperature}")
    return t


def _log_probs(z: np.ndarray, temperature: float | ArrayLike) -> np.ndarray:
    """Log-softmax over classes of validated logits divided by the temperature (temperature scaling).

    The normaliser is ``log1p`` of the other classes' mass (relative to the largest logit's) rather than the log of
    1 plus it (scipy's and torch's log-softmax): a confident sample's top log-probability ≈ −ε then keeps its
    relative precision, and with it a small entropy or loss (log(1 + ε) loses ~1e-12 of it at an entropy of 1e-4).
    """
    shifted = z / _as_temperature(temperature, z)
    top = shifted.argmax(-1)[..., None]
    shifted -= np.take_along_axis(shifted, top, -1)
    rest = np.exp(shifted)
    np.put_along_axis(rest, top, 0.0, -1)  # exp(0) = 1 of the largest, left out of the sum; ties keep theirs
    return shifted - np.log1p(rest.sum(-1, keepdims=True))


def _as_labels(labels: ArrayLike, z: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (z.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({z.shape[0]},), got {y.dtype} of shape {y.shape}")
    outside = np.flatnonzero((y < 0) | (y >= z.shape[-1]))
    if len(outside):
        raise ValueError(f"label {y[outside[0]]} at index {outside[0]} is outside the {z.shape[-1]} classes")
    return y


def _cross_entropy(z: np.ndarray, y: np.ndarray, temperature: float | ArrayLike) -> np.ndarray:
    return _label_loss(_log_probs(z, temperature), y)


def _label_loss(logp: np.ndarray, y: np.ndarray) -> np.ndarray:
    index = y.reshape((-1,) + (1,) * (logp.ndim - 1))
    # cross-entropy with the true label, l(f(x), y) = −log p_y
    return -np.take_along_axis(logp, index, axis=-1)[..., 0]


def _entropy(logp: np.ndarray) -> np.ndarray:
    return -(np.exp(logp) * logp).sum(-1)  # Shannon entropy H(p) = −Σc pc log pc


def entropy(logits: ArrayLike | Sequence[ArrayLike], temperature: float | ArrayLike = 1.0) -> np.ndarray:
    """Softmax entropies in nats: (N, C) logits → (N,); (N, M, C) or a list of M (N, C) → (N, M).

    ``temperature`` divides the logits before the softmax: a scalar, or one per model (M,). Computed from the
    log-softmax, so large logits do not overflow.
    """
    return _entropy(_log_probs(_as_logits(logits), temperature))


def oracle_losses(
    logits: ArrayLike | Sequence[ArrayLike], labels: ArrayLike, temperature: float | ArrayLike = 1.0
) -> np.ndarray:
    """Cross-entropy losses with the true labels (N,) in nats: (N,) or (N, M) like :func:`entropy`.

    The pilot oracle (DaWin §2, an upper bound that uses labels) feeds these to :func:`expertise_coefficients`
    in place of the entropies.
    """
    z = _as_logits(logits)
    return _cross_entropy(z, _as_labels(labels, z), temperature)


SCORE_COLUMNS = ("entropy", "entropy_t1", "cross_entropy", "prediction")
"""The columns of :func:`sample_scores`, in order."""


def sample_scores(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """What DaWin needs of one model's (N, C) logits, per sample: (N, 4) float64 with the columns of
    :data:`SCORE_COLUMNS`: entropy at ``temperature``, entropy at temperature 1, cross-entropy with ``labels`` (N,)
    at ``temperature`` (nats), and the argmax class (exact in float64).

    Computed where the logits are (on the actors), so that these four numbers per sample travel instead of C. A
    sample with a non-finite logit (an overflow under fp16, say) keeps its argmax and gets NaN scores: whoever
    uses the scores decides what that means, rather than the whole evaluation failing here."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"sample_scores takes one model's logits (N, C), got shape {z.shape}")
    y = _as_labels(labels, z)
    out = np.full((len(z), len(SCORE_COLUMNS)), np.nan)
    out[:, 3] = z.argmax(-1)
    finite = np.isfinite(z).all(-1)
    zf = z[finite]
    if len(zf):
        logp = _log_probs(zf, temperature)  # one log-softmax for the entropy and the cross-entropy
        out[finite, 0] = _entropy(logp)
        out[finite, 1] = out[finite, 0] if float(temperature) == 1.0 else _entropy(_log_probs(zf, 1.0))
        out[finite, 2] = _label_loss(logp, y[finite])
    return out


def score_predictions(scores: ArrayLike) -> np.ndarray:
    """The argmax classes (...,) int64 in scores (..., 4) of :func:`sample_scores`."""
    return np.asarray(scores)[..., SCORE_COLUMNS.index("prediction")].astype(np.int64)


def fit_temperature(
    logits: ArrayLike, labels: ArrayLike, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the mean NLL of ``softmax(logits / T)``.

    ``logits`` (N, C) of one model on a labelled validation split, ``labels`` (N,). Bounded Brent search over
    ``log T`` in ``bounds`` (default 0.05 to 20). The NLL is convex in 1/T, hence unimodal in log T, so the search
    finds the global minimum in the range; a result at a bound means the optimum lies beyond it. Separable
    validation data has its NLL falling to 0 as T → 0, so the result is then a small T on the float64 plateau
    where the NLL is 0. Returns T as a float (dimensionless).
    """
    z = _as_logits(logits)
    if z.ndim != 2:
        raise ValueError(f"fit_temperature takes one model's logits (N, C), got shape {z.shape}")
    y = _as_labels(labels, z)
    low, high = bounds
    if not 0 < low < high < np.inf:
        raise ValueError(f"temperature bounds must satisfy 0 < low < high, got {bounds}")
    result = minimize_scalar(
        lambda log_t: _cross_entropy(z, y, np.exp(log_t)).mean(),
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": TEMPERATURE_XATOL},
    )
    return float(np.exp(result.x))


def _as_matrix(values: ArrayLike, what: str) -> np.ndarray:
    """Validated float64 (N, M) matrix with N ≥ 1, M ≥ 2 and finite entries; errors name the offending cell."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N samples, M models), got {a.ndim}-D of shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{what} has no samples (N = 0)")
    if a.shape[1] < 2:
        raise ValueError(f"{what} needs at least 2 candidate models, got M = {a.shape[1]}")
    check_finite_array(a, what)
    return a


def expertise_coefficients(entropies: ArrayLike, offset: bool = False) -> np.ndarray:
    """Per-sample merge coefficients (N, M), rows summing to 1, from entropies (N, M) in nats.

    Without offset: the softmax over models of −H (DaWin Eq. 1 for M = 2, where column 1 is λ(x); METHODS §4
    "Many models" for M > 2). With ``offset=True`` (M = 2 only, N ≥ 2): DaWin Eq. 2 with the domain statistics
    taken over the N rows (unbiased std, as in the released code); column 0 is 1 − λ. Eq. 2 is evaluated in log
    space, so it stays exact when exp(−H) underflows (H in the hundreds, e.g. oracle losses).
    Pass :func:`oracle_losses` instead of entropies for the pilot oracle.
    """
    h = _as_matrix(entropies, "entropies")
    if not offset:
        return softmax(-h, axis=1)  # DaWin Eq. 1, and its many-model form: softmax over models of −H
    if h.shape[1] != 2:
        raise ValueError(f"the offset adjustment (DaWin Eq. 2) is defined for M = 2 models, got M = {h.shape[1]}")
    if h.shape[0] < 2:
        raise ValueError("the offset adjustment needs the entropies of at least 2 samples (an unbiased std)")
    mean = h.mean(0)
    if np.any(mean <= 0):
        raise ValueError(f"the offset adjustment needs a positive mean entropy per model, got means {mean.tolist()}")
    offset_o = 0.5 * (h.std(0, ddof=1) / mean).sum()  # DaWin Eq. 2 O(X): mean coefficient of variation
    relative_t = mean.sum() / mean[0]  # DaWin Eq. 2 T(X): relative domain expertise
    with np.errstate(divide="ignore"):
        log_o = np.log(offset_o)  # −inf when both stds are 0, and then Eq. 2 reduces to Eq. 1
    # DaWin Eq. 2: λ = (e^−H1 + O/T) / (e^−H0 + e^−H1 + O)
    log_numerator = np.logaddexp(-h[:, 1], log_o - np.log(relative_t))
    log_denominator = np.logaddexp(np.logaddexp(-h[:, 0], -h[:, 1]), log_o)
    lam = np.exp(log_numerator - log_denominator)
    return np.column_stack([1 - lam, lam])


def _candidate_logits(logits: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    z = _as_logits(logits)
    if z.ndim != 3:
        raise ValueError(f"need the logits of M candidate models, (N, M, C), got shape {z.shape}")
    return z


def _logits_and_coefficients(
    logits: ArrayLike | Sequence[ArrayLike], coefficients: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    z = _candidate_logits(logits)
    c = _as_matrix(coefficients, "coefficients")
    if c.shape != z.shape[:2]:
        raise ValueError(f"coefficients of shape {c.shape} do not match logits of shape {z.shape}")
    return z, c


def dynamic_classifier_selection(predictions: ArrayLike, coefficients: ArrayLike) -> np.ndarray:
    """DCS (DaWin Table 6): each sample takes the prediction of its highest-coefficient model.

    ``predictions`` (N, M) the candidates' predicted classes, ``coefficients`` (N, M) → predicted classes (N,).
    With Eq. 1 coefficients the selected model is the lowest-entropy one; ties go to the lower model index.
    """
    p, c = np.asarray(predictions), _as_matrix(coefficients, "coefficients")
    if p.shape != c.shape:
        raise ValueError(f"predictions of shape {p.shape} do not match coefficients of shape {c.shape}")
    return p[np.arange(len(p)), c.argmax(1)]


def dynamic_output_ensemble(
    logits: ArrayLike | Sequence[ArrayLike], coefficients: ArrayLike, temperature: float | ArrayLike = 1.0
) -> np.ndarray:
    """DOE (DaWin Table 6): argmax of the coefficient-weighted average of the models' softmax outputs.

    ``logits`` (N, M, C), ``coefficients`` (N, M), ``temperature`` a scalar or (M,) → predicted classes (N,).
    """
    z, c = _logits_and_coefficients(logits, coefficients)
    probs = np.exp(_log_probs(z, temperature))
    return np.einsum("nm,nmc->nc", c, probs).argmax(1)  # METHODS §4 DOE: Σm λm(x) softmax(zm(x))


def output_ensemble(logits: ArrayLike | Sequence[ArrayLike], temperature: float | ArrayLike = 1.0) -> np.ndarray:
    """Output ensemble (METHODS §1): argmax of the plain average of the softmax outputs, (N, M, C) → (N,)."""
    z = _candidate_logits(logits)
    return dynamic_output_ensemble(z, np.full(z.shape[:2], 1.0 / z.shape[1]), temperature)


def fit_coefficient_mixture(
    coefficients: ArrayLike, n_components: int, seed: int = 0, **options: int | float
) -> BetaMixture | DirichletMixture:
    """Fit the mixture that reduces per-sample coefficients (N, M) to K merges (METHODS §4 "Mixture modeling").

    M = 2: a :class:`BetaMixture` on λ (column 1). M > 2: a :class:`DirichletMixture` on the rows. ``options``
    go to the mixture (``n_init``, ``tol``, ``max_iter``).
    """
    c = _as_matrix(coefficients, "coefficients")
    if c.shape[1] == 2:
        return BetaMixture(n_components, seed=seed, **options).fit(c[:, 1])
    return DirichletMixture(n_components, seed=seed, **options).fit(c)


def mixture_merge_coefficients(
    mixture: BetaMixture | DirichletMixture, coefficients: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Component of each sample (N,) and the merge coefficients of each component (K, M).

    Each sample joins its most likely component (posterior argmax); a component's coefficients are its mean:
    the Beta mean ``a/(a+b)`` as λ in column 1 and ``1 − λ`` in column 0 (M = 2), or the Dirichlet mean vector
    ``α/Σα`` (M > 2). Components with no members still have a (finite) row.
    """
    c = _as_matrix(coefficients, "coefficients")
    if isinstance(mixture, BetaMixture):
        if c.shape[1] != 2:
            raise ValueError(f"a BetaMixture models 2 candidate models, got coefficients for M = {c.shape[1]}")
        return mixture.predict(c[:, 1]), np.column_stack([1 - mixture.means_, mixture.means_])
    return mixture.predict(c), mixture.means_.copy()


MIXTURES = ("mean", "dirichlet", "beta", "none")
"""How :func:`merge_groups` turns per-sample coefficients into merges (see there)."""


class MergeGroups(NamedTuple):
    """Which merge evaluates each sample: ``component`` (N,) indexes the rows of ``table`` (K, M), the coefficient
    rows of the K merges (each row sums to 1). Every row of ``table`` has at least one member, except the empty
    components a fitted mixture may keep."""

    component: np.ndarray
    table: np.ndarray


def default_mixture(robust: bool) -> str:
    """The mixture that reproduces the released code: ``beta`` for two candidates (robust fine-tuning), ``mean``
    for many (multi-task: one coefficient vector per test set, the mean of the per-sample vectors)."""
    return "beta" if robust else "mean"


def merge_groups(coefficients: ArrayLike, mixture: str, k: int = 1, seed: int = 0) -> MergeGroups:
    """Reduce per-sample coefficients (N, M) of one test set to the merges that evaluate them.

    ``mixture``:

    - ``mean``: one merge for the whole test set with the arithmetic mean of the N coefficient vectors, exactly
      ``np.mean(coefficients, axis=0)`` in float64. This is what the released multi-task code does in effect: its
      "K = 1 Dirichlet mixture" silently fits T components whose parameters are responsibility-weighted means of
      the vectors, and merges with component 0's; re-running its algorithm on random coefficient sets, that is the
      plain mean within 3e-4 on most draws (on some, component 0 settles on a sub-cluster, 0.07–0.14 away). It
      uses the test set's identity: every sample of the set shares one vector. ``k`` is ignored.
    - ``beta`` (M = 2 only) / ``dirichlet``: a K-component mixture fitted by EM (:func:`fit_coefficient_mixture`);
      each sample takes its most likely component's mean (:func:`mixture_merge_coefficients`); ``k`` ≤ N.
    - ``none``: one merge per distinct coefficient row (the sample-wise reference; samples with identical rows
      share one merge); ``k`` is ignored. Rows come out in lexicographic order.
    """
    c = _as_matrix(coefficients, "coefficients")
    if mixture == "mean":
        return MergeGroups(np.zeros(len(c), dtype=np.int64), np.mean(c, axis=0)[None, :])
    if mixture == "none":
        table, component = np.unique(c, axis=0, return_inverse=True)
        return MergeGroups(component.reshape(-1).astype(np.int64), table)
    if mixture not in ("beta", "dirichlet"):
        raise ValueError(f"mixture must be one of {', '.join(MIXTURES)}, got {mixture!r}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(c):
        raise ValueError(f"mixture k must be an integer in [1, N={len(c)}], got {k!r}")
    if mixture == "beta":
        if c.shape[1] != 2:
            raise ValueError(f"a beta mixture models 2 candidates (λ), got M = {c.shape[1]}: use dirichlet or mean")
        fitted: BetaMixture | DirichletMixture = BetaMixture(k, seed=seed).fit(c[:, 1])
    else:
        fitted = DirichletMixture(k, seed=seed).fit(c)
    component, table = mixture_merge_coefficients(fitted, c)
    return MergeGroups(component.astype(np.int64), table)


def merge_for(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    coefficients: ArrayLike,
    *,
    robust: bool,
    lam0: float = 0.3,
    names: Sequence[str] | None = None,
) -> StateDict:
    """The merged state dict one DaWin coefficient row (M,) stands for (METHODS §4).

    ``robust=True``: the candidates are θ0 = ``base`` and θ1 = ``finetuned[0]`` (exactly one fine-tuned model,
    M = 2): ``(1−λ) θ0 + λ θ1`` with λ = ``coefficients[1]`` (``lam0`` unused). ``robust=False`` (multi-task): the
    candidates are θ0 + τt for the T = M models of ``finetuned``: ``θ0 + λ0·T·Σt λt τt``, so uniform coefficients
    give task arithmetic at ``lam0``. Computed by :func:`raymerge.merge.interpolate` / ``task_arithmetic`` (float32,
    validated there); ``names`` label the fine-tuned models in their errors.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    expected = 2 if robust else len(finetuned)
    if c.shape != (expected,):
        raise ValueError(f"DaWin coefficients must be ({expected},) for {len(finetuned)} fine-tuned model(s) "
                         f"({'robust' if robust else 'multi-task'}), got shape {c.shape}")
    check_finite_array(c, "coefficients")
    if robust:
        if len(finetuned) != 1:
            raise ValueError(f"robust DaWin interpolates θ0 with one fine-tuned model, got {len(finetuned)}")
        return interpolate(base, finetuned[0], float(c[1]))  # METHODS §4: (1−λ(x)) θ0 + λ(x) θ1
    # METHODS §4 many models: θ(x) = θ0 + λ0 · T · Σt λt(x) τt
    return task_arithmetic(base, finetuned, [lam0 * len(finetuned) * float(x) for x in c], names=names)
