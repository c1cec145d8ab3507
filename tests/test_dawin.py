"""DaWin coefficients, temperature scaling and logit-only variants, checked against hand computations and torch."""

import math
import statistics

import mpmath
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from raymerge import dawin
from raymerge.mixture import BetaMixture, DirichletMixture

pytestmark = pytest.mark.filterwarnings("error")

H0 = [0.5, 1.0, 2.0]
H1 = [1.0, 0.2, 2.0]


def eq1(h0: float, h1: float) -> float:
    return math.exp(-h1) / (math.exp(-h0) + math.exp(-h1))


def eq2(h0s: list[float], h1s: list[float]) -> list[float]:
    m0, m1 = statistics.mean(h0s), statistics.mean(h1s)
    o = 0.5 * (statistics.stdev(h0s) / m0 + statistics.stdev(h1s) / m1)
    t = (m0 + m1) / m0
    return [(math.exp(-b) + o / t) / (math.exp(-a) + math.exp(-b) + o) for a, b in zip(h0s, h1s)]


def random_logits(n: int, m: int, c: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=scale, size=(n, m, c))


# --- entropy, losses, temperature ------------------------------------------------------------------------------


def test_entropy_matches_hand_computation():
    logits = np.array([[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0]])
    p = [1 / 6, 2 / 6, 3 / 6]
    expected = [-sum(q * math.log(q) for q in p), math.log(3)]
    np.testing.assert_allclose(dawin.entropy(logits), expected, rtol=1e-14)


def test_entropy_is_stable_for_huge_logits():
    logits = np.array([[0.0, math.log(2), math.log(3)]])
    np.testing.assert_allclose(dawin.entropy(logits + 1e6), dawin.entropy(logits), rtol=1e-9)
    peaked = dawin.entropy(np.array([[0.0, 2000.0, -3000.0]]))
    assert np.isfinite(peaked[0]) and peaked[0] == pytest.approx(0.0, abs=1e-300)


def test_entropy_shapes_and_temperatures():
    z = random_logits(7, 3, 5)
    h = dawin.entropy(z)
    assert h.shape == (7, 3)
    np.testing.assert_array_equal(dawin.entropy([z[:, 0], z[:, 1], z[:, 2]]), h)
    np.testing.assert_allclose(dawin.entropy(z, 2.0), dawin.entropy(z / 2.0), rtol=1e-13)
    per_model = dawin.entropy(z, [0.5, 1.0, 2.0])
    for j, t in enumerate([0.5, 1.0, 2.0]):
        np.testing.assert_allclose(per_model[:, j], dawin.entropy(z[:, j], t), rtol=1e-13)
    with pytest.raises(ValueError, match="positive"):
        dawin.entropy(z, -1.0)
    with pytest.raises(ValueError, match="temperature"):
        dawin.entropy(z, [1.0, 2.0])


def test_oracle_losses_match_torch_cross_entropy():
    z = random_logits(50, 2, 10)
    y = np.random.default_rng(1).integers(0, 10, size=50)
    losses = dawin.oracle_losses(z, y, temperature=[0.9576, 0.9733])
    for j, t in enumerate([0.9576, 0.9733]):
        ref = torch.nn.functional.cross_entropy(torch.from_numpy(z[:, j] / t), torch.from_numpy(y), reduction="none")
        np.testing.assert_allclose(losses[:, j], ref.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="label 10 at index 0"):
        dawin.oracle_losses(z, np.full(50, 10))


def exact_scores(z: np.ndarray, y: np.ndarray, temperature: float) -> np.ndarray:
    """(N, 3): entropy at ``temperature``, entropy at 1 and cross-entropy at ``temperature``, in 50-digit mpmath."""
    mpmath.mp.dps = 50

    def log_probs(row, t):
        scaled = [mpmath.mpf(float(v)) / mpmath.mpf(t) for v in row]
        norm = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in scaled))
        return [v - norm for v in scaled]

    def entropy(logp):
        return float(-mpmath.fsum(mpmath.exp(v) * v for v in logp))

    return np.array([[entropy(log_probs(row, temperature)), entropy(log_probs(row, 1.0)),
                      float(-log_probs(row, temperature)[label])] for row, label in zip(z, y)])


def test_sample_scores_match_exact_arithmetic():
    rng = np.random.default_rng(3)
    z, y, t = rng.normal(scale=4, size=(50, 7)), rng.integers(0, 7, 50), 1.7
    # confident samples: entropies and a loss of 1e-4 to 1e-20, where log(1 + ε) in float64 (scipy's and torch's
    # log-softmax) is off by 1e-12 relative and more
    z[:3] = [[30.0, 0.0, -5.0, 1.0, 2.0, 0.5, -1.0], [50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
             [12.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    y[:3] = 0
    s = dawin.sample_scores(z, y, t)
    assert s.shape == (50, 4) and s.dtype == np.float64 and dawin.SCORE_COLUMNS[3] == "prediction"
    np.testing.assert_allclose(s[:, :3], exact_scores(z, y, t), rtol=1e-14)
    logp = torch.log_softmax(torch.from_numpy(z) / t, -1)  # torch agrees where the scores are not tiny
    np.testing.assert_allclose(s[3:, 0], -(logp.exp() * logp).sum(-1).numpy()[3:], rtol=1e-10)
    np.testing.assert_array_equal(dawin.score_predictions(s), z.argmax(1))
    np.testing.assert_array_equal(dawin.sample_scores(z, y, 1.0)[:, 0], dawin.sample_scores(z, y, 1.0)[:, 1])


def test_sample_scores_of_a_non_finite_row_are_nan_and_keep_its_argmax():
    z = np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 1.0], [1.0, 3.0, 0.0]])
    s = dawin.sample_scores(z, np.array([2, 0, 1]), 0.5)
    assert np.isnan(s[1, :3]).all() and not np.isnan(s[[0, 2]]).any()
    np.testing.assert_array_equal(dawin.score_predictions(s), [2, 0, 1])
    np.testing.assert_allclose(s[[0, 2]], dawin.sample_scores(z[[0, 2]], np.array([2, 1]), 0.5), rtol=0)


def test_fit_temperature_matches_brute_force_grid():
    rng = np.random.default_rng(0)
    true = rng.normal(scale=2.0, size=(1500, 10))
    probs = np.exp(true - true.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.minimum((probs.cumsum(1) < rng.random((1500, 1))).sum(1), 9)
    logits = 2.5 * true  # overconfident by a factor 2.5, so T should come out near 2.5
    t_fit = dawin.fit_temperature(logits, labels)

    def nll(t: np.ndarray) -> np.ndarray:
        # independent of the module: NLL = mean(logsumexp(z/T) − z_y/T), all temperatures of the grid at once
        z = logits[None] / np.asarray(t, dtype=float).reshape(-1, 1, 1)
        return (logsumexp(z, axis=2) - z[:, np.arange(len(labels)), labels]).mean(1)

    grid = np.geomspace(1.8, 3.5, 301)  # ratio between neighbours ≈ 1.0022
    losses = nll(grid)
    t_grid = grid[int(np.argmin(losses))]
    assert t_fit == pytest.approx(t_grid, rel=0.003)
    assert nll(t_fit)[0] <= losses.min() + 1e-12
    assert 2.0 < t_fit < 3.0


def test_fit_temperature_on_separable_data_goes_to_the_low_end():
    # the NLL falls towards 0 as T → 0 and is exactly 0 in float64 below T ≈ 0.13
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    t = dawin.fit_temperature(logits, np.array([0, 1]))
    assert dawin.TEMPERATURE_BOUNDS[0] <= t < 0.2
    assert dawin.oracle_losses(logits, np.array([0, 1]), t).max() < 1e-15
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        dawin.fit_temperature(random_logits(4, 2, 3), np.zeros(4, dtype=int))


# --- coefficients ----------------------------------------------------------------------------------------------


def test_eq1_matches_hand_computation():
    coef = dawin.expertise_coefficients(np.column_stack([H0, H1]))
    expected = [eq1(a, b) for a, b in zip(H0, H1)]
    np.testing.assert_allclose(coef[:, 1], expected, rtol=1e-14)
    np.testing.assert_allclose(coef.sum(1), 1.0, rtol=1e-15)
    assert coef[2, 1] == 0.5


def test_eq2_matches_hand_computation():
    coef = dawin.expertise_coefficients(np.column_stack([H0, H1]), offset=True)
    np.testing.assert_allclose(coef[:, 1], eq2(H0, H1), rtol=1e-13)
    np.testing.assert_allclose(coef[:, 0], 1 - coef[:, 1], rtol=1e-15)


def test_eq2_with_entropies_around_50():
    h0, h1 = [50.0, 51.0, 49.5, 52.0], [50.5, 49.0, 49.5, 53.0]
    coef = dawin.expertise_coefficients(np.column_stack([h0, h1]), offset=True)
    np.testing.assert_allclose(coef[:, 1], eq2(h0, h1), rtol=1e-13)


def test_huge_entropies_stay_exact():
    base = np.column_stack([H0, H1])
    # Eq. 1 only depends on entropy differences
    np.testing.assert_allclose(
        dawin.expertise_coefficients(base + 1000.0), dawin.expertise_coefficients(base), rtol=1e-12
    )
    # Eq. 2 with exp(−H) ≈ 0 next to O: λ → (O/T)/O = 1/T
    huge = base * 1000.0
    lam = dawin.expertise_coefficients(huge, offset=True)[:, 1]
    m0, m1 = statistics.mean(huge[:, 0]), statistics.mean(huge[:, 1])
    np.testing.assert_allclose(lam, m0 / (m0 + m1), rtol=1e-12)
    # Eq. 2 with O = 0 (constant entropies) is Eq. 1, also when a naive evaluation would give 0/0
    flat = np.column_stack([np.full(3, 900.0), np.full(3, 901.0)])
    np.testing.assert_allclose(
        dawin.expertise_coefficients(flat, offset=True), dawin.expertise_coefficients(flat), rtol=1e-12
    )


def test_many_models_softmax_of_negative_entropy():
    h = np.array([[0.5, 1.0, 2.0, 0.1], [3.0, 3.0, 3.0, 3.0]])
    coef = dawin.expertise_coefficients(h)
    row = [math.exp(-v) for v in h[0]]
    np.testing.assert_allclose(coef[0], [v / sum(row) for v in row], rtol=1e-14)
    np.testing.assert_allclose(coef[1], 0.25)


def test_oracle_coefficients_are_the_likelihood_ratio():
    # DaWin App. A.1: with cross-entropy as H, λ*(x) = p1(y|x) / (p0(y|x) + p1(y|x))
    z = random_logits(40, 2, 6)
    y = np.random.default_rng(2).integers(0, 6, size=40)
    lam = dawin.expertise_coefficients(dawin.oracle_losses(z, y))[:, 1]
    p = torch.softmax(torch.from_numpy(z), dim=-1).numpy()[np.arange(40), :, y]
    np.testing.assert_allclose(lam, p[:, 1] / (p[:, 0] + p[:, 1]), rtol=1e-12)


@pytest.mark.parametrize(
    "entropies, offset, message",
    [
        ([[0.1, np.nan], [0.2, 0.3]], False, "nan at row 0, column 1"),
        ([[0.1, 0.2], [np.inf, 0.3]], True, "inf at row 1, column 0"),
        ([[0.1], [0.2]], False, "M = 1"),
        ([0.1, 0.2], False, "2-D"),
        (np.zeros((0, 2)), False, "N = 0"),
        ([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]], True, "M = 3"),
        ([[0.1, 0.2]], True, "at least 2 samples"),
        ([[0.0, 0.2], [0.0, 0.1]], True, "positive mean"),
    ],
)
def test_coefficient_validation(entropies, offset, message):
    with pytest.raises(ValueError, match=message):
        dawin.expertise_coefficients(entropies, offset=offset)


# --- logit-only variants ---------------------------------------------------------------------------------------


def test_dynamic_classifier_selection_takes_the_chosen_models_prediction():
    z = random_logits(30, 3, 5)
    coef = dawin.expertise_coefficients(dawin.entropy(z))
    h = dawin.entropy(z)
    expected = [int(np.argmax(z[i, int(np.argmin(h[i]))])) for i in range(30)]
    np.testing.assert_array_equal(dawin.dynamic_classifier_selection(z.argmax(-1), coef), expected)


def test_dynamic_output_ensemble_and_output_ensemble():
    z = random_logits(30, 2, 5)
    coef = dawin.expertise_coefficients(dawin.entropy(z))
    p = torch.softmax(torch.from_numpy(z), dim=-1).numpy()
    expected = [int(np.argmax(coef[i, 0] * p[i, 0] + coef[i, 1] * p[i, 1])) for i in range(30)]
    np.testing.assert_array_equal(dawin.dynamic_output_ensemble(z, coef), expected)
    np.testing.assert_array_equal(dawin.output_ensemble(z), p.mean(1).argmax(1))
    with pytest.raises(ValueError, match="do not match"):
        dawin.dynamic_output_ensemble(z, coef[:10])
    with pytest.raises(ValueError, match=r"\(N, M, C\)"):
        dawin.output_ensemble(z[:, 0])


# --- mixture → merge coefficients ------------------------------------------------------------------------------


def test_two_model_mixture_maps_samples_to_beta_means():
    rng = np.random.default_rng(3)
    h = np.column_stack([rng.gamma(2.0, 0.8, 600), rng.gamma(2.0, 0.8, 600)])
    coef = dawin.expertise_coefficients(h, offset=True)
    mixture = dawin.fit_coefficient_mixture(coef, 3, seed=0)
    assert isinstance(mixture, BetaMixture)
    members, table = dawin.mixture_merge_coefficients(mixture, coef)
    np.testing.assert_array_equal(members, mixture.predict(coef[:, 1]))
    np.testing.assert_allclose(table[:, 1], mixture.alphas_ / (mixture.alphas_ + mixture.betas_))
    np.testing.assert_allclose(table.sum(1), 1.0)
    assert table.shape == (3, 2) and members.shape == (600,)


def test_many_model_mixture_maps_samples_to_dirichlet_means():
    rng = np.random.default_rng(4)
    coef = dawin.expertise_coefficients(rng.gamma(2.0, 0.8, size=(400, 4)))
    mixture = dawin.fit_coefficient_mixture(coef, 2, seed=0)
    assert isinstance(mixture, DirichletMixture)
    members, table = dawin.mixture_merge_coefficients(mixture, coef)
    np.testing.assert_array_equal(members, mixture.predict(coef))
    np.testing.assert_allclose(table, mixture.alphas_ / mixture.alphas_.sum(1, keepdims=True))
    with pytest.raises(ValueError, match="M = 4"):
        dawin.mixture_merge_coefficients(BetaMixture(1).fit([0.2, 0.4]), coef)


# --- merge groups: mean, fitted mixtures, one merge per distinct row ---------------------------------------------


def test_mean_mixture_is_the_arithmetic_mean_of_the_rows():
    rng = np.random.default_rng(5)
    coef = dawin.expertise_coefficients(rng.gamma(2.0, 0.8, size=(777, 8)))
    component, table = dawin.merge_groups(coef, "mean", k=1)
    assert table.shape == (1, 8) and table.dtype == np.float64
    assert np.array_equal(table[0], np.mean(coef, axis=0))  # bitwise
    # and against an exactly rounded sum per column (math.fsum), within one rounding of the division
    for j in range(8):
        assert table[0, j] == pytest.approx(math.fsum(coef[:, j]) / len(coef), rel=4 * np.finfo(float).eps)
    assert np.array_equal(component, np.zeros(777, dtype=np.int64))
    # the Dirichlet MLE mean is a different estimate on the same coefficients (the issue measured up to 0.07)
    _, dirichlet_table = dawin.merge_groups(coef, "dirichlet", k=1)
    assert np.abs(dirichlet_table[0] - table[0]).max() > 1e-3


def test_none_mixture_is_one_merge_per_distinct_row():
    coef = np.array([[0.2, 0.8], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    component, table = dawin.merge_groups(coef, "none")
    np.testing.assert_array_equal(table, [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    np.testing.assert_array_equal(component, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(table[component], coef)


def test_fitted_mixtures_through_merge_groups():
    rng = np.random.default_rng(3)
    coef = dawin.expertise_coefficients(np.column_stack([rng.gamma(2.0, 0.8, 300), rng.gamma(2.0, 0.8, 300)]))
    component, table = dawin.merge_groups(coef, "beta", k=3, seed=0)
    members, expected = dawin.mixture_merge_coefficients(dawin.fit_coefficient_mixture(coef, 3, seed=0), coef)
    np.testing.assert_array_equal(component, members)
    np.testing.assert_array_equal(table, expected)
    assert dawin.default_mixture(robust=True) == "beta" and dawin.default_mixture(robust=False) == "mean"


@pytest.mark.parametrize("mixture, k, message", [
    ("kmeans", 1, "mixture must be one of mean, dirichlet, beta, none, got 'kmeans'"),
    ("beta", 0, r"k must be an integer in \[1, N=4\]"),
    ("dirichlet", 5, r"k must be an integer in \[1, N=4\]"),
])
def test_merge_groups_validation(mixture, k, message):
    with pytest.raises(ValueError, match=message):
        dawin.merge_groups(np.full((4, 2), 0.5), mixture, k)
    with pytest.raises(ValueError, match="beta mixture models 2 candidates"):
        dawin.merge_groups(np.full((4, 3), 1 / 3), "beta", 1)


# --- the merge a coefficient row stands for ----------------------------------------------------------------------


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_merge_for_multitask_matches_a_float64_reference():
    base, fts = random_state(0), [random_state(i) for i in (1, 2, 3)]
    c = np.array([0.5, 0.3, 0.2])
    merged = dawin.merge_for(base, fts, c, robust=False, lam0=0.3)
    for key in base:
        theta0 = base[key].double()
        # θ0 + λ0·T·Σt λt (θt − θ0)
        expected = theta0 + 0.3 * 3 * sum(float(ct) * (ft[key].double() - theta0) for ct, ft in zip(c, fts))
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-6)
        assert merged[key].dtype == torch.float32
    # uniform coefficients: task arithmetic at λ0
    uniform = dawin.merge_for(base, fts, np.full(3, 1 / 3), robust=False, lam0=0.3)
    for key in base:
        expected = base[key].double() + 0.3 * sum(ft[key].double() - base[key].double() for ft in fts)
        torch.testing.assert_close(uniform[key].double(), expected, rtol=1e-6, atol=1e-6)


def test_merge_for_robust_interpolates_with_lambda():
    base, ft = random_state(0), random_state(1)
    merged = dawin.merge_for(base, [ft], np.array([0.25, 0.75]), robust=True)
    for key in base:
        expected = 0.25 * base[key].double() + 0.75 * ft[key].double()
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(2,\)"):
        dawin.merge_for(base, [ft], np.array([0.2, 0.3, 0.5]), robust=True)
    with pytest.raises(ValueError, match="one fine-tuned model, got 2"):
        dawin.merge_for(base, [ft, ft], np.array([0.5, 0.5]), robust=True)
    with pytest.raises(ValueError, match=r"must be \(2,\) for 2 fine-tuned"):
        dawin.merge_for(base, [ft, ft], np.array([1.0]), robust=False)
    with pytest.raises(ValueError, match="non-finite"):
        dawin.merge_for(base, [ft], np.array([0.5, np.nan]), robust=True)
