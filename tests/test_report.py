"""Report tables and plots on a hand-built results store (no models, no Ray): numbers against hand-computed ones,
PNGs written, referenced and valid, and plots skipped when their rows are absent."""

from __future__ import annotations

import json
import math
import re
import statistics
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import spearman_by_hand
from raymerge import report
from raymerge.results import ResultStore, row_key

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHIFTS = ("shift_a", "shift_b")
TASKS = ("cars", "dtd", "eurosat", "gtsrb")
PLOTS = {"robust_id_vs_ood.png", "robust_dawin_lambda.png", "multitask_rank_sweep.png",
         "multitask_dawin_coefficients.png", "multitask_tasks_vs_accuracy.png", "robust_dawin_diagnostics.png",
         "multitask_dawin_diagnostics.png"}
SAMPLE_PLOTS = {"robust_dawin_lambda.png", "multitask_dawin_coefficients.png", "robust_dawin_diagnostics.png",
                "multitask_dawin_diagnostics.png"}


def make_row(exp: str, method: str, params: dict[str, Any], task: str, split: str, accuracy: float) -> dict[str, Any]:
    key = row_key({"method": method, "params": params, "pool": "pool", "task": task, "split": split})
    return {"key": key, "experiment": exp, "method": method, "params": params,
            "pool": "pool", "task": task, "split": split, "accuracy": accuracy, "n": 100, "seconds": 1.0, "merges": 1}


def robust_rows(accs: dict[tuple[str, str], tuple[float, float, float]]) -> list[dict[str, Any]]:
    """Rows of the robust experiment from {(method, params JSON-able repr): (ID, shift_a, shift_b)}."""
    rows = []
    for (method, params), values in accs.items():
        for split, acc in zip(("test", *SHIFTS), values):
            rows.append(make_row("robust", method, dict(params), "digits", split, acc))
    return rows


def wise_ft_accuracy(lam: float) -> tuple[float, float, float]:
    """A concave WiSE-FT grid between ZS (0.60; 0.50, 0.40) and FT (0.90; 0.40, 0.30)."""
    idacc = 0.60 + 0.30 * lam + 0.10 * lam * (1 - lam)
    ood = 0.45 - 0.10 * lam + 0.40 * lam * (1 - lam)
    return idacc, ood + 0.05, ood - 0.05


ROBUST = {
    ("zeroshot", ()): (0.60, 0.50, 0.40),
    ("finetuned", (("model", "ft1"),)): (0.90, 0.40, 0.30),
    ("finetuned", (("model", "ft2"),)): (0.86, 0.37, 0.31),
    ("output_ensemble", (("models", ("base", "ft1")),)): (0.84, 0.52, 0.44),
    ("weight_average", ()): (0.89, 0.42, 0.34),
    ("greedy_soup", ()): (0.91, 0.43, 0.33),
    ("model_stock", ()): (0.88, 0.47, 0.39),
    ("dawin", (("k", 3), ("mixture", "beta"), ("offset", True), ("scores", "entropy"), ("models", ("base", "ft1")))): (0.89, 0.58, 0.50),
    ("dawin", (("k", 3), ("mixture", "beta"), ("offset", False), ("scores", "entropy"), ("models", ("base", "ft1")))): (0.88, 0.55, 0.47),
    ("dawin", (("k", 3), ("mixture", "none"), ("offset", True), ("scores", "entropy"), ("models", ("base", "ft1")))): (0.895, 0.585, 0.505),
    ("dawin_dcs", (("offset", True), ("models", ("base", "ft1")))): (0.85, 0.53, 0.45),
    ("dawin_doe", (("offset", True), ("models", ("base", "ft1")))): (0.87, 0.56, 0.48),
    ("dawin", (("k", 3), ("mixture", "none"), ("offset", False), ("scores", "oracle"), ("models", ("base", "ft1")))): (0.97, 0.80, 0.74),
    **{("wise_ft", (("lam", lam), ("model", "ft1"))): wise_ft_accuracy(lam) for lam in np.round(np.linspace(0, 1, 11), 1)},
}

# Robust DaWin (offset) λ(x) per set: three clusters, members of component j near CLUSTERS[j].
CLUSTERS = (0.15, 0.5, 0.85)


def diagnostic_columns(seed: int, coefficients: np.ndarray) -> dict[str, np.ndarray]:
    """The per-sample diagnostic columns of a DaWin row, made up directly (no logits): cross-entropies follow the
    entropies loosely, the oracle coefficient is the softmax of −cross-entropy, a candidate is right when its
    cross-entropy is below log 2."""
    n, m = coefficients.shape
    rng = np.random.default_rng(100 + seed)
    h = rng.gamma(2.0, 0.5, size=(n, m))
    ce = h * rng.uniform(0.3, 1.7, size=(n, m)) + rng.gamma(1.0, 0.2, size=(n, m))
    oracle = np.exp(-ce) / np.exp(-ce).sum(1, keepdims=True)
    return {"entropies": h, "cross_entropies": ce, "entropies_t1": 1.1 * h, "oracle_coefficients": oracle,
            "candidate_correct": ce < math.log(2), "candidate_predictions": rng.integers(0, 10, size=(n, m)),
            "reference_entropy": 0.9 * h.mean(1), "output_entropy": 0.8 * h.min(1)}


def robust_samples(seed: int, n: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    component = rng.integers(0, 3, size=n)
    lam = np.clip(np.array(CLUSTERS)[component] + rng.normal(0, 0.06, size=n), 0, 1)
    coefficients = np.column_stack([1 - lam, lam])
    return {"prediction": np.zeros(n, np.int64), "label": np.zeros(n, np.int64),
            "coefficients": coefficients, "component": component, **diagnostic_columns(seed, coefficients)}


def multitask_coefficients(task_index: int, n: int) -> np.ndarray:
    """Coefficients (n, T): the task's own model weighted 0.55 on average, the others share the rest."""
    rng = np.random.default_rng(task_index)
    own = 0.55 + rng.uniform(-0.1, 0.1, size=n)
    c = np.tile((1 - own)[:, None] / (len(TASKS) - 1), (1, len(TASKS)))
    c[:, task_index] = own
    return c


# Per-task accuracy of the static multi-task methods, and of the rank sweep at ρ (CART rises then falls).
MULTITASK = {
    ("zeroshot", ()): (0.40, 0.35, 0.45, 0.30),
    ("weight_average", ()): (0.60, 0.55, 0.70, 0.62),
    ("task_arithmetic", (("lambdas", (0.3,)),)): (0.66, 0.60, 0.78, 0.70),
    ("ties", (("density", 0.2), ("lam", 1.0))): (0.68, 0.61, 0.80, 0.71),
    ("cart", (("lam", 1.0), ("rank_ratio", 0.08), ("svd", "exact"))): (0.80, 0.70, 0.90, 0.86),
    ("dawin", (("k", 3), ("mixture", "none"), ("models", TASKS), ("offset", False))): (0.79, 0.69, 0.91, 0.84),
}
INDIVIDUAL = (0.90, 0.80, 0.98, 0.97)
RANK_RATIOS = (0.0, 0.04, 0.08, 0.16, 0.32, 0.5, 0.75, 1.0)


def cart_sweep(rho: float) -> float:
    return 0.62 + 0.25 * math.exp(-((rho - 0.1) / 0.15) ** 2) - 0.03 * rho


def ta_sweep(rho: float) -> float:
    return 0.55 + 0.12 * (1 - math.exp(-rho / 0.1))


def subset_accuracy(method: str, task: str, subset: tuple[str, ...]) -> float:
    """Merging more tasks costs accuracy; CART less than task arithmetic; tasks differ by a fixed offset."""
    drop = {"sweep/cart": 0.03, "sweep/task_arithmetic": 0.07}[method]
    return 0.92 - drop * len(subset) + 0.01 * TASKS.index(task) - 0.02 * TASKS.index(subset[0])


def multitask_rows() -> list[dict[str, Any]]:
    rows = []
    for (method, params), accs in MULTITASK.items():
        rows += [make_row("multitask", method, dict(params), t, "test", a) for t, a in zip(TASKS, accs)]
    rows += [make_row("multitask", "finetuned", {"model": t, "own_task": True}, t, "test", a) for t, a in zip(TASKS, INDIVIDUAL)]
    sweep = {"cart_lam": 1.0, "task_arithmetic_lam": 0.3, "svd": "exact"}
    for rho in RANK_RATIOS:
        for t in TASKS:
            rows.append(make_row("multitask", "rank_sweep", {"curve": "cart", "rank_ratio": rho, **sweep}, t, "test", cart_sweep(rho)))
            rows.append(make_row("multitask", "rank_sweep", {"curve": "task_arithmetic", "rank_ratio": rho, **sweep}, t, "test", ta_sweep(rho)))
    for method in ("sweep/cart", "sweep/task_arithmetic"):
        for size in (2, 3, 4):
            for subset in combinations(TASKS, size):
                rows += [make_row("multitask", method, {"subset": list(subset), "lam": 1.0}, t, "test",
                                  subset_accuracy(method, t, subset)) for t in subset]
    return rows


DAWIN_MULTITASK = ("dawin", (("k", 1), ("mixture", "dirichlet"), ("models", TASKS), ("offset", False)))


def build_store(root: Path) -> ResultStore:
    """Both experiments, with per-sample coefficients for the DaWin rows the plots read."""
    store = ResultStore(root)
    rows = robust_rows(ROBUST) + multitask_rows()
    dawin_mt = [make_row("multitask", DAWIN_MULTITASK[0], dict(DAWIN_MULTITASK[1]), t, "test", a)
                for t, a in zip(TASKS, (0.81, 0.72, 0.92, 0.88))]
    samples = {r["key"]: robust_samples(("test", *SHIFTS).index(r["split"]))
               for r in rows if r["method"] == "dawin" and r["params"].get("offset") is True}
    for i, r in enumerate(dawin_mt):
        n = 50 + 10 * i
        coefficients = multitask_coefficients(i, n)
        samples[r["key"]] = {"prediction": np.zeros(n, np.int64), "label": np.zeros(n, np.int64),
                             "coefficients": coefficients, "component": np.zeros(n, np.int64),
                             **diagnostic_columns(10 + i, coefficients)}
    store.append(rows + dawin_mt, samples=samples)
    return store


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory) -> ResultStore:
    return build_store(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def full_report(full_store: ResultStore) -> Path:
    return report.write_report(full_store.root)


def experiment_rows(store: ResultStore, name: str) -> list[dict[str, Any]]:
    return [r for r in store.rows() if r["experiment"] == name]


def table_by_label(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[Any]]]:
    header, body = report.build_table(rows)
    return header, {r[0]: r for r in body}


def test_robust_table_ood_average_is_the_mean_of_the_shifts(full_store: ResultStore) -> None:
    header, table = table_by_label(experiment_rows(full_store, "robust"))
    assert header[:5] == ["method", "ID", "shift_a", "shift_b", "OOD avg"]
    zs, wise = table["zeroshot"], table["wise_ft lam=0.3"]
    assert zs[1:5] == pytest.approx([60.0, 50.0, 40.0, 45.0])
    idacc, a, b = wise_ft_accuracy(0.3)
    assert wise[1:5] == pytest.approx([100 * idacc, 100 * a, 100 * b, 50 * (a + b)])
    assert table["dawin mixture=beta offset=True"][4] == pytest.approx(54.0)
    assert table["dawin mixture=none offset=False scores=oracle"][4] == pytest.approx(77.0)


def test_multitask_table_averages_over_tasks_and_leaves_sweeps_out(full_store: ResultStore) -> None:
    rows = experiment_rows(full_store, "multitask")
    header, table = table_by_label(rows)
    assert header == ["method", *TASKS, "avg", "seconds", "merges/set"]
    assert table["cart"][5] == pytest.approx(100 * (0.80 + 0.70 + 0.90 + 0.86) / 4)
    # each individual model is evaluated on its own task only: its row has one cell, and that is its average
    assert table["finetuned (each on its own task)"][1:6] == pytest.approx([90.0, 80.0, 98.0, 97.0, 91.25])
    assert not [label for label in table if report.is_sweep(label.split()[0])]
    assert "sweep/" not in report.format_table(rows) and "sweep/" not in report.format_table(rows, markdown=True)


def test_write_report_embeds_every_plot_and_the_pngs_are_valid(full_report: Path) -> None:
    text = full_report.read_text()
    embedded = set(re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", text))
    assert embedded == PLOTS
    for name in PLOTS:
        data = (full_report.parent / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    assert set(p.name for p in full_report.parent.glob("*.png")) == PLOTS
    assert not list(full_report.parent.glob(".*.tmp")), "temporary files left behind"
    assert "sweep/" not in text.split("### Accuracy versus rank ratio")[0]
    assert "rank_sweep" not in text.split("## multitask")[1].split("### ")[0]  # not in the multi-task table


def test_id_ood_points_match_the_table(full_store: ResultStore) -> None:
    points = {report.method_label(p.method, p.params): p for p in report.id_ood_points(experiment_rows(full_store, "robust"))}
    assert (points["finetuned model=ft1"].id_acc, points["finetuned model=ft1"].ood_acc) == pytest.approx((90.0, 35.0))
    assert len([p for p in points.values() if p.method == "wise_ft"]) == 11


def test_coefficient_matrix_is_the_mean_coefficient_per_task_and_model(full_store: ResultStore) -> None:
    rows = [r for r in experiment_rows(full_store, "multitask") if r["method"] == "dawin"]
    tasks, models, matrix = report.coefficient_matrix(full_store, rows[::-1])  # row order must not matter
    assert tasks == list(TASKS) and models == list(TASKS)
    expected = np.array([multitask_coefficients(i, 50 + 10 * i).mean(axis=0) for i in range(len(TASKS))])
    np.testing.assert_allclose(matrix, expected)
    assert np.all(np.diag(matrix) == matrix.max(axis=1))


def test_lambda_by_set_gives_lambda_and_component_means(full_store: ResultStore) -> None:
    rows = [r for r in experiment_rows(full_store, "robust")
            if r["method"] == "dawin" and '"offset": true' in r["params"] and '"mixture": "beta"' in r["params"]]
    sets = report.lambda_by_set(full_store, rows)
    assert [s.split for s in sets] == ["test", *SHIFTS]
    cols = robust_samples(1)
    lam = cols["coefficients"][:, 1]
    np.testing.assert_allclose(sets[1].lambdas, lam)
    expected = sorted((lam[cols["component"] == j].mean(), int((cols["component"] == j).sum())) for j in range(3))
    assert sets[1].components == [(pytest.approx(m), n) for m, n in expected]


def test_accuracy_by_task_count_hand_computed() -> None:
    def row(subset: list[str], task: str, acc: float, method: str = "sweep/cart") -> dict[str, Any]:
        return make_row("mt", method, {"subset": subset, "lam": 1.0}, task, "test", acc)

    rows = [
        row(["a", "b"], "a", 0.80), row(["a", "b"], "b", 0.70),  # subset average 75
        row(["a", "c"], "a", 0.90), row(["a", "c"], "c", 0.70),  # 80
        row(["b", "c"], "b", 0.60), row(["b", "c"], "c", 0.80),  # 70
        row(["b", "c"], "a", 0.10),  # a task outside the subset: ignored
        row(["a", "b", "c"], "a", 0.60), row(["a", "b", "c"], "b", 0.60), row(["a", "b", "c"], "c", 0.90),  # 70
        row(["a", "b"], "a", 0.5, "sweep/task_arithmetic"), row(["a", "b"], "b", 0.7, "sweep/task_arithmetic"),
        make_row("mt", "cart", {"lam": 1.0}, "a", "test", 0.99),  # not a sweep row
    ]
    curves = report.accuracy_by_task_count(rows)
    assert list(curves) == ["cart", "task_arithmetic lam=1.0"]  # labels show what differs from the defaults
    two, three = curves["cart"]
    # subset averages 75, 80, 70: mean 75, std(ddof=1) = sqrt((0 + 25 + 25) / 2) = 5, s.e. = 5 / sqrt(3)
    assert (two.size, two.subsets) == (2, 3)
    assert two.mean == pytest.approx(75.0) and two.sem == pytest.approx(5 / math.sqrt(3))
    assert (three.size, three.mean, three.subsets) == (3, pytest.approx(70.0), 1) and math.isnan(three.sem)
    assert curves["task_arithmetic lam=1.0"] == [(2, pytest.approx(60.0), pytest.approx(math.nan, nan_ok=True), 1)]
    lines = report.format_sweep_table(rows).splitlines()
    assert lines[0].split() == ["tasks", "cart", "task_arithmetic", "lam=1.0"]
    assert lines[2].split() == ["2", "75.0", "±", "2.9", "(3)", "60.0", "±", "-", "(1)"]
    assert lines[3].split() == ["3", "70.0", "±", "-", "(1)", "-"]


def test_rank_sweep_curves_and_references(full_store: ResultStore) -> None:
    rows = experiment_rows(full_store, "multitask")
    curves = report.rank_sweep_curves(rows)
    assert list(curves) == ["CART lam=1.0", "low-rank task arithmetic lam=0.3"]
    assert curves["CART lam=1.0"] == [(rho, pytest.approx(100 * cart_sweep(rho))) for rho in RANK_RATIOS]
    refs = report.reference_accuracies(rows)
    assert refs == {"weight_average": pytest.approx(61.75), "task_arithmetic": pytest.approx(68.5),
                    "individual (upper bound)": pytest.approx(91.25)}


def test_missing_rows_skip_their_plots(tmp_path: Path) -> None:
    # robust without DaWin, multi-task without sweeps or DaWin: only the ID-vs-OOD plot can be drawn
    store = ResultStore(tmp_path)
    store.append([r for r in robust_rows(ROBUST) if not r["method"].startswith("dawin")]
                 + [r for r in multitask_rows() if "sweep" not in r["method"]])
    text = report.write_report(tmp_path).read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {"robust_id_vs_ood.png"}
    assert "robust_id_vs_ood.png" in text and "## multitask" in text


def test_missing_samples_and_empty_store_do_not_crash(tmp_path: Path) -> None:
    assert "# raymerge report" in report.write_report(tmp_path / "empty").read_text()
    store = build_store(tmp_path / "full")
    for f in store.samples_dir.glob("*.parquet"):
        f.unlink()
    report.write_report(store.root)
    assert {p.name for p in store.root.glob("*.png")} == PLOTS - SAMPLE_PLOTS


# --- DaWin diagnostics, recomputed from the stored per-sample columns ------------------------------------------


def r_rho(x: list[float], y: list[float]) -> str:
    # the made-up columns are continuous, so no ties
    return f"{statistics.correlation(x, y):.2f} / {spearman_by_hand(x, y):.2f}"


def test_dawin_diagnostics_tables_from_the_samples_files(full_store: ResultStore) -> None:
    rows = report._latest_config(experiment_rows(full_store, "robust"), "dawin", offset=True)
    sets = report.dawin_diagnostics(full_store, rows[::-1])
    assert [s.split for s in sets] == ["test", *SHIFTS]
    cols = robust_samples(1)  # shift_a
    d = sets[1].diagnostics
    assert d.names == ("base", "ft1")
    header, body = report.diagnostics_table(d)
    assert header == ["split", "n", "H vs CE: base (r / ρ)", "H vs CE: ft1 (r / ρ)", "λ vs oracle λ* (r / ρ)"]
    correct = cols["candidate_correct"]
    masks = {"all": np.ones(300, bool), "TT": correct[:, 0] & correct[:, 1], "TF": correct[:, 0] & ~correct[:, 1],
             "FT": ~correct[:, 0] & correct[:, 1], "FF": ~correct[:, 0] & ~correct[:, 1]}
    assert [row[0] for row in body] == list(masks)
    for row, mask in zip(body, masks.values()):
        assert row[1] == str(int(mask.sum()))
        idx = np.flatnonzero(mask).tolist()
        for j in range(2):
            h, ce = [cols["entropies"][i, j] for i in idx], [cols["cross_entropies"][i, j] for i in idx]
            assert row[2 + j] == r_rho(h, ce)
        lam, oracle = [cols["coefficients"][i, 1] for i in idx], [cols["oracle_coefficients"][i, 1] for i in idx]
        assert row[4] == r_rho(lam, oracle)
    r = statistics.correlation(cols["coefficients"][:, 1].tolist(), cols["oracle_coefficients"][:, 1].tolist())
    assert d.verdict.endswith(f"(r = {r:.2f})" if r >= 0.4 else f"(r = {r:.2f}): expect DaWin ≈ static interpolation")

    header, body = report.mean_entropy_table(d)
    assert header == ["split", "base", "ft1", "static merge", "DaWin"]
    tf = np.flatnonzero(masks["TF"]).tolist()
    expected = [statistics.fmean(1.1 * cols["entropies"][i, 0] for i in tf),
                statistics.fmean(1.1 * cols["entropies"][i, 1] for i in tf),
                statistics.fmean(0.9 * (cols["entropies"][i, 0] + cols["entropies"][i, 1]) / 2 for i in tf),
                statistics.fmean(0.8 * min(cols["entropies"][i]) for i in tf)]
    assert body[2] == ["TF", *(f"{v:.3f}" for v in expected)]


def test_many_candidate_diagnostics_use_task_names_and_flattened_coefficients(full_store: ResultStore) -> None:
    rows = [r for r in experiment_rows(full_store, "multitask") if r["method"] == "dawin"]
    sets = report.dawin_diagnostics(full_store, rows)
    assert [s.task for s in sets] == list(TASKS)
    d = sets[2].diagnostics
    assert [s.name for s in d.splits] == ["all", *(f"{t} right" for t in TASKS), "none right"]
    coefficients = multitask_coefficients(2, 70)
    oracle = diagnostic_columns(12, coefficients)["oracle_coefficients"]
    header, body = report.diagnostics_table(d)
    assert header[-1] == "coefficients vs oracle (r / ρ)"
    assert body[0][-1] == r_rho(coefficients.ravel().tolist(), oracle.ravel().tolist())


def test_report_shows_a_verdict_per_test_set(full_report: Path) -> None:
    text = full_report.read_text()
    robust, multitask = text.split("## multitask")
    section = robust.split("### DaWin diagnostics: does entropy track the loss?")[1]
    verdicts = re.findall(r"^\*\*(.+?)\*\*: (.+)$", section, flags=re.M)
    assert [name for name, _ in verdicts] == ["ID (test)", *SHIFTS]
    assert all("entropy" in v for _, v in verdicts)
    assert "| split | n | H vs CE: base (r / ρ) |" in section and "Mean entropy (nats):" in section
    assert "![DaWin coefficients against the oracle's](robust_dawin_diagnostics.png)" in section
    mt_verdicts = re.findall(r"^\*\*(.+?)\*\*: ", multitask.split("### DaWin diagnostics")[1], flags=re.M)
    assert mt_verdicts == list(TASKS)


def test_old_samples_without_diagnostic_columns_skip_the_section(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    rows = [r for r in robust_rows(ROBUST) if r["method"] == "dawin"]
    store.append(rows, samples={r["key"]: {k: v for k, v in robust_samples(0).items()
                                           if k in ("prediction", "label", "coefficients", "component", "entropies")}
                                for r in rows})
    assert report.dawin_diagnostics(store, rows) == []
    text = report.write_report(tmp_path).read_text()
    assert "DaWin diagnostics" not in text and "robust_dawin_lambda.png" in text


def test_learned_coefficients_come_from_the_rows_details() -> None:
    coefficients = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]  # (T=2, L=3)
    details = {"tasks": ["a", "b"], "layers": ["x", "y", "z"], "coefficients": coefficients, "losses": [1.5, 1.2, 0.9]}
    rows = [make_row("mt", "adamerging", {"steps": 3}, t, "test", 0.5) | {"details": json.dumps(details)} for t in "ab"]
    rows.append(make_row("mt", "ties", {}, "a", "test", 0.5))
    [learned] = report.learned_coefficients(rows)
    assert learned.label == "adamerging steps=3" and learned.tasks == ["a", "b"] and learned.layers == ["x", "y", "z"]
    np.testing.assert_array_equal(learned.matrix, np.array(coefficients).T)  # rows = layers, columns = tasks
    assert (learned.first_loss, learned.last_loss) == (1.5, 0.9)
