"""Beta and Dirichlet mixture models fitted by EM: DaWin's step from N per-sample coefficients to K merges.

METHODS §4 ("Mixture modeling"). Both models share one EM driver (:class:`_EMMixture`): K-means
initialisation of hard responsibilities, E-step in log space, ``n_init`` restarts keeping the best mean
log-likelihood, stop when the mean log-likelihood changes by less than ``tol``. They differ only in how a
sample is turned into sufficient statistics and in the M-step.

Both densities are exponential families of the same form, ``log p(x | α) = Σj (αj − 1) log xj − log B(α)``
(a Beta(a, b) on λ is the Dirichlet (a, b) on (λ, 1 − λ)), so the E-step is one matrix product over samples
and components, with no Python loop over samples. Internally, arrays indexed by component and sample are laid
out (K, N), so that reductions over the few components run along the contiguous sample axis.

Numerical policy, shared by both classes (tests cover each case):

- Values are clipped to ``[eps, 1 − eps]`` with ``eps = 10 · machine-eps`` as in the authors' released code; this
  is also what makes coefficients exactly 0 or 1 (where the log-density is infinite) usable.
- The precision ``s`` (``a + b``, or ``Σ α``) is capped at ``MAX_PRECISION`` = 1e8, so data with zero variance
  (all values equal, or a component whose members all coincide) gives a very peaked but finite density.
- A component that is empty (total responsibility below ``EMPTY_MASS`` samples), at initialisation when there
  are fewer distinct values than K, or later during EM, gets weight exactly 0, so it takes no samples from then
  on. It is not re-seeded: moving a component mid-run changes the model being fitted and can make EM oscillate.
  Its shape parameters are re-estimated from all samples at every M-step, so they stay finite (``means_`` is
  then the mean of the data).
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import betaln, digamma, gammaln, zeta

EPS = 10 * np.finfo(np.float64).eps
MAX_PRECISION = 1e8
EMPTY_MASS = 1e-8

_KMEANS_MAX_ITER = 100
_ROW_SUM_TOL = 1e-6
_MLE_TOL = 1e-6
_MLE_MAX_ITER = 1000
_NEWTON_STEPS = 5


_Mixture = TypeVar("_Mixture", bound="_EMMixture")


class _Fit(NamedTuple):
    weights: np.ndarray
    params: np.ndarray
    lower_bound: float
    n_iter: int
    converged: bool


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Labels (N,) of Lloyd's k-means on ``x`` (N, d), seeded k-means++ style from ``rng``.

    When fewer than ``k`` distinct points exist, the extra centres duplicate existing ones and their clusters
    stay empty (``argmin`` picks the first of equal centres); the EM driver turns those into weight-0 components.
    """
    n = len(x)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        pick = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centers[j] = x[pick]
        d2 = np.minimum(d2, ((x - centers[j]) ** 2).sum(1))
    labels = np.full(n, -1)
    for _ in range(_KMEANS_MAX_ITER):
        # the ‖x‖² term is the same for every centre, so it does not change the argmin
        new = ((centers**2).sum(1)[:, None] - 2 * centers @ x.T).argmin(0)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x.T], axis=1)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return labels


def _moment_precision(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Precision ``s`` (same shape as ``mean``) from a mean and variance of values in (0, 1).

    The variance is capped at ``m(1 − m)/4`` (released code, so ``s ≥ 3``) and floored so that
    ``s ≤ MAX_PRECISION``.
    """
    spread = mean * (1 - mean)
    var = np.clip(var, spread / (1 + MAX_PRECISION), spread / 4)
    return spread / var - 1  # METHODS §4 BMM M-step: method of moments s = m(1−m)/v − 1


def _inverse_digamma(y: np.ndarray) -> np.ndarray:
    """``x`` with ``digamma(x) = y``, elementwise: Newton from Minka's starting point (Minka 2000, App. C)."""
    x = np.where(y >= -2.22, np.exp(y) + 0.5, -1 / (y - digamma(1)))
    for _ in range(_NEWTON_STEPS):
        x = x - (digamma(x) - y) / zeta(2, x)  # trigamma ψ′(x) = ζ(2, x), without polygamma's wrapper cost
    return x


def _cap_precision(alpha: np.ndarray) -> np.ndarray:
    """Scale each row of ``alpha`` (K, M) down so that its sum is at most ``MAX_PRECISION``."""
    return alpha * np.minimum(1.0, MAX_PRECISION / alpha.sum(1, keepdims=True))


def _dirichlet_mle(alpha: np.ndarray, mean_log: np.ndarray) -> np.ndarray:
    """Weighted Dirichlet MLE (K, M) by Minka's fixed point, from the start ``alpha`` (K, M).

    ``mean_log`` (K, M) holds each component's responsibility-weighted mean of ``log x``.
    """
    for _ in range(_MLE_MAX_ITER):
        # Minka (2000) Eq. 9: ψ(αj) = ψ(Σα) + mean log xj
        new = _cap_precision(_inverse_digamma(digamma(alpha.sum(1, keepdims=True)) + mean_log))
        step = (np.abs(new - alpha) / new).max()
        alpha = new
        if step < _MLE_TOL:
            break
    return alpha


def _weighted_moments(values: np.ndarray, resp: np.ndarray, nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responsibility-weighted mean and variance (K, d) of ``values`` (N, d) under ``resp`` (K, N)."""
    mean = resp @ values / nk[:, None]
    var = resp @ values**2 / nk[:, None] - mean**2
    return mean, var


def _logsumexp_components(a: np.ndarray) -> np.ndarray:
    """log Σk exp(a[k]) (N,) of ``a`` (K, N); every sample has a finite entry (some weight is positive).

    Written out because ``scipy.special.logsumexp`` is ~5x slower on these shapes and this runs every EM step.
    """
    top = a.max(0)
    return top + np.log(np.exp(a - top).sum(0))


def check_finite_array(x: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and the first NaN/Inf entry of ``x``.

    The entry is named by its index (1-D), row and column (2-D), or index tuple (more dimensions).
    """
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        i = tuple(int(v) for v in bad[0])
        where = f"row {i[0]}, column {i[1]}" if x.ndim == 2 else f"index {i[0] if x.ndim == 1 else i}"
        raise ValueError(f"{what} has a non-finite value {x[i]} at {where}")


class _EMMixture:
    """EM driver shared by :class:`BetaMixture` and :class:`DirichletMixture`; subclasses supply the model.

    A subclass implements ``_prepare`` (validate and clip; return the values (N, d) for K-means and moments and
    the log sufficient statistics (P, N)), ``_log_normalizer`` (log B(α) per component), ``_estimate_params``
    (the M-step for the shape parameters (K, P)) and ``_publish`` (set the public fitted attributes).
    """

    def __init__(
        self, n_components: int, seed: int = 0, n_init: int = 3, tol: float = 1e-4, max_iter: int = 200
    ) -> None:
        """``n_components`` K (checked against N in :meth:`fit`); ``seed`` derives the restarts' K-means seeds;
        ``n_init`` restarts; ``tol`` on the change of the mean log-likelihood per sample (nats); ``max_iter`` EM
        iterations per restart."""
        if n_init < 1 or max_iter < 1 or not tol > 0:
            raise ValueError(f"need n_init ≥ 1, max_iter ≥ 1 and tol > 0, got {n_init}, {max_iter}, {tol}")
        self.n_components = n_components
        self.seed = seed
        self.n_init = n_init
        self.tol = tol
        self.max_iter = max_iter

    def fit(self: _Mixture, x: ArrayLike) -> _Mixture:
        """Fit by EM with ``n_init`` K-means-initialised restarts; keep the best mean log-likelihood."""
        values, log_stats = self._prepare(x)
        n, k = len(values), self.n_components
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ValueError(f"n_components K={k!r} must be an integer between 1 and the number of samples N={n}")
        best, total_iter = None, 0
        for child in np.random.SeedSequence(self.seed).spawn(self.n_init):
            labels = _kmeans(values, k, np.random.default_rng(child))
            fit = self._run_em(values, log_stats, (labels == np.arange(k)[:, None]).astype(np.float64))
            total_iter += fit.n_iter
            if best is None or fit.lower_bound > best.lower_bound:
                best = fit
        self.weights_ = best.weights
        self.lower_bound_ = best.lower_bound
        self.n_iter_ = best.n_iter
        self.n_iter_total_ = total_iter
        self.converged_ = best.converged
        self._params = best.params
        self._publish(best.params)
        return self

    def _run_em(self, values: np.ndarray, log_stats: np.ndarray, resp: np.ndarray) -> _Fit:
        weights, params = self._m_step(values, log_stats, resp)
        ll, log_resp = self._e_step(log_stats, weights, params)
        converged, n_iter = False, 0
        while not converged and n_iter < self.max_iter:
            weights, params = self._m_step(values, log_stats, np.exp(log_resp))
            new_ll, log_resp = self._e_step(log_stats, weights, params)
            converged = abs(new_ll - ll) < self.tol
            ll, n_iter = new_ll, n_iter + 1
        return _Fit(weights, params, ll, n_iter, converged)

    def _m_step(self, values: np.ndarray, log_stats: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nk = resp.sum(1)
        empty = nk < EMPTY_MASS
        weights = np.where(empty, 0.0, nk)
        weights /= weights.sum()  # METHODS §4 BMM M-step: πk = Nk/N
        if empty.any():
            # an empty component's parameters come from all samples, so they stay finite while it takes none
            resp = resp.copy()
            resp[empty] = 1.0
            nk = resp.sum(1)
        return weights, self._estimate_params(values, log_stats, resp, nk)

    def _log_joint(self, log_stats: np.ndarray, weights: np.ndarray, params: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            log_weights = np.log(weights)
        # METHODS §4 E-step: log πk + log pdf(x; αk), the pdf being Π xj^(αj−1) / B(α)
        return (params - 1) @ log_stats - (self._log_normalizer(params) - log_weights)[:, None]

    def _e_step(
        self, log_stats: np.ndarray, weights: np.ndarray, params: np.ndarray
    ) -> tuple[float, np.ndarray]:
        log_joint = self._log_joint(log_stats, weights, params)
        log_norm = _logsumexp_components(log_joint)
        return float(log_norm.mean()), log_joint - log_norm

    def _fitted_log_joint(self, x: ArrayLike) -> np.ndarray:
        if not hasattr(self, "_params"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit first")
        _, log_stats = self._prepare(x)
        if len(log_stats) != self._params.shape[1]:
            raise ValueError(f"fitted on vectors of length M={self._params.shape[1]}, got M={len(log_stats)}")
        return self._log_joint(log_stats, self.weights_, self._params)

    def predict_proba(self, x: ArrayLike) -> np.ndarray:
        """Posterior component probabilities (N, K); rows sum to 1."""
        log_joint = self._fitted_log_joint(x)
        return np.exp(log_joint - _logsumexp_components(log_joint)).T

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Most likely component (N,) of each sample (argmax of the posterior, so weight-0 components get none)."""
        return self._fitted_log_joint(x).argmax(0)

    def score_samples(self, x: ArrayLike) -> np.ndarray:
        """Log-likelihood (N,) of each sample under the mixture, in nats (at the clipped values)."""
        return _logsumexp_components(self._fitted_log_joint(x))

    def score(self, x: ArrayLike) -> float:
        """Mean log-likelihood per sample, in nats (what ``lower_bound_`` reports for the training data)."""
        return float(self.score_samples(x).mean())

    def _prepare(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _log_normalizer(self, params: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _estimate_params(
        self, values: np.ndarray, log_stats: np.ndarray, resp: np.ndarray, nk: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError

    def _publish(self, params: np.ndarray) -> None:
        raise NotImplementedError


class BetaMixture(_EMMixture):
    """K-component Beta mixture over coefficients λ ∈ [0, 1] (N,), EM as in METHODS §4 / DaWin App. A.1.

    Initialisation: K-means (k-means++ seeding) on λ gives hard responsibilities. M-step: ``πk = Nk/N``,
    weighted mean ``m`` and variance ``v``, method of moments ``s = m(1−m)/v − 1``, ``ak = s·m``,
    ``bk = s·(1−m)``, with the variance capped at ``m(1−m)/4`` as in the released code. E-step:
    ``log πk + log Beta(λ; ak, bk)`` with ``betaln`` and log-sum-exp. The M-step is the method of moments, not
    the MLE, so the likelihood need not increase monotonically; EM stops when the mean log-likelihood changes by
    less than ``tol``. Restart ``r`` uses the r-th child of ``np.random.SeedSequence(seed)``.

    Fitted attributes: ``alphas_``, ``betas_``, ``means_`` (``a/(a+b)``) and ``weights_``, each (K,);
    ``lower_bound_`` (mean log-likelihood in nats), ``n_iter_`` and ``converged_`` of the kept restart,
    ``n_iter_total_`` (EM iterations summed over restarts). See the module docstring for the handling of
    λ exactly 0 or 1, zero variance and empty components.
    """

    def _prepare(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        lam = np.asarray(x, dtype=np.float64)
        if lam.ndim != 1 or lam.size == 0:
            raise ValueError(f"BetaMixture takes a non-empty 1-D array of coefficients (N,), got shape {lam.shape}")
        check_finite_array(lam, "the coefficient array")
        outside = np.flatnonzero((lam < 0) | (lam > 1))
        if len(outside):
            raise ValueError(f"coefficient {lam[outside[0]]} at index {outside[0]} is outside [0, 1]")
        lam = np.clip(lam, EPS, 1 - EPS)
        return lam[:, None], np.stack([np.log(lam), np.log1p(-lam)])

    def _log_normalizer(self, params: np.ndarray) -> np.ndarray:
        return betaln(params[:, 0], params[:, 1])

    def _estimate_params(
        self, values: np.ndarray, log_stats: np.ndarray, resp: np.ndarray, nk: np.ndarray
    ) -> np.ndarray:
        mean, var = _weighted_moments(values, resp, nk)
        m = mean[:, 0]
        s = _moment_precision(m, var[:, 0])
        return np.column_stack([s * m, s * (1 - m)])  # METHODS §4 BMM M-step: ak = s·m, bk = s·(1−m)

    def _publish(self, params: np.ndarray) -> None:
        self.alphas_ = params[:, 0].copy()
        self.betas_ = params[:, 1].copy()
        self.means_ = self.alphas_ / (self.alphas_ + self.betas_)


class DirichletMixture(_EMMixture):
    """K-component Dirichlet mixture over coefficient vectors on the simplex (N, M), fitted by real EM.

    E-step: ``log πk + log Dir(x; αk)`` with ``gammaln`` and log-sum-exp. M-step: ``πk = Nk/N`` and, per
    component (all components at once, vectorised), the responsibility-weighted maximum-likelihood α by Minka's
    fixed point ``ψ(αj) = ψ(Σα) + Σi γik log xij / Nk`` (inverse digamma by Newton), started from moment
    matching (weighted means ``m``, precision ``s`` = geometric mean over j of ``mj(1−mj)/vj − 1``). The fixed
    point stops at a relative change below 1e-6 or after 1000 steps. Initialisation: K-means on the vectors.

    How this differs from the authors' released "Dirichlet mixture": theirs is a mean-vector heuristic with no
    Dirichlet likelihood, in which the number of components silently becomes the number of models T and
    component 0 is picked arbitrarily. Here K is what you ask for, memberships are posterior argmaxes under a
    fitted Dirichlet likelihood, and ``score`` is that likelihood.

    Input rows must sum to 1 (within 1e-6) with entries ≥ 0; zeros are clipped to ``eps`` and the row
    renormalised. Fitted attributes: ``alphas_`` (K, M), ``means_`` (K, M) (``α/Σα``), ``weights_`` (K,),
    ``lower_bound_``, ``n_iter_``, ``converged_``, ``n_iter_total_`` as in :class:`BetaMixture`.
    """

    def _prepare(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(x, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
            raise ValueError(f"DirichletMixture takes vectors (N, M) with N ≥ 1, M ≥ 2, got shape {p.shape}")
        check_finite_array(p, "the coefficient matrix")
        negative = np.argwhere(p < 0)
        if len(negative):
            i, j = negative[0]
            raise ValueError(f"coefficient {p[i, j]} at row {i}, column {j} is negative")
        off = np.flatnonzero(np.abs(p.sum(1) - 1) > _ROW_SUM_TOL)
        if len(off):
            raise ValueError(f"coefficient rows must sum to 1; row {off[0]} sums to {float(p[off[0]].sum())}")
        p = np.maximum(p, EPS)
        p /= p.sum(1, keepdims=True)
        return p, np.log(p.T)

    def _log_normalizer(self, params: np.ndarray) -> np.ndarray:
        return gammaln(params).sum(1) - gammaln(params.sum(1))

    def _estimate_params(
        self, values: np.ndarray, log_stats: np.ndarray, resp: np.ndarray, nk: np.ndarray
    ) -> np.ndarray:
        mean, var = _weighted_moments(values, resp, nk)
        # moment matching: one precision per component, the geometric mean of the per-coordinate estimates
        precision = np.exp(np.log(_moment_precision(mean, var)).mean(1, keepdims=True))
        mean_log = resp @ log_stats.T / nk[:, None]
        return _dirichlet_mle(_cap_precision(precision * mean), mean_log)

    def _publish(self, params: np.ndarray) -> None:
        self.alphas_ = params.copy()
        self.means_ = params / params.sum(1, keepdims=True)
