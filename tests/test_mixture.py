"""Beta and Dirichlet mixtures: recovery of known mixtures, likelihood against scipy.stats, edge cases, bench smoke."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from raymerge.mixture import BetaMixture, DirichletMixture

# any RuntimeWarning (log of 0, 0/0, overflow) is a bug here, so it fails the test
pytestmark = pytest.mark.filterwarnings("error")

BETA_A = np.array([3.0, 20.0, 17.0])
BETA_B = np.array([17.0, 20.0, 3.0])  # means 0.15, 0.5, 0.85
BETA_W = np.array([0.3, 0.4, 0.3])

DIRICHLET_ALPHA = np.array([[24.0, 4.0, 4.0, 8.0], [4.0, 24.0, 8.0, 4.0], [6.0, 6.0, 6.0, 22.0]])
DIRICHLET_W = np.array([0.3, 0.3, 0.4])


def beta_sample(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=BETA_W)
    return rng.beta(BETA_A[comp], BETA_B[comp])


def dirichlet_sample(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=n, p=DIRICHLET_W)
    return np.stack([rng.dirichlet(DIRICHLET_ALPHA[k]) for k in comp])


def assert_all_finite(model) -> None:
    for name in ("means_", "weights_", "alphas_", "betas_", "lower_bound_"):
        if hasattr(model, name):
            assert np.all(np.isfinite(getattr(model, name))), name
    assert np.isclose(model.weights_.sum(), 1.0)
    assert np.all(model.weights_ >= 0)


@pytest.fixture(scope="module")
def beta_data() -> np.ndarray:
    return beta_sample(6000)


@pytest.fixture(scope="module")
def beta_fit(beta_data) -> BetaMixture:
    return BetaMixture(3, seed=0).fit(beta_data)


@pytest.fixture(scope="module")
def dirichlet_data() -> np.ndarray:
    return dirichlet_sample(6000)


@pytest.fixture(scope="module")
def dirichlet_fit(dirichlet_data) -> DirichletMixture:
    return DirichletMixture(3, seed=0).fit(dirichlet_data)


# --- recovery of known mixtures -------------------------------------------------------------------------------


def test_beta_mixture_recovers_generating_means_and_weights(beta_fit):
    order = np.argsort(beta_fit.means_)
    np.testing.assert_allclose(beta_fit.means_[order], BETA_A / (BETA_A + BETA_B), atol=0.02)
    np.testing.assert_allclose(beta_fit.weights_[order], BETA_W, atol=0.03)
    # the method-of-moments M-step is not the MLE, so shape parameters are only checked loosely
    np.testing.assert_allclose((beta_fit.alphas_ + beta_fit.betas_)[order], BETA_A + BETA_B, rtol=0.3)
    assert beta_fit.converged_
    assert 1 <= beta_fit.n_iter_ <= beta_fit.n_iter_total_


def test_dirichlet_mixture_recovers_generating_parameters(dirichlet_fit):
    # match fitted components to the generating ones by their largest coordinate (0, 1, 3 for the truth)
    order = np.argsort(dirichlet_fit.means_.argmax(1))
    means = DIRICHLET_ALPHA / DIRICHLET_ALPHA.sum(1, keepdims=True)
    np.testing.assert_allclose(dirichlet_fit.means_[order], means, atol=0.02)
    np.testing.assert_allclose(dirichlet_fit.weights_[order], DIRICHLET_W, atol=0.03)
    # the M-step is the weighted MLE, so the concentrations themselves come back
    np.testing.assert_allclose(dirichlet_fit.alphas_[order], DIRICHLET_ALPHA, rtol=0.15)
    assert dirichlet_fit.converged_


def test_beta_log_likelihood_matches_scipy(beta_fit, beta_data):
    log_joint = np.log(beta_fit.weights_)[:, None] + np.stack(
        [stats.beta.logpdf(beta_data, a, b) for a, b in zip(beta_fit.alphas_, beta_fit.betas_)]
    )
    reference = logsumexp(log_joint, axis=0)
    np.testing.assert_allclose(beta_fit.score_samples(beta_data), reference, rtol=1e-9, atol=1e-9)
    assert beta_fit.score(beta_data) == pytest.approx(reference.mean(), rel=1e-10)
    assert beta_fit.lower_bound_ == pytest.approx(reference.mean(), rel=1e-10)
    posterior = np.exp(log_joint - reference).T
    np.testing.assert_allclose(beta_fit.predict_proba(beta_data), posterior, atol=1e-10)


def test_dirichlet_log_likelihood_matches_scipy(dirichlet_fit, dirichlet_data):
    log_joint = np.log(dirichlet_fit.weights_)[:, None] + np.stack(
        [stats.dirichlet.logpdf(dirichlet_data.T, alpha) for alpha in dirichlet_fit.alphas_]
    )
    reference = logsumexp(log_joint, axis=0)
    np.testing.assert_allclose(dirichlet_fit.score_samples(dirichlet_data), reference, rtol=1e-9, atol=1e-9)
    assert dirichlet_fit.lower_bound_ == pytest.approx(reference.mean(), rel=1e-10)


@pytest.mark.parametrize("fixture", ["beta", "dirichlet"])
def test_predict_is_the_posterior_argmax(fixture, request):
    model = request.getfixturevalue(f"{fixture}_fit")
    x = request.getfixturevalue(f"{fixture}_data")[:500]
    proba = model.predict_proba(x)
    assert proba.shape == (500, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(model.predict(x), proba.argmax(1))


# --- reproducibility ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_fits(beta_data, dirichlet_data):
    for cls, x in ((BetaMixture, beta_data[:2000]), (DirichletMixture, dirichlet_data[:1000])):
        first, second = cls(3, seed=7).fit(x), cls(3, seed=7).fit(x)
        np.testing.assert_array_equal(first.means_, second.means_)
        np.testing.assert_array_equal(first.weights_, second.weights_)
        np.testing.assert_array_equal(first.alphas_, second.alphas_)
        assert first.lower_bound_ == second.lower_bound_
        assert first.n_iter_total_ == second.n_iter_total_


# --- edge cases -----------------------------------------------------------------------------------------------


def test_beta_values_exactly_zero_and_one():
    rng = np.random.default_rng(1)
    lam = np.concatenate([np.zeros(50), np.ones(50), rng.uniform(0.3, 0.7, 100)])
    model = BetaMixture(3).fit(lam)
    assert_all_finite(model)
    assert np.all(np.isfinite(model.predict_proba(lam)))
    assert np.isfinite(model.score(lam))
    # the exact zeros and ones end up in their own components
    labels = model.predict(lam)
    assert len(set(labels[:50])) == 1 and len(set(labels[50:100])) == 1 and labels[0] != labels[50]


@pytest.mark.parametrize("k", [1, 3])
def test_beta_zero_variance(k):
    lam = np.full(200, 0.37)
    model = BetaMixture(k).fit(lam)
    assert_all_finite(model)
    used = np.flatnonzero(model.weights_ > 0)
    assert len(used) == 1
    assert model.means_[used[0]] == pytest.approx(0.37, abs=1e-9)
    assert set(model.predict(lam)) == {used[0]}
    assert np.isfinite(model.score(lam))


def test_beta_fewer_distinct_values_than_components():
    lam = np.repeat([0.2, 0.8], 50)
    model = BetaMixture(4).fit(lam)
    assert_all_finite(model)
    used = np.flatnonzero(model.weights_ > 0)
    assert len(used) == 2
    np.testing.assert_allclose(np.sort(model.means_[used]), [0.2, 0.8], atol=1e-9)
    np.testing.assert_allclose(model.weights_[used], 0.5)
    labels = model.predict(lam)
    assert len(set(labels[:50])) == 1 and len(set(labels[50:])) == 1 and labels[0] != labels[-1]


def test_dirichlet_zero_variance_and_exact_zeros():
    rows = np.tile([0.7, 0.3, 0.0], (100, 1))
    model = DirichletMixture(2).fit(rows)
    assert_all_finite(model)
    assert np.count_nonzero(model.weights_) == 1
    np.testing.assert_allclose(model.means_[model.weights_ > 0][0], [0.7, 0.3, 0.0], atol=1e-6)
    assert np.all(np.isfinite(model.predict_proba(rows)))


def test_dirichlet_fewer_distinct_rows_than_components():
    rows = np.repeat([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]], 40, axis=0)
    model = DirichletMixture(5).fit(rows)
    assert_all_finite(model)
    assert np.count_nonzero(model.weights_) == 2
    labels = model.predict(rows)
    assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1 and labels[0] != labels[-1]


@pytest.mark.parametrize(
    "model, x",
    [
        (BetaMixture(2), np.linspace(0.1, 0.9, 40)),
        (DirichletMixture(2), np.random.default_rng(0).dirichlet([2.0, 3.0, 4.0], size=40)),
    ],
)
def test_component_emptied_during_em_keeps_weight_zero_and_finite_parameters(model, x):
    # no public input empties a component deterministically mid-run, so hand EM responsibilities with one
    # empty component, which is exactly the state the M-step sees when that happens
    values, log_stats = model._prepare(x)
    resp = np.zeros((2, len(x)))
    resp[0] = 1.0
    weights, params = model._m_step(values, log_stats, resp)
    np.testing.assert_array_equal(weights, [1.0, 0.0])
    assert np.all(np.isfinite(params)) and np.all(params > 0)
    fit = model._run_em(values, log_stats, resp)
    assert fit.weights[1] == 0.0
    assert np.all(np.isfinite(fit.params)) and np.isfinite(fit.lower_bound)


@pytest.mark.parametrize("cls, x", [(BetaMixture, np.full(5, 0.5)), (DirichletMixture, np.full((5, 2), 0.5))])
@pytest.mark.parametrize("k", [0, 6])
def test_component_count_out_of_range_names_k_and_n(cls, x, k):
    with pytest.raises(ValueError, match=rf"K={k}.*N=5"):
        cls(k).fit(x)


def test_nan_input_is_rejected_with_its_position():
    with pytest.raises(ValueError, match="nan at index 2"):
        BetaMixture(1).fit([0.1, 0.2, np.nan])
    with pytest.raises(ValueError, match="inf at row 1, column 0"):
        DirichletMixture(1).fit([[0.5, 0.5], [np.inf, 0.0]])


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="1.5 at index 1"):
        BetaMixture(1).fit([0.1, 1.5])
    with pytest.raises(ValueError, match="shape"):
        BetaMixture(1).fit(np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="row 1 sums to 1.2"):
        DirichletMixture(1).fit([[0.5, 0.5], [0.6, 0.6], [0.7, 0.7]])
    with pytest.raises(ValueError, match="negative"):
        DirichletMixture(1).fit([[1.5, -0.5]])
    with pytest.raises(ValueError, match="M ≥ 2"):
        DirichletMixture(1).fit(np.ones((3, 1)))


def test_unfitted_and_mismatched_use_is_rejected(dirichlet_fit):
    with pytest.raises(RuntimeError, match="not fitted"):
        BetaMixture(2).predict([0.5])
    with pytest.raises(ValueError, match="M=4.*M=3"):
        dirichlet_fit.predict(np.full((2, 3), 1 / 3))


# --- benchmark smoke test -------------------------------------------------------------------------------------


def test_bench_quick():
    path = Path(__file__).resolve().parents[1] / "bench" / "mixture.py"
    spec = importlib.util.spec_from_file_location("bench_mixture", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(quick=True)
    assert len(rows) >= 3
    keys = {"benchmark", "case", "measured_s", "baseline_s", "baseline", "ratio", "ideal", "note"}
    for row in rows:
        assert set(row) == keys
        assert isinstance(row["benchmark"], str) and isinstance(row["case"], str)
        assert isinstance(row["measured_s"], float) and row["measured_s"] > 0
        assert row["baseline_s"] is None or row["baseline_s"] > 0
        assert row["ratio"] is None or row["ratio"] > 0
        assert all(isinstance(row[k], str) and row[k] for k in ("baseline", "ideal", "note"))
