"""DaWin diagnostics against hand computations: synthetic logits whose entropy/cross-entropy correlations are known
in closed form (Spearman ±1 per split) or computed here in plain float64 Python (math, statistics), never by the
scipy call the module uses."""

from __future__ import annotations

import logging
import math
import statistics

import numpy as np
import pytest

from conftest import spearman_by_hand
from raymerge import dawin, diagnostics
from raymerge.diagnostics import Correlation

pytestmark = pytest.mark.filterwarnings("error")


def sigmoid(a: float) -> float:
    return 1 / (1 + math.exp(-a))


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# Two candidates, two classes, every label 0. Candidate m's logits on sample i are (0, a[i, m]): it is right when
# a < 0 (p_y = σ(−a) > ½) and wrong when a > 0. Where a candidate is right, its entropy and its cross-entropy
# −log σ(−a) both fall as |a| grows, so their Spearman ρ is +1; where it is wrong, the entropy falls while the
# cross-entropy grows, so ρ = −1 (DaWin Fig. 9: wrong models show no or negative correlation). No two |a| in a
# column are equal, so no entropies tie and ranks need no averaging.
A = np.array([
    # TT: both right
    [-0.5, -2.0], [-1.0, -0.3], [-2.5, -1.1], [-4.0, -0.7],
    # TF: candidate 0 right, candidate 1 wrong
    [-0.4, 0.6], [-1.7, 2.2], [-3.1, 0.9], [-0.9, 3.3], [-2.2, 1.4],
    # FT
    [0.8, -1.2], [1.9, -0.2], [0.3, -2.8],
    # FF: two samples only, so its correlations are undefined
    [1.5, 0.75], [2.6, 2.9],
])
SPLITS = {"TT": range(0, 4), "TF": range(4, 9), "FT": range(9, 12), "FF": range(12, 14)}


def synthetic_logits() -> tuple[np.ndarray, np.ndarray]:
    logits = np.stack([np.zeros_like(A), A], axis=-1)  # (N, M=2, C=2)
    return logits, np.zeros(len(A), dtype=np.int64)


def hand_columns(temperatures: tuple[float, float]) -> dict[str, list[list[float]]]:
    """Entropy, cross-entropy and the two coefficients per sample, in plain Python from the formulas."""
    h, ce = [], []
    for row in A:
        p_wrong = [sigmoid(a / t) for a, t in zip(row, temperatures)]  # probability of class 1
        h.append([binary_entropy(p) for p in p_wrong])
        ce.append([-math.log(1 - p) for p in p_wrong])
    lam = [math.exp(-b) / (math.exp(-a) + math.exp(-b)) for a, b in h]  # DaWin Eq. 1
    oracle = [math.exp(-b) / (math.exp(-a) + math.exp(-b)) for a, b in ce]  # Eq. 1 on cross-entropies
    return {"h": h, "ce": ce, "lam": lam, "oracle": oracle}


TEMPERATURES = (0.8, 1.3)


@pytest.fixture(scope="module")
def diag() -> diagnostics.Diagnostics:
    logits, labels = synthetic_logits()
    coefficients = dawin.expertise_coefficients(dawin.entropy(logits, TEMPERATURES))
    return diagnostics.diagnose_logits(logits, labels, TEMPERATURES, coefficients, names=["zeroshot", "ft"])


def test_splits_by_correctness(diag: diagnostics.Diagnostics) -> None:
    assert [s.name for s in diag.splits] == ["all", "TT", "TF", "FT", "FF"]
    assert [s.size for s in diag.splits] == [14, 4, 5, 3, 2]
    for name, rows in SPLITS.items():
        assert np.flatnonzero(diag.groups[name]).tolist() == list(rows)


def test_entropy_versus_cross_entropy_per_split(diag: diagnostics.Diagnostics) -> None:
    hand = hand_columns(TEMPERATURES)
    # closed form: Spearman +1 for a right candidate, −1 for a wrong one
    right = {"TT": (True, True), "TF": (True, False), "FT": (False, True)}
    for name, ok in right.items():
        split = diag.split(name)
        for m in range(2):
            h = [hand["h"][i][m] for i in SPLITS[name]]
            ce = [hand["ce"][i][m] for i in SPLITS[name]]
            got = split.entropy_vs_loss[m]
            assert got.spearman == pytest.approx(1.0 if ok[m] else -1.0, abs=1e-12), (name, m)
            assert got.pearson == pytest.approx(statistics.correlation(h, ce), abs=1e-12), (name, m)
            assert (got.n, got.reason) == (len(SPLITS[name]), "")
    for m in range(2):
        h, ce = [r[m] for r in hand["h"]], [r[m] for r in hand["ce"]]
        got = diag.splits[0].entropy_vs_loss[m]
        assert got.pearson == pytest.approx(statistics.correlation(h, ce), abs=1e-12)
        assert got.spearman == pytest.approx(spearman_by_hand(h, ce), abs=1e-12)


def test_coefficient_versus_oracle_is_lambda_against_lambda_star(diag: diagnostics.Diagnostics) -> None:
    hand = hand_columns(TEMPERATURES)
    got = diag.overall
    assert got.pearson == pytest.approx(statistics.correlation(hand["lam"], hand["oracle"]), abs=1e-12)
    assert got.spearman == pytest.approx(spearman_by_hand(hand["lam"], hand["oracle"]), abs=1e-12)
    tf = [hand["lam"][i] for i in SPLITS["TF"]], [hand["oracle"][i] for i in SPLITS["TF"]]
    assert diag.split("TF").coefficient_vs_oracle.pearson == pytest.approx(statistics.correlation(*tf), abs=1e-12)
    # oracle λ*(x) = p1(y) / (p0(y) + p1(y)), since exp(−CE) is the probability of the label
    p_y = 1 - np.vectorize(sigmoid)(A / np.array(TEMPERATURES))
    np.testing.assert_allclose(diag.oracle_coefficients[:, 1], p_y[:, 1] / p_y.sum(1), rtol=1e-13)


def test_degenerate_splits_give_nan_with_a_reason(diag: diagnostics.Diagnostics) -> None:
    ff = diag.split("FF")
    assert all(math.isnan(c.pearson) and math.isnan(c.spearman) for c in (*ff.entropy_vs_loss, ff.coefficient_vs_oracle))
    assert ff.coefficient_vs_oracle.reason == "2 samples"
    assert str(ff.entropy_vs_loss[0]) == "n/a (2 samples)"
    empty = diagnostics.correlation([], [])
    assert empty.n == 0 and empty.reason == "0 samples" and math.isnan(empty.pearson)
    constant = diagnostics.correlation([1.0, 1.0, 1.0, 1.0], [0.1, 0.5, 0.2, 0.9], ("entropy", "cross-entropy"))
    assert constant.reason == "constant entropy" and math.isnan(constant.spearman)
    assert diagnostics.correlation([0.1, 0.5, 0.2], [3.0] * 3, ("a", "b")).reason == "constant b"


def test_all_identical_logits_do_not_crash_or_warn() -> None:
    # every candidate uniform over 3 classes: constant entropy, constant cross-entropy, coefficients all ½
    logits = np.zeros((6, 2, 3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    d = diagnostics.diagnose_logits(logits, labels, [1.0, 1.0], np.full((6, 2), 0.5))
    assert d.overall.reason == "constant coefficient" and d.weak
    assert d.verdict == "cannot tell whether entropy tracks the loss here (constant coefficient)"
    assert [s.size for s in d.splits] == [6, 2, 0, 0, 4]  # argmax of a tie is class 0
    assert d.split("TF").mean_entropies == {"model 0": pytest.approx(math.nan, nan_ok=True),
                                            "model 1": pytest.approx(math.nan, nan_ok=True)}


def test_correlation_hand_computed_example() -> None:
    # x = 1..5, y = (2, 1, 4, 3, 5): Σ dx·dy = 8, Σ dx² = Σ dy² = 10, so r = 0.8; ranks equal values, so ρ = 0.8
    got = diagnostics.correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert (got.pearson, got.spearman, got.n) == (pytest.approx(0.8, abs=1e-15), pytest.approx(0.8, abs=1e-15), 5)
    # a monotone but non-linear relation: ρ = 1 exactly, r below 1
    x = [0.0, 1.0, 2.0, 3.0]
    exp_corr = diagnostics.correlation(x, [math.exp(3 * v) for v in x])
    assert exp_corr.spearman == 1.0 and exp_corr.pearson == pytest.approx(
        statistics.correlation(x, [math.exp(3 * v) for v in x]), abs=1e-14) and exp_corr.pearson < 0.9
    # ties take average ranks: x ranks (1.5, 1.5, 3, 4), y ranks (1, 2, 3, 4)
    tied = diagnostics.correlation([1, 1, 2, 3], [1, 2, 3, 4])
    assert tied.spearman == pytest.approx(statistics.correlation([1.5, 1.5, 3, 4], [1, 2, 3, 4]), abs=1e-15)
    with pytest.raises(ValueError, match="x has 2 values but y has 3"):
        diagnostics.correlation([1, 2], [1, 2, 3])


def test_many_candidates_groups_and_flattened_coefficients() -> None:
    rng = np.random.default_rng(3)
    n, m, c = 40, 4, 5
    logits = rng.normal(scale=2.0, size=(n, m, c))
    labels = rng.integers(0, c, size=n)
    coefficients = rng.dirichlet(np.ones(m), size=n)
    names = ["a", "b", "c", "d"]
    d = diagnostics.diagnose_logits(logits, labels, np.ones(m), coefficients, names=names)
    correct = logits.argmax(-1) == labels[:, None]
    assert [s.name for s in d.splits] == ["all", "a right", "b right", "c right", "d right", "none right"]
    for j, name in enumerate(names):
        assert np.array_equal(d.groups[f"{name} right"], correct[:, j])
    assert np.array_equal(d.groups["none right"], ~correct.any(1))
    # the M > 2 comparison: the whole matrices flattened, Pearson by the textbook formula
    oracle = []
    for i in range(n):
        losses = [-(logits[i, j, labels[i]] - math.log(sum(math.exp(v) for v in logits[i, j]))) for j in range(m)]
        total = sum(math.exp(-v) for v in losses)
        oracle.append([math.exp(-v) / total for v in losses])
    np.testing.assert_allclose(d.oracle_coefficients, oracle, rtol=1e-12)
    flat_oracle = [v for row in oracle for v in row]
    expected = statistics.correlation(coefficients.ravel().tolist(), flat_oracle)
    assert d.overall.pearson == pytest.approx(expected, abs=1e-12)
    assert d.overall.n == n * m


def test_mean_entropies_of_candidates_static_merge_and_dawin() -> None:
    logits, labels = synthetic_logits()
    static = np.stack([np.zeros(len(A)), np.full(len(A), 1.0)], axis=1)  # σ(1) for every sample
    output = np.stack([np.zeros(len(A)), np.linspace(-3, 3, len(A))], axis=1)
    d = diagnostics.diagnose_logits(logits, labels, TEMPERATURES, np.full((len(A), 2), 0.5), names=["zs", "ft"],
                                    static_logits=static, output_logits=output)
    tf = list(SPLITS["TF"])
    means = d.split("TF").mean_entropies
    assert list(means) == ["zs", "ft", diagnostics.STATIC_LABEL, diagnostics.OUTPUT_LABEL]
    # candidates at temperature 1 (merged models have no fitted temperature), in nats
    assert means["zs"] == pytest.approx(statistics.fmean(binary_entropy(sigmoid(A[i, 0])) for i in tf), rel=1e-13)
    assert means["ft"] == pytest.approx(statistics.fmean(binary_entropy(sigmoid(A[i, 1])) for i in tf), rel=1e-13)
    assert means[diagnostics.STATIC_LABEL] == pytest.approx(binary_entropy(sigmoid(1.0)), rel=1e-13)
    out = np.linspace(-3, 3, len(A))
    assert means[diagnostics.OUTPUT_LABEL] == pytest.approx(statistics.fmean(binary_entropy(sigmoid(out[i])) for i in tf), rel=1e-13)


def test_sample_columns_by_hand() -> None:
    logits, labels = synthetic_logits()
    cols = diagnostics.sample_columns(logits, labels, TEMPERATURES)
    hand = hand_columns(TEMPERATURES)
    np.testing.assert_allclose(cols["entropies"], hand["h"], rtol=1e-13)
    np.testing.assert_allclose(cols["cross_entropies"], hand["ce"], rtol=1e-13)
    np.testing.assert_allclose(cols["oracle_coefficients"][:, 1], hand["oracle"], rtol=1e-13)
    assert np.array_equal(cols["candidate_predictions"], (A > 0).astype(int))
    assert np.array_equal(cols["candidate_correct"], A < 0) and cols["candidate_correct"].dtype == bool
    assert "coefficients" not in cols


def test_histogram_counts_by_hand() -> None:
    lam = np.array([0.05, 0.15, 0.16, 0.95, 0.5])
    oracle = np.array([0.96, 0.97, 0.05, 0.99, 0.51])
    columns = {"entropies": np.ones((5, 2)), "cross_entropies": np.ones((5, 2)),
               "coefficients": np.column_stack([1 - lam, lam]), "oracle_coefficients": np.column_stack([1 - oracle, oracle]),
               "candidate_correct": np.array([[1, 1], [1, 1], [1, 0], [0, 0], [1, 1]], dtype=bool)}
    d = diagnostics.diagnose(columns)
    edges, ours, theirs = d.histogram("all", bins=10)
    np.testing.assert_allclose(edges, np.arange(11) / 10)
    assert ours.tolist() == [1, 2, 0, 0, 0, 1, 0, 0, 0, 1]
    assert theirs.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert d.histogram("TT", bins=10)[1].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("r, expected, weak", [
    (0.71, "entropy tracks the loss here (r = 0.71)", False),
    (0.55, "entropy tracks the loss only moderately here (r = 0.55)", False),
    (0.08, "entropy does not track the loss here (r = 0.08): expect DaWin ≈ static interpolation", True),
    (-0.3, "entropy does not track the loss here (r = -0.30): expect DaWin ≈ static interpolation", True),
])
def test_verdict_thresholds(r: float, expected: str, weak: bool) -> None:
    assert diagnostics.verdict(Correlation(r, r, 100)) == expected
    assert (r < diagnostics.WEAK_CORRELATION) == weak


def columns_with(lam: list[float], oracle: list[float]) -> dict[str, np.ndarray]:
    n = len(lam)
    return {"entropies": np.ones((n, 2)), "cross_entropies": np.ones((n, 2)),
            "coefficients": np.column_stack([1 - np.array(lam), lam]),
            "oracle_coefficients": np.column_stack([1 - np.array(oracle), oracle]),
            "candidate_correct": np.ones((n, 2), dtype=bool)}


def test_warn_if_weak_logs_one_warning_per_weak_set(diag: diagnostics.Diagnostics, caplog: pytest.LogCaptureFixture) -> None:
    # the synthetic set: wrong candidates are confident, so λ follows λ* only weakly there
    r = statistics.correlation(hand_columns(TEMPERATURES)["lam"], hand_columns(TEMPERATURES)["oracle"])
    assert diag.weak and r < diagnostics.WEAK_CORRELATION
    tracking = diagnostics.diagnose(columns_with([0.1, 0.3, 0.5, 0.8], [0.2, 0.35, 0.6, 0.9]))
    flat = diagnostics.diagnose(columns_with([0.5] * 4, [0.2, 0.35, 0.6, 0.9]))
    assert not tracking.weak
    with caplog.at_level(logging.WARNING, logger="raymerge.dawin"):
        messages = diagnostics.warn_if_weak({("digits", "test"): tracking, ("digits", "noise"): flat, "synthetic": diag})
    assert messages == ["DaWin on digits/noise: cannot tell whether entropy tracks the loss here (constant coefficient)",
                        f"DaWin on synthetic: entropy does not track the loss here (r = {r:.2f}): expect DaWin ≈ static "
                        "interpolation"]
    assert [r.getMessage() for r in caplog.records] == messages


def test_bad_columns_are_named() -> None:
    with pytest.raises(KeyError, match="cross_entropies"):
        diagnostics.diagnose({"entropies": np.ones((3, 2))})
    with pytest.raises(ValueError, match="'coefficients' must be"):
        diagnostics.diagnose({"entropies": np.ones((3, 2)), "cross_entropies": np.ones((3, 2)),
                              "coefficients": np.ones((3, 3))})
    with pytest.raises(ValueError, match="3 candidate names for M = 2"):
        diagnostics.correctness_groups(np.ones((3, 2), dtype=bool), ["a", "b", "c"])


@pytest.mark.parametrize("m", [2, 5])
def test_split_correlations_with_ties_match_scipy(m):
    """Every split's Spearman ρ and Pearson r against scipy.stats.spearmanr / pearsonr on that split's own values,
    on data rounded to one decimal (many ties, within splits and across them), with empty, too small and constant
    splits."""
    from scipy import stats

    rng = np.random.default_rng(m)
    n = 400
    h = np.round(rng.random((n, m)) * 2, 1)
    ce = np.round(h + rng.normal(0, 0.5, (n, m)), 1)
    c = np.round(rng.dirichlet(np.ones(m), n), 1)
    oracle = np.round(0.5 * c + 0.5 * rng.dirichlet(np.ones(m), n), 1)
    correct = rng.random((n, m)) < 0.7
    correct[:, 0], correct[:2, 0] = True, False  # candidate 0 wrong on 2 samples only (M = 2: FT below MIN_SAMPLES)
    correct[:, 1] = True  # M = 2: TF and FF empty; M > 2: "none right" empty
    h[correct[:, -1], -1] = 0.7  # the last candidate's entropy is one value wherever it is right
    d = diagnostics.diagnose({"entropies": h, "cross_entropies": ce, "coefficients": c, "oracle_coefficients": oracle,
                              "candidate_correct": correct})
    checked, reasons = 0, set()
    for split in d.splits:
        mask = d.groups[split.name]
        pairs = [(h[mask, j], ce[mask, j]) for j in range(m)]
        pairs.append((c[mask, 1], oracle[mask, 1]) if m == 2 else (c[mask].ravel(), oracle[mask].ravel()))
        for got, (x, y) in zip((*split.entropy_vs_loss, split.coefficient_vs_oracle), pairs):
            assert got.n == len(x)
            if len(x) < diagnostics.MIN_SAMPLES or np.ptp(x) == 0:
                assert math.isnan(got.spearman) and math.isnan(got.pearson)
                reasons.add(got.reason)
                continue
            assert got.spearman == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12), split.name
            assert got.pearson == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12), split.name
            checked += 1
    # M = 2: all and TT, but candidate 1 (right everywhere) has a constant entropy in both; M = 5: all and each
    # candidate's right samples, but candidate 4's entropy is constant among its right ones
    assert checked == {2: 2 * 2, 5: 6 * 6 - 1}[m]
    assert reasons == ({"0 samples", "2 samples", "constant entropy"} if m == 2 else {"0 samples", "constant entropy"})
