"""DaWin's two-phase pipeline on Ray actors gives the same predictions as a single-process reference; the runner's
phase 2, merge bound and per-sample columns on a fake linear evaluator."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from conftest import ARCH
from raymerge import config, dawin, diagnostics, models, pipeline
from raymerge.data import load_dataset
from raymerge import dawin_pipeline
from raymerge.dawin_pipeline import DawinRunner, LocalEvaluator, Phase1
from raymerge.methods.base import done
from raymerge.merge import interpolate
from raymerge.statedict import to_numpy


@pytest.fixture(scope="module")
def dawin_store(mini_pool, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("dawin")
    exp = config.load(mini_pool / "experiment.yaml",
                      [f"output_dir={out}", "methods={dawin: [{k: 2, offset: true}, {k: 2, offset: false}], dawin_dcs: {}, dawin_doe: {}}"])
    return pipeline.run_experiment(exp, cache_dir=out / "cache")


def test_distributed_equals_single_process(mini_pool, dawin_store):
    base = models.load_encoder_weights(ARCH, mini_pool / "base.safetensors")
    ft = models.load_encoder_weights(ARCH, mini_pool / "ft1.safetensors")
    head = models.load_head(mini_pool / "head.safetensors")
    splits = ("test", "rotate", "noise", "validation")
    sets = {("digits", s): load_dataset(mini_pool / s) for s in splits}
    local = LocalEvaluator(ARCH, {"digits": head}, sets, batch_size=64)
    pairs = [("digits", s) for s in splits[:3]]
    p1 = dawin_pipeline.phase1(local, [to_numpy(base), to_numpy(ft)], pairs, {"digits": ("digits", "validation")})
    runner = DawinRunner(local, p1, lambda c: interpolate(base, ft, float(c[1])), seed=0,
                         reference=to_numpy(interpolate(base, ft, 0.5)))
    rows = {(r["method"], r["params"], r["split"]): r for r in dawin_store.rows()}
    for offset in (True, False):
        reference = runner.mixture(pairs, k=2, offset=offset)
        for pair in pairs:
            (row,) = [r for (m, p, s), r in rows.items() if m == "dawin" and f'"offset": {str(offset).lower()}' in p and s == pair[1]]
            samples = dawin_store.samples(row["key"]).to_pydict()
            assert np.array_equal(samples["prediction"], reference.predictions[pair]), (offset, pair)
            assert np.array_equal(samples["component"], reference.extras[pair]["component"])
            # the diagnostics' per-sample columns land in the samples Parquet, equal to the reference's
            for column in ("entropies", "cross_entropies", "entropies_t1", "oracle_coefficients", "candidate_correct",
                           "candidate_predictions", "merge_coefficients", "output_entropy", "reference_entropy"):
                np.testing.assert_array_equal(np.array(samples[column]), reference.extras[pair][column], err_msg=column)
            assert row["merges"] == len(np.unique(reference.extras[pair]["component"]))
    for variant in ("dcs", "doe"):
        reference = runner.selection(pairs, True, variant)
        for pair in pairs:
            (row,) = [r for (m, p, s), r in rows.items() if m == f"dawin_{variant}" and s == pair[1]]
            predicted = dawin_store.samples(row["key"]).to_pydict()["prediction"]
            assert np.array_equal(predicted, reference.predictions[pair]), (variant, pair)


def test_actors_send_back_scores_not_logits(mini_pool, ray_local, tmp_path, monkeypatch):
    """Only validation splits (temperature scaling) travel as logits; every test-set evaluation comes back as four
    numbers per sample (the scores: entropies, cross-entropy and prediction), a static merge's as DaWin's."""
    from raymerge.workers import WorkerPool

    asked: list[tuple[str, object, int]] = []  # (dataset, actor call, the part's place in the call's outputs)
    submit = WorkerPool.submit

    def submitting(self, requests):
        pending = submit(self, requests)
        asked.extend((req.dataset, call, j) for req, parts in zip(requests, pending) for _, call, j in parts)
        return pending

    monkeypatch.setattr(WorkerPool, "submit", submitting)
    exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / 'out'}",
                                                      "methods={dawin: {k: 2}, wise_ft: {lambdas: [0.5]}}"])
    pipeline.run_experiment(exp, cache_dir=tmp_path / "cache")
    shapes = [(dataset, ray_local.get(call)[j].shape) for dataset, call, j in asked]
    assert len(shapes) > 10
    assert any(d.endswith("/validation") for d, _ in shapes)
    widths = {shape[1] for d, shape in shapes if not d.endswith("/validation")}
    assert widths == {len(dawin.SCORE_COLUMNS)}
    # logits over the 10 digit classes
    assert {shape[1] for d, shape in shapes if d.endswith("/validation")} == {10}


def test_outputs_are_cached_by_what_they_are(mini_pool, ray_local, tmp_path, monkeypatch):
    """Logits, scores at each temperature and fitted temperatures are separate cache entries, each equal to its
    formula, and each read back instead of being computed again; predictions are those of the scores at
    temperature 1, read from their entry."""
    from raymerge.methods import Recipe
    from raymerge.workers import WorkerPool

    submitted, fits = [], []
    submit, fit = WorkerPool.submit, pipeline.dawin_math.fit_temperature
    monkeypatch.setattr(WorkerPool, "submit",
                        lambda self, requests: submitted.extend(r.dataset for r in requests) or submit(self, requests))
    monkeypatch.setattr(pipeline.dawin_math, "fit_temperature", lambda *a, **k: fits.append(1) or fit(*a, **k))
    exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / 'out'}"])
    run = pipeline.start_run(exp, cache_dir=tmp_path / "cache")
    try:
        pair, base = ("digits", "rotate"), Recipe.model("base")
        labels = run.labels(pair)
        at_1 = run.scores(base, [pair])[pair]
        at_half = run.scores(base, [pair], {"digits": 0.5})[pair]
        predicted = run.predictions(base, [pair])[pair]
        logits = run.logits(base, [pair])[pair]
        temperature = run.temperature(base, ("digits", "validation"))
        assert len(submitted) == 4 and len(fits) == 1 and len(list((tmp_path / "cache" / "logits").glob("*.npy"))) == 5
        again = run.scores(base, [pair], {"digits": 0.5})[pair]
        assert run.predictions(base, [pair])[pair].tolist() == predicted.tolist()
        assert run.temperature(base, ("digits", "validation")) == temperature
        assert len(submitted) == 4 and len(fits) == 1, "a cached output was computed again"
    finally:
        run.pool.shutdown()
    # the cached temperature is the fit on a single-process evaluation of the same split
    from raymerge.workers import evaluate_local

    ds = load_dataset(mini_pool / "validation")
    local = evaluate_local(ARCH, to_numpy(models.load_encoder_weights(ARCH, mini_pool / "base.safetensors")),
                           models.load_head(mini_pool / "head.safetensors"), ds, exp.resources.batch_size)
    assert temperature == dawin.fit_temperature(local, ds.labels)
    np.testing.assert_array_equal(predicted, logits.argmax(1))
    z = logits.astype(np.float64)
    for scores, t in ((at_1, 1.0), (at_half, 0.5), (again, 0.5)):
        logp = torch.log_softmax(torch.from_numpy(z / t), -1).numpy()
        np.testing.assert_allclose(scores[:, 0], -(np.exp(logp) * logp).sum(1), rtol=1e-10)
        np.testing.assert_allclose(scores[:, 2], -logp[np.arange(len(z)), labels], rtol=1e-10)
        np.testing.assert_array_equal(scores[:, 3], predicted)
    assert not np.allclose(at_1[:, 0], at_half[:, 0])


def test_a_merge_is_made_ahead_only_when_its_predictions_are_not_cached(mini_pool, ray_local, tmp_path):
    from raymerge import methods

    unit = methods.get("wise_ft")
    params = unit.params(lambdas=[0.5])
    for out, fresh in (("first", True), ("second", False)):  # the second run shares the first one's cache
        exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / out}"])
        run = pipeline.start_run(exp, cache_dir=tmp_path / "cache")
        try:
            pool = run.view()
            (cand,) = unit.candidates(pool, params)
            run.prefetch_candidate(unit, params, cand, pool, "wise_ft")
            assert (cand.recipe.key(run.model_hashes) in run.pool.registered) is fresh
            run.evaluate(unit, params, cand, pool)
            assert len(run.store.rows()) == len(pool.eval_pairs()), "a lone evaluate writes before it returns"
        finally:
            run.pool.shutdown()


def test_dawin_reads_its_static_reference_from_the_static_methods_cached_scores(mini_pool, ray_local, tmp_path):
    """WiSE-FT at λ = 0.5 is the robust setting's uniform merge: evaluated first, it leaves the scores DaWin's
    reference needs in the cache, so DaWin passes over the full sets with its two candidates only (phase 1)."""
    from raymerge.methods import Recipe, wise_ft

    exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / 'out'}",
                                                       "methods={wise_ft: {lambdas: [0.5]}, dawin: {k: 1}}"])
    run = pipeline.start_run(exp, cache_dir=tmp_path / "cache")
    submit, asked = run._submit, []
    run._submit = lambda requests: asked.append(list(requests)) or submit(requests)
    try:
        pipeline.run_methods(run, exp.methods)
        calls = list(asked)
        logits = run.logits(wise_ft.recipe("ft1", 0.5), [("digits", "test")])[("digits", "test")].astype(np.float64)
    finally:
        run.pool.shutdown()
    static = wise_ft.recipe("ft1", 0.5).key(run.model_hashes)
    candidates = {Recipe.model(n).key(run.model_hashes) for n in ("base", "ft1")}
    whole = [(key, pair) for call in calls for key, pair, rows, _ in call if rows is None and pair[1] != "validation"]
    assert sorted(p for key, p in whole if key == static) == sorted(run.view().eval_pairs(["digits"]))  # once each
    assert {key for key, _ in whole} == {static, *candidates}
    (dawin_row,) = [r for r in run.store.rows() if r["method"] == "dawin" and r["split"] == "test"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(run.store.samples(dawin_row["key"]).to_pydict()["reference_entropy"],
                               -(p * np.log(p)).sum(1), rtol=1e-9)


def test_dawins_merges_are_made_ahead_and_phase2_makes_none_of_its_own(mini_pool, ray_local, tmp_path):
    """With mixture mean, phase 2's merges (one per test set: the mean of its per-sample coefficients) are known
    from phase 1 alone: once that is cached, prefetching the candidate, as a sweep does when it enters the window,
    starts exactly the merges phase 2 then evaluates, once, and the evaluation makes none of its own. Before it is
    cached, prefetching evaluates nothing."""
    from raymerge import methods

    from raymerge.methods import dawin as dawin_module

    exp = config.load(mini_pool / "experiment.yaml", [f"output_dir={tmp_path / 'out'}"])
    run = pipeline.start_run(exp, cache_dir=tmp_path / "cache")
    build, built = run.pool.build, []
    run.pool.build = lambda recipe, models: built.append(recipe) or build(recipe, models)
    submit, asked = run._submit, []
    run._submit = lambda requests: asked.append(list(requests)) or submit(requests)
    try:
        pool = run.view()
        wise, dawin_unit = methods.get("wise_ft"), methods.get("dawin")
        wise_params, params = wise.params(lambdas=[0.5]), dawin_unit.params(mixture="mean")
        (static,) = wise.candidates(pool, wise_params)
        run.evaluate(wise, wise_params, static, pool)  # DaWin's reference (λ = 0.5), so that it needs no merge
        built.clear()
        asked.clear()
        (early,) = dawin_unit.candidates(pool, params)  # before its phase 1 is cached: ahead evaluates nothing
        assert not run.prefetch_candidate(dawin_unit, params, early, pool, "dawin") and not built and not asked
        dawin_module.runner(pool, dawin_module.candidate_names(pool, None), params.lam0, pool.eval_pairs())  # phase 1
        (cand,) = dawin_unit.candidates(pool, params)
        assert run.prefetch_candidate(dawin_unit, params, cand, pool, "dawin")
        ahead = list(built)
        assert run.prefetch_candidate(dawin_unit, params, cand, pool, "dawin") and built == ahead  # asked once
        asked.clear()
        run.evaluate(dawin_unit, params, cand, pool)
        assert built == ahead, "phase 2 made a merge that was not made ahead"
        phase2 = [(key, pair) for call in asked for key, pair, rows, _ in call if rows is not None]
        assert not {recipe.key(run.model_hashes) for recipe in ahead} & run.pool.registered  # dropped once evaluated
        rows = {r["split"]: r for r in run.store.rows() if r["method"] == "dawin"}
        coefficients = {split: np.array(run.store.samples(r["key"]).to_pydict()["coefficients"], dtype=np.float64)
                        for split, r in rows.items()}
    finally:
        run.pool.shutdown()
    pairs = pool.eval_pairs()
    assert len(ahead) == len(pairs) <= exp.resources.max_merges_in_flight
    assert phase2 == [(recipe.key(run.model_hashes), pair) for recipe, pair in zip(ahead, pairs)]
    for recipe, (_, split) in zip(ahead, pairs):  # the mean coefficient vector of that set's samples, in float64
        np.testing.assert_allclose(recipe.args[2], coefficients[split].mean(0), rtol=1e-15, atol=0)


def test_dcs_and_doe_rows_match_formulas(mini_pool, dawin_store):
    rows = dawin_store.rows()
    dcs = {r["split"]: r for r in rows if r["method"] == "dawin_dcs"}
    (mix,) = [r for r in rows if r["method"] == "dawin" and r["split"] == "test" and '"offset": true' in r["params"]]
    coeffs = np.array(dawin_store.samples(mix["key"]).to_pydict()["coefficients"])
    assert np.allclose(coeffs.sum(1), 1.0)
    assert set(dcs) == {"test", "rotate", "noise"} and all(r["merges"] == 0 for r in dcs.values())


# --- the runner on a fake evaluator: linear "models" logits = X @ W, no Ray, no encoder --------------------------

PAIR = ("toy", "test")


class LinearEvaluator:
    """Evaluator whose weights are one matrix ``w`` (d, C): logits of a set are ``X @ w`` in float64."""

    def __init__(self, x: np.ndarray, labels: np.ndarray) -> None:
        self.x, self._labels = x, labels
        self.rows_calls: list[int] = []  # weight sets per scores_rows call

    def logits(self, weights, pairs):
        return {p: self.x @ np.asarray(weights["w"]) for p in pairs}

    def scores(self, weights, pairs, temperatures=None):
        logits = self.logits(weights, pairs)
        return {p: dawin.sample_scores(logits[p], self._labels, (temperatures or {}).get(p[0], 1.0)) for p in pairs}

    def scores_rows(self, assignments):
        self.rows_calls.append(len(assignments))
        return [dawin.sample_scores(self.x[rows] @ np.asarray(weights["w"]), self._labels[rows])
                for weights, _, rows in assignments]

    def temperature(self, weights, pair):
        return dawin.fit_temperature(self.logits(weights, [pair])[pair], self.labels(pair))

    def central(self, fn, *args):
        return done(fn(*args))

    def labels(self, pair):
        return self._labels


class CountingMerge:
    """``c ↦ Σm cm Wm`` as a state dict; counts the merged weight sets alive (not yet garbage) and the peak."""

    def __init__(self, candidates: Sequence[np.ndarray]) -> None:
        self.candidates = candidates
        self.alive = self.peak = self.made = 0

    def _dropped(self) -> None:
        self.alive -= 1

    def __call__(self, c: np.ndarray) -> dict[str, torch.Tensor]:
        w = sum(float(cm) * wm for cm, wm in zip(c, self.candidates))
        # torch.from_numpy shares w's memory, so w lives exactly as long as the runner keeps any view of this merge
        weakref.finalize(w, self._dropped)
        self.alive += 1
        self.made += 1
        self.peak = max(self.peak, self.alive)
        return {"w": torch.from_numpy(w)}


def toy(n: int, m: int = 2, d: int = 6, c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    labels = rng.integers(0, c, size=n)
    candidates = [rng.normal(size=(d, c)) for _ in range(m)]
    temperatures = [0.9, 1.2, 1.0, 0.8][:m]
    ev = LinearEvaluator(x, labels)
    return ev, fixed_phase1(ev, [{"w": w} for w in candidates], temperatures), candidates


def fixed_phase1(ev: LinearEvaluator, candidates: list[dict], temperatures: Sequence[float]) -> Phase1:
    """Phase 1 of ``PAIR`` at fixed temperatures (the toy has no validation split to fit them on)."""
    scores = [ev.scores(w, [PAIR], {"toy": t}) for w, t in zip(candidates, temperatures)]
    return Phase1({PAIR: np.stack([s[PAIR] for s in scores], axis=1)}, {"toy": list(temperatures)}, candidates)


def entropy(z: np.ndarray) -> np.ndarray:
    """Softmax entropy (N,) of logits (N, C), by the formula −Σ p log p in float64."""
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(p)).sum(1)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_samplewise_keeps_at_most_max_in_flight_merges_alive(n):
    ev, p1, candidates = toy(n)
    merge = CountingMerge(candidates)
    runner = DawinRunner(ev, p1, merge, max_in_flight=3)
    outcome = runner.samplewise([PAIR], offset=True)
    assert merge.made == n  # one per distinct coefficient row
    assert merge.peak == 3 and max(ev.rows_calls) == 3 and sum(ev.rows_calls) == n
    assert merge.alive == 0  # every merge dropped after use
    # each sample evaluated by its own merge: logits x_i @ (Σm c_im W_m)
    c = dawin.expertise_coefficients(p1.entropies[PAIR], offset=True)
    expected = np.stack([ev.x[i] @ (c[i, 0] * candidates[0] + c[i, 1] * candidates[1]) for i in range(n)])
    np.testing.assert_allclose(outcome.extras[PAIR]["output_entropy"], entropy(expected), rtol=1e-12)
    np.testing.assert_array_equal(outcome.predictions[PAIR], expected.argmax(1))
    assert outcome.merges[PAIR] == n


def test_samples_sharing_a_coefficient_row_share_one_merge():
    ev, p1, candidates = toy(12)
    # samples 0..5 repeat samples 6..11 exactly: identical logits, identical coefficient rows
    ev.x[6:] = ev.x[:6]
    p1 = fixed_phase1(ev, p1.candidates, p1.temperatures["toy"])
    merge = CountingMerge(candidates)
    outcome = DawinRunner(ev, p1, merge, max_in_flight=4).samplewise([PAIR], offset=False)
    assert merge.made == 6 and outcome.merges[PAIR] == 6 and merge.peak == 4
    np.testing.assert_array_equal(outcome.extras[PAIR]["component"][:6], outcome.extras[PAIR]["component"][6:])


def test_mean_mixture_evaluates_every_sample_with_the_mean_row():
    ev, p1, candidates = toy(50, m=3)
    merge = CountingMerge(candidates)
    outcome = DawinRunner(ev, p1, merge, names=["a", "b", "c"]).mixture([PAIR], k=1, offset=False, mixture="mean")
    mean = np.mean(dawin.expertise_coefficients(p1.entropies[PAIR]), axis=0)
    expected = ev.x @ sum(cm * w for cm, w in zip(mean, candidates))
    np.testing.assert_allclose(outcome.extras[PAIR]["output_entropy"], entropy(expected), rtol=1e-12)
    np.testing.assert_array_equal(outcome.predictions[PAIR], expected.argmax(1))
    assert outcome.merges[PAIR] == 1 and merge.made == 1  # the mean merge
    np.testing.assert_array_equal(outcome.extras[PAIR]["merge_coefficients"], np.tile(mean, (50, 1)))


def test_every_test_sets_merges_go_to_the_evaluator_together():
    ev, p1, candidates = toy(30, m=3)
    shift = ("toy", "shift")  # the toy evaluator scores every set on the same samples
    p1 = Phase1({PAIR: p1.scores[PAIR], shift: p1.scores[PAIR][::-1].copy()}, p1.temperatures, p1.candidates)
    merge = CountingMerge(candidates)
    static = {"w": sum(candidates) / 3}  # the reference: the uniform merge, given as the static method builds it
    outcome = DawinRunner(ev, p1, merge, max_in_flight=4, reference=static).mixture([PAIR, shift], k=1, offset=False,
                                                                                  mixture="mean")
    # one call: each set's mean merge (the reference's scores come from the evaluator's scores, not phase 2)
    assert ev.rows_calls == [2] and merge.made == 2 and merge.peak == 2
    for pair in (PAIR, shift):
        mean = np.mean(dawin.expertise_coefficients(p1.entropies[pair]), axis=0)
        expected = ev.x @ sum(cm * w for cm, w in zip(mean, candidates))
        np.testing.assert_array_equal(outcome.predictions[pair], expected.argmax(1))
        np.testing.assert_allclose(outcome.extras[pair]["reference_entropy"],
                                   entropy(ev.x @ (sum(candidates) / 3)), rtol=1e-12)
    # with room for one merge at a time, the same work takes two calls and the same predictions
    again = DawinRunner(ev, p1, CountingMerge(candidates), max_in_flight=1).mixture([PAIR, shift], k=1, offset=False,
                                                                                     mixture="mean")
    assert ev.rows_calls[1:] == [1, 1]
    assert all(np.array_equal(again.predictions[p], outcome.predictions[p]) for p in (PAIR, shift))


def test_outcome_extras_follow_the_samples_contract():
    ev, p1, candidates = toy(40)
    static = 0.5 * candidates[0] + 0.5 * candidates[1]  # the robust setting's static merge, WiSE-FT at λ = 0.5
    runner = DawinRunner(ev, p1, CountingMerge(candidates), names=["zeroshot", "ft"], reference={"w": static})
    outcome = runner.mixture([PAIR], k=2, offset=True)
    extras = outcome.extras[PAIR]
    shapes = {name: (40, 2) for name in ("entropies", "cross_entropies", "entropies_t1", "coefficients",
                                         "oracle_coefficients", "candidate_correct", "candidate_predictions",
                                         "merge_coefficients")}
    shapes.update(component=(40,), output_entropy=(40,), reference_entropy=(40,))
    assert {k: v.shape for k, v in extras.items()} == shapes
    assert extras["candidate_correct"].dtype == bool
    logits = np.stack([ev.x @ w for w in candidates], axis=1)  # (N, M, C)
    y = ev.labels(PAIR)
    np.testing.assert_array_equal(extras["candidate_predictions"], logits.argmax(-1))
    t = np.array([0.9, 1.2])
    scaled = logits / t[None, :, None]
    # cross-entropy by hand: log Σc exp(z_c / T) − z_y / T
    by_hand = np.log(np.exp(scaled).sum(-1)) - scaled[np.arange(40), :, y]
    np.testing.assert_allclose(extras["cross_entropies"], by_hand, rtol=1e-12)
    np.testing.assert_allclose(extras["entropies"], np.stack([entropy(scaled[:, m]) for m in range(2)], 1), rtol=1e-12)
    np.testing.assert_allclose(extras["entropies_t1"], np.stack([entropy(logits[:, m]) for m in range(2)], 1), rtol=1e-12)
    np.testing.assert_allclose(extras["coefficients"], dawin.expertise_coefficients(p1.entropies[PAIR], offset=True))
    merged = np.stack([ev.x[i] @ sum(cm * w for cm, w in zip(extras["merge_coefficients"][i], candidates)) for i in range(40)])
    np.testing.assert_allclose(extras["output_entropy"], entropy(merged), rtol=1e-12)
    np.testing.assert_array_equal(outcome.predictions[PAIR], merged.argmax(1))
    np.testing.assert_allclose(extras["reference_entropy"], entropy(ev.x @ static), rtol=1e-12)
    # the diagnostics handed to the job are the ones the report recomputes from the stored columns
    again = diagnostics.diagnose(extras, ["zeroshot", "ft"])
    assert outcome.diagnostics[PAIR].splits == again.splits
    dcs, doe = runner.selection([PAIR], True, "dcs"), runner.selection([PAIR], True, "doe")
    assert "output_entropy" not in dcs.extras[PAIR] and dcs.merges == {} and set(doe.extras[PAIR]) == set(dcs.extras[PAIR])
    c = dcs.extras[PAIR]["coefficients"]
    np.testing.assert_array_equal(dcs.predictions[PAIR], logits[np.arange(40), c.argmax(1)].argmax(1))
    probs = np.exp(scaled) / np.exp(scaled).sum(-1, keepdims=True)
    np.testing.assert_array_equal(doe.predictions[PAIR], (c[:, :, None] * probs).sum(1).argmax(1))


class SplitEvaluator(LinearEvaluator):
    """A linear evaluator with a labelled validation split beside the test set."""

    def __init__(self, sets: dict) -> None:
        super().__init__(*sets[PAIR])
        self.sets = sets

    def logits(self, weights, pairs):
        return {p: self.sets[p][0] @ np.asarray(weights["w"]) for p in pairs}

    def scores(self, weights, pairs, temperatures=None):
        logits = self.logits(weights, pairs)
        return {p: dawin.sample_scores(logits[p], self.sets[p][1], (temperatures or {}).get(p[0], 1.0)) for p in pairs}

    def labels(self, pair):
        return self.sets[pair][1]


def test_phase1_fits_each_candidates_temperature_and_scores_at_it():
    rng = np.random.default_rng(5)
    x_val, x_test = rng.normal(size=(80, 6)), rng.normal(size=(30, 6))
    # three informative candidates of very different confidence, so their temperatures differ
    truth = rng.normal(size=(6, 4))
    candidates = [(truth + rng.normal(scale=0.3, size=(6, 4))) * s for s in (0.3, 1.0, 4.0)]
    y_val = np.argmax(x_val @ truth + rng.normal(scale=1.0, size=(80, 4)), 1)
    ev = SplitEvaluator({PAIR: (x_test, rng.integers(0, 4, 30)), ("toy", "validation"): (x_val, y_val)})
    p1 = dawin_pipeline.phase1(ev, [{"w": w} for w in candidates], [PAIR], {"toy": ("toy", "validation")})
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    for m, w in enumerate(candidates):
        z = x_val @ w
        nll = [np.mean(np.log(np.exp(z / t).sum(1)) - (z / t)[np.arange(80), y_val]) for t in grid]
        assert p1.temperatures["toy"][m] == pytest.approx(grid[int(np.argmin(nll))], rel=5e-3), m
        scaled = x_test @ w / p1.temperatures["toy"][m]
        np.testing.assert_allclose(p1.entropies[PAIR][:, m], entropy(scaled), rtol=1e-12)
    assert len(set(np.round(p1.temperatures["toy"], 3))) == 3


def test_phase1_names_a_candidate_with_non_finite_logits():
    class Overflowing(LinearEvaluator):
        def logits(self, weights, pairs):
            out = super().logits(weights, pairs)
            if "overflow_row" in weights:
                for z in out.values():
                    z[weights["overflow_row"], 2] = np.inf
            return out

    ev, _, candidates = toy(20)
    ev.__class__ = Overflowing
    weights = [{"w": candidates[0]}, {"w": candidates[1], "overflow_row": 7}]
    with pytest.raises(ValueError, match=r"toy/test: candidate 1 has non-finite logits on 1 sample\(s\) \(the first: row 7\)"):
        dawin_pipeline.phase1(ev, weights, [PAIR], {"toy": None})


def test_phase1_names_a_candidate_whose_validation_logits_are_not_finite():
    class Overflowing(SplitEvaluator):
        def logits(self, weights, pairs):
            out = super().logits(weights, pairs)
            if "overflow" in weights and ("toy", "validation") in out:
                out[("toy", "validation")][3, 1] = np.inf
            return out

    rng = np.random.default_rng(0)
    ev = Overflowing({PAIR: (rng.normal(size=(10, 6)), rng.integers(0, 4, 10)),
                      ("toy", "validation"): (rng.normal(size=(20, 6)), rng.integers(0, 4, 20))})
    weights = [{"w": rng.normal(size=(6, 4))}, {"w": rng.normal(size=(6, 4)), "overflow": True}]
    with pytest.raises(ValueError, match=r"toy/validation: candidate 1: .*non-finite.*resources.precision"):
        dawin_pipeline.phase1(ev, weights, [PAIR], {"toy": ("toy", "validation")})


def test_max_in_flight_must_be_positive():
    ev, p1, candidates = toy(5)
    with pytest.raises(ValueError, match="max_in_flight must be a positive integer, got 0"):
        DawinRunner(ev, p1, CountingMerge(candidates), max_in_flight=0)
