"""Benchmark: DaWin's overhead over a single evaluation pass (robust setting, METHODS §4).

The test set is every robust test set of the zoo concatenated (ID test plus the 9 shifts: 4,500 images on the
embedded zoo) and repeated 4 times (18,000 images), so that one pass lasts seconds and is long enough to time on a
loaded machine. DaWin runs exactly as ``jobs/eval.py`` runs it, through
:func:`raymerge.methods.dawin.runner` and :meth:`DawinRunner.mixture` on a :class:`raymerge.pipeline.Run` with the
experiment's worker pool (``robust.yaml``: 2 actors × 0.5 CPU, batch 32), the logit cache pointed at a fresh
directory for every measurement (so nothing is reused), M = 2 candidates (θ0, θ1), Beta mixture K = 3 with the
offset (Eq. 2). The baseline is one evaluation of θ1 over the same set through the same ``Run.scores``.

Ideal: M + 1 = 3 passes (each candidate once, then each sample once under its component's merge). Phase 1 also
evaluates the validation split (temperatures), which adds 2·N_val/N passes to that ideal.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import Context, best, pct_over, progress, row, spread

TITLE = "DaWin overhead (robust setting, two-phase pipeline on the worker pool)"
BENCHMARK = "DaWin total / single pass"
TARGET = 0.15
TILE = 4  # the concatenated sets, repeated: passes of a few seconds rather than a few tenths, less at the mercy of load


def _timed_run_class():
    from raymerge.pipeline import Run

    class TimedRun(Run):
        """A :class:`Run` that adds up the seconds spent in each :class:`Evaluator` method."""

        clock: defaultdict

        def _outputs(self, weights, pairs, reduce_for):
            start = time.perf_counter()
            try:
                return super()._outputs(weights, pairs, reduce_for)
            finally:
                self.clock["outputs"] += time.perf_counter() - start

        def scores_rows(self, assignments):
            start = time.perf_counter()
            try:
                return super().scores_rows(assignments)
            finally:
                self.clock["scores_rows"] += time.perf_counter() - start

        def central(self, fn, *args):
            start = time.perf_counter()
            try:
                return super().central(fn, *args)
            finally:
                self.clock["central"] += time.perf_counter() - start

    return TimedRun


def _setup(ctx: Context):
    import ray

    from raymerge import config
    from raymerge.cache import LogitCache
    from raymerge.data import ImageDataset
    from raymerge.pipeline import LoadedTask, load_experiment_inputs
    from raymerge.results import ResultStore
    from raymerge.statedict import state_dict_hash, to_numpy
    from raymerge.workers import WorkerPool

    robust_yaml = Path(config.__file__).parent / "experiments" / "robust.yaml"
    out = ctx.scratch("dawin")
    exp = config.load(robust_yaml, [f"zoo={ctx.manifest()}", f"output_dir={out / 'results'}"])
    base, finetuned, tasks = load_experiment_inputs(exp)
    (task,) = tasks.values()
    sets = [ds for split, ds in task.sets.items() if split != "validation"]
    combined = ImageDataset("all-robust-test-sets", np.tile(np.concatenate([ds.images for ds in sets]), (TILE, 1, 1)),
                            np.tile(np.concatenate([ds.labels for ds in sets]), TILE), sets[0].class_names, "test")
    head = task.heads["test"]
    loaded = {task.name: LoadedTask(task.name, {"all": combined, "validation": task.sets["validation"]},
                                    {"all": head, "validation": task.heads["validation"]},
                                    {"*": task.head_hashes["*"], "all": task.head_hashes["test"],
                                     "validation": task.head_hashes["validation"]}, None)}
    pool = WorkerPool(exp.architecture, exp.resources)
    pool.add_head(task.name, head)
    for split, ds in loaded[task.name].sets.items():
        pool.add_dataset(f"{task.name}/{split}", ds)
    pool.prepare()
    models = {"base": base, **finetuned}
    run = _timed_run_class()(exp, base, finetuned, loaded, pool, LogitCache(out / "cache-setup"),
                             ResultStore(out / "results"), force=True,
                             model_hashes={n: state_dict_hash(sd) for n, sd in models.items()},
                             model_refs={n: ray.put(to_numpy(sd)) for n, sd in models.items()})
    run.clock = defaultdict(float)
    return run, task.name, len(sets), len(combined), len(task.sets["validation"]), out


def _single_pass(run, pair, weights, cache_dir: Path) -> float:
    from raymerge.cache import LogitCache

    run.cache = LogitCache(cache_dir)
    start = time.perf_counter()
    run.scores(weights, [pair])
    return time.perf_counter() - start


def _dawin_once(run, pair, names, lam0: float, k: int, cache_dir: Path) -> dict[str, float]:
    from raymerge.cache import LogitCache
    from raymerge.methods.dawin import runner as dawin_runner

    run.cache = LogitCache(cache_dir)
    run.clock.clear()
    start = time.perf_counter()
    runner = dawin_runner(run.view(), names, lam0, [pair])
    phase1_s = time.perf_counter() - start
    phase1_outputs = run.clock["outputs"]
    merge = runner.merge
    merge_s = [0.0]

    def timed_merge(c):
        t = time.perf_counter()
        try:
            return merge(c)
        finally:
            merge_s[0] += time.perf_counter() - t

    runner.merge = timed_merge
    runner.reference = None  # the static merge's entropies are a report diagnostic, not part of DaWin's cost
    t = time.perf_counter()
    outcome = runner.mixture([pair], k, offset=True)
    mixture_s = time.perf_counter() - t
    total = time.perf_counter() - start
    return {
        "total": total,
        "phase1_outputs": phase1_outputs,
        "phase1_rest": phase1_s - phase1_outputs,
        "central": run.clock["central"],
        "merges": merge_s[0],
        "phase2": run.clock["scores_rows"],
        "coefficients_and_bookkeeping": mixture_s - run.clock["central"] - merge_s[0] - run.clock["scores_rows"],
        "merges_built": float(outcome.merges[pair]),
    }


def run(ctx: Context) -> list[dict]:
    from raymerge.statedict import to_numpy

    repeats = 1 if ctx.quick else 5
    run_, task, n_sets, n, n_val, out = _setup(ctx)
    try:
        pair = (task, "all")
        names = ["base", next(iter(run_.finetuned))]
        params = run_.exp.methods["dawin"][0]
        lam0, k = params.lam0, params.k
        theta1 = to_numpy(run_.finetuned[names[1]])
        progress(f"dawin: {n} test images ({n_sets} robust sets ×{TILE}), {n_val} validation; warm-up")
        _single_pass(run_, pair, theta1, out / "cache-warm-single")
        _dawin_once(run_, pair, names, lam0, k, out / "cache-warm-dawin")  # starts the mixture task's worker
        singles, runs = [], []
        for i in range(repeats):
            singles.append(_single_pass(run_, pair, theta1, out / f"cache-single-{i}"))
            runs.append(_dawin_once(run_, pair, names, lam0, k, out / f"cache-dawin-{i}"))
            progress(f"dawin: repeat {i + 1}/{repeats}: single pass {singles[-1]:.2f} s, DaWin {runs[-1]['total']:.2f} s")
    finally:
        run_.pool.shutdown()

    # each repeat times a single pass and DaWin back to back: the headline is the median of those side-by-side
    # ratios, and the breakdown is that same repeat's
    per_repeat = [r["total"] / s for r, s in zip(runs, singles)]
    chosen = sorted(range(repeats), key=lambda i: per_repeat[i])[(repeats - 1) // 2]
    single, fastest, ratio = singles[chosen], runs[chosen], per_repeat[chosen]
    ratio_of_bests = best([r["total"] for r in runs]) / best(singles)
    val_passes = 2 * n_val / n
    verdict = "met" if ratio <= 3 * (1 + TARGET) else "missed"
    resources = run_.pool.resources
    setup = (f"{n} images ({n_sets} robust test sets concatenated, ×{TILE}), {resources.num_actors} actors × "
             f"{resources.num_cpus_per_actor} CPU, batch {resources.batch_size}; logit cache in a fresh directory "
             f"for every measurement; after a warm-up")
    rows = [row(
        BENCHMARK, f"M=2, Beta mixture K={k}, offset, N={n}", fastest["total"], single,
        "one evaluation pass of θ1 over the same set, same pool, same Run.scores (cache off)", ratio,
        f"3 passes (M + 1); {3 + val_passes:.2f} counting phase 1's validation split; target ≤ {3 * (1 + TARGET):.2f}",
        f"{setup}; the median of {repeats} side-by-side ratios (single pass, then DaWin): all {spread(per_repeat)}, "
        f"best DaWin / best single pass {ratio_of_bests:.2f}; "
        f"{int(fastest['merges_built'])} merged models built; single pass {single:.2f} s = {n / single:.0f} images/s",
        ratio_means="DaWin seconds / single-pass seconds (= passes)", ideal_value=3.0,
        gap=f"{pct_over(ratio, 3)} (target +{TARGET:.0%}: {verdict})",
    )]
    parts = [
        ("phase 1: validation logits, candidate scores", "phase1_outputs", 2 + val_passes,
         "2 candidates over the validation split (logits) and the test set (scores computed on the actors)"),
        ("phase 1: temperatures", "phase1_rest", 0.0, "driver-side fit on the validation logits"),
        (f"central: Beta mixture K={k} (Ray task)", "central", 0.0, "one Ray task: mixture fit and assignment"),
        ("coefficients, grouping, argmax", "coefficients_and_bookkeeping", 0.0, "driver-side numpy"),
        (f"{k} merges (interpolate θ0, θ1)", "merges", 0.0, "tiny model: 0.2 M parameters per merge"),
        ("phase 2: each sample under its merge", "phase2", 1.0,
         f"{k} weight sets put once, each actor evaluates its rows per component (batches padded per component)"),
    ]
    for label, key, ideal_passes, what in parts:
        passes = fastest[key] / single
        gap = f"{passes - ideal_passes:+.2f} passes"
        rows.append(row(
            f"{BENCHMARK}: breakdown", label, fastest[key], single, "the same single pass", passes,
            f"{ideal_passes:.2f} passes" if ideal_passes else "≈ 0 passes", what,
            ratio_means="seconds / single-pass seconds", gap=gap, ideal_value=ideal_passes,
        ))
    return rows


def meaning(rows: list[dict]) -> str:
    head = rows[0]
    parts = {r["case"]: r["ratio"] for r in rows[1:]}
    excess = {r["case"]: r["ratio"] - r["ideal_value"] for r in rows[1:]}
    worst = max(excess, key=excess.get)
    text = (f"DaWin cost {head['ratio']:.2f} single passes against an ideal of 3 ({head['gap']}). The largest "
            f"excess over its own ideal is '{worst}' ({parts[worst]:.2f} passes, {excess[worst]:+.2f}). ")
    if head["ratio"] <= 3 * (1 + TARGET):
        return text + ("The two-phase design delivers: every sample is evaluated once per candidate and once under its "
                       "component's merge, and the mixture fit, coefficients and K merges cost a few hundredths of a "
                       "pass even with the tiny model's cheap passes; with ViT-B/32 on ImageNet-sized test sets they "
                       "shrink further.")
    return text + ("The tiny model makes one pass cheap, so fixed costs (Ray round trips, the mixture task, padding of "
                   "per-component batches) weigh far more here than with ViT-B/32 on ImageNet-sized test sets, where "
                   "passes take minutes.")
