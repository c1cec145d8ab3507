"""Benchmark: task-subset sweep throughput on the zoo, and an estimate of the full 8-task ViT-B/32 sweep.

Measured: :func:`raymerge.sweep.sweep_run` (the code ``jobs/sweep.py`` runs) with the packaged ``sweep.yaml``
(weight_average, task_arithmetic, ties, cart, dawin; 2 actors × 0.5 CPU, batch 32) over a bounded, stratified
sample of the 247 subsets of the 8 tasks: evenly spaced through the plan (ordered by size), so the sample has the
full sweep's mix of subset sizes. The other subsets are marked done through the resume mechanism (their row keys
are put in ``Run.done``), exactly as a resumed sweep skips them. Fresh logit cache and results store.

Ideal: the evaluation passes the sweep needs, at the single-pass times measured on the same pool just before:
one pass per (candidate, task in its subset), DaWin's phase 2 likewise, and DaWin's phase 1 once per distinct
(candidate model, task) pair over test and validation (the logit cache computes each once); merges hidden behind
evaluation by the prefetch thread.

Estimate for the full ViT-B/32 sweep on 16 GPUs: from merge costs measured here on ViT-B/32-sized tensors (the
first residual blocks of ``build_encoder("ViT-B-32")``, scaled by parameter count), CART's SVD cost per block from
the CART benchmark, the driver's hash + ``ray.put`` per weight set from the evaluation benchmark, and ASSUMED GPU
throughput and test-set sizes (stated in the rows).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Context, best, progress, row

TITLE = "Sweep throughput (zoo) and the full 8-task ViT-B/32 sweep estimate"
SAMPLE_SUBSETS = 12
VITB32_PARAMS = 87_849_216  # sum of numel over build_encoder("ViT-B-32").state_dict()
# Assumptions for the estimate, NOT measurements:
GPU_IMAGES_PER_S = 3000.0  # ViT-B/32 inference, fp16, one A100/H100-class GPU
GPUS = 16
SVD_CORES = 176  # CPU cores free for CART's SVD tasks: e.g. 4 nodes × 48 vCPUs, minus one per GPU actor
TEST_SIZES = {  # the task_vectors benchmark's 8 test sets
    "SUN397": 19_850, "Cars": 8_041, "RESISC45": 6_300, "EuroSAT": 2_700,
    "SVHN": 26_032, "GTSRB": 12_630, "MNIST": 10_000, "DTD": 1_880,
}
VITB32_BLOCKS = 12


def _sample(plan: list[tuple[str, ...]], n: int) -> list[tuple[str, ...]]:
    idx = np.unique(np.round(np.linspace(0, len(plan) - 1, min(n, len(plan)))).astype(int))
    return [plan[i] for i in idx]


def _pass_times(run, tasks: list[str], workdir: Path, reps: int = 2) -> dict[tuple[str, str], float]:
    """Best of ``reps`` single passes of θ0 over each task's test and validation split, on the sweep's own pool, with a
    throwaway logit cache (the sweep's cache stays empty)."""
    from raymerge.cache import LogitCache
    from raymerge.statedict import to_numpy

    saved = run.cache
    weights = to_numpy(run.base)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for rep in range(reps):
            run.cache = LogitCache(workdir / f"pass-cache-{rep}")
            for t in tasks:
                for split in ("test", "validation"):
                    start = time.perf_counter()
                    run.logits(weights, [(t, split)])
                    times.setdefault((t, split), []).append(time.perf_counter() - start)
    finally:
        run.cache = saved
    return {k: best(v) for k, v in times.items()}


def _measure_sweep(ctx: Context) -> tuple[list[dict], dict]:
    import json

    import yaml

    from raymerge import config
    from raymerge.pipeline import start_run
    from raymerge.statedict import to_numpy
    from raymerge.sweep import label, subsets, sweep_candidates, sweep_run

    manifest = ctx.manifest()
    out = ctx.scratch("sweep")
    overrides = [f"zoo={manifest}", f"output_dir={out / 'results'}"]
    all_tasks = list(yaml.safe_load(manifest.read_text())["settings"]["multitask"]["task_pool"])
    if ctx.quick:
        overrides.append(f"sweep.tasks=[{', '.join(all_tasks[:4])}]")
    exp = config.load(Path(config.__file__).parent / "experiments" / "sweep.yaml", overrides)
    cfg = exp.sweep
    tasks = cfg.tasks or all_tasks
    plan = subsets(tasks, cfg.min_size, cfg.max_size)
    sample = _sample(plan, 2 if ctx.quick else SAMPLE_SUBSETS)
    progress(f"sweep: starting the pool; {len(sample)} of {len(plan)} subsets "
             f"(sizes {[len(s) for s in sample]}), methods {list(cfg.methods)}")
    run = start_run(exp, cache_dir=out / "cache")
    try:
        chosen = set(sample)
        for s in plan:
            if s not in chosen:
                for unit, params, c, pool in sweep_candidates(run, s, cfg.methods):
                    run.done.update(run.keys(unit, params, c, pool, label(unit.name)))
        progress("sweep: single-pass times per task (test, validation) on the same pool")
        passes = _pass_times(run, tasks, out, 1 if ctx.quick else 2)
        store_s = [0.0]
        append = run.store.append  # writes the rows and their samples files

        def timed(fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    store_s[0] += time.perf_counter() - t
            return wrapper

        run.store.append = timed(append)
        progress("sweep: sweep_run")
        start = time.perf_counter()
        sweep_run(run)
        wall = time.perf_counter() - start
        stored = run.store.rows()
        progress("sweep: merge build times of the static methods (what the prefetch thread does)")
        builds: dict[str, list[float]] = {}
        for s in sample[:1 if ctx.quick else 3]:
            for unit, _, c, _ in sweep_candidates(run, s, cfg.methods):
                if c.build is not None:
                    t = time.perf_counter()
                    to_numpy(c.build())
                    builds.setdefault(unit.name, []).append(time.perf_counter() - t)
    finally:
        run.pool.shutdown()

    methods = list(cfg.methods)
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    seen = set()
    for r in stored:
        name = r["method"].split("/", 1)[1]
        if (r["method"], r["params"]) not in seen:  # one candidate's rows share its seconds
            seen.add((r["method"], r["params"]))
            seconds[name] += r["seconds"]
    candidates = len(seen)
    test = {t: passes[(t, "test")] for t in tasks}
    ideal = {m: sum(test[t] for s in sample for t in s) for m in methods}
    phase1_pairs = {(n, t) for s in sample for n in s for t in s}
    if "dawin" in ideal:
        ideal["dawin"] += sum(passes[(t, "test")] + passes[(t, "validation")] for _, t in phase1_pairs)
    ideal_total = sum(ideal.values())
    per_min = len(sample) / (wall / 60)
    evaluations = sum(len(s) for s in sample) * len(methods)
    sizes = [len(s) for s in sample]
    rows = [row(
        "Sweep throughput (zoo)", f"{len(sample)} subsets × {len(methods)} methods (sizes {min(sizes)}–{max(sizes)}, "
        f"mean {np.mean(sizes):.1f})", wall, ideal_total,
        "the evaluation passes it needs, at single-pass times measured on the same pool", wall / ideal_total,
        "1.0× (merges hidden behind evaluation, no other overhead)",
        f"{per_min:.1f} subsets/min, {evaluations / (wall / 60):.0f} test-set evaluations/min, {candidates} candidates; "
        f"at this rate the whole {len(plan)}-subset sweep takes ~{len(plan) / per_min:.0f} min here (the sample "
        f"mirrors its size mix); results-store writes (rows and samples files) {store_s[0]:.1f} s "
        "in all (each part is read once, so this grows linearly with the rows); single-pass times per test set "
        f"{min(test.values()):.2f}–{max(test.values()):.2f} s",
        value=per_min, unit="subsets/min", ratio_means="measured seconds / ideal seconds",
        gap=f"{wall / ideal_total:.1f}× the evaluation-only ideal", ideal_value=1.0)]
    for m in methods:
        rows.append(row(
            "Sweep throughput (zoo): per method", m, seconds[m], ideal[m], "its evaluation passes (see above)",
            seconds[m] / ideal[m], "1.0×",
            "Σ over its candidates of the seconds the results store records (evaluation, plus for dawin its phase 1, "
            "mixture and merges; prefetched merges are not in it)",
            ratio_means="measured seconds / ideal seconds", gap=f"{seconds[m] / ideal[m]:.1f}× ideal", ideal_value=1.0))
    other = wall - sum(seconds.values())
    rows.append(row(
        "Sweep throughput (zoo): per method", "outside candidates (merge waits, results store)", max(other, 1e-9),
        wall, "the whole sweep", max(other, 1e-9) / wall, "≈ 0 of the sweep",
        f"waiting for prefetched merges and writing rows; results-store writes alone {store_s[0]:.2f} s",
        ratio_means="seconds / sweep seconds", gap=f"{other / wall:.0%} of the sweep", ideal_value=0.0))
    counts = {m: sum(1 for (meth, _) in seen if meth.endswith("/" + m)) for m in methods}
    for m, times in builds.items():
        build_s = float(np.mean(times))
        eval_s = seconds[m] / max(counts[m], 1)
        rows.append(row(
            "Sweep throughput (zoo): merge build vs evaluation per candidate", m, build_s, eval_s,
            "the mean evaluation seconds of its candidates in the sweep", build_s / eval_s,
            "≤ 1× (the prefetch thread keeps ahead of evaluation)",
            f"mean of {len(times)} builds (to_numpy(candidate.build()), what the prefetch thread runs), timed after the "
            "sweep on the first sampled subsets" + ("; cart's SVDs are Ray tasks beside the actors" if m == "cart" else ""),
            ratio_means="build seconds / evaluation seconds", gap=f"{build_s / eval_s:.1f}× evaluation",
            ideal_value=1.0))
    info = {"wall": wall, "per_min": per_min, "store_s": store_s[0], "rows": json.dumps(seconds)}
    return rows, info


# ---------------------------------------------------------------------------------------------------------------
# merge costs at ViT-B/32 size, and the estimate


def _slice(ctx: Context) -> tuple[dict[str, torch.Tensor], str, float]:
    """A base state dict to time merges on, its description, and the factor that scales it to ViT-B/32."""
    from raymerge import models

    if ctx.quick:
        sd = models.build_encoder("raymerge-tiny-vit").state_dict()
        label = "quick: the tiny ViT, scaled by parameter count (meaningless as an estimate)"
    else:
        full = models.build_encoder("ViT-B-32").state_dict()
        sd = {k: v for k, v in full.items() if k.startswith("transformer.resblocks.0.")}
        del full
        label = "ViT-B/32's first residual block (7.1 M parameters, real key names and shapes)"
    sd = {k: v.detach().clone() for k, v in sd.items()}
    params = sum(v.numel() for v in sd.values())
    return sd, f"{label}; ×{VITB32_PARAMS / params:.1f} to the 87.8 M-parameter encoder", VITB32_PARAMS / params


def _merge_costs(ctx: Context) -> tuple[list[dict], dict]:
    """Merge seconds at T = 2 and 3 on a ViT-B/32 slice, torch on 1 thread (per-core cost: 2 threads on this loaded
    2-core machine are erratic), best of 3 rounds, each round timing every (method, T) and one plain copy."""
    from raymerge.merge import task_arithmetic, ties, weight_average

    base, label, scale = _slice(ctx)
    torch.manual_seed(0)
    fts = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    fns = {
        "weight_average": (lambda T: weight_average(fts[:T]), lambda T: (T + 1) / 2),
        "task_arithmetic": (lambda T: task_arithmetic(base, fts[:T], 0.3), lambda T: (T + 2) / 2),
        "ties": (lambda T: ties(base, fts[:T], 1.0, 0.2), lambda T: (T + 2) / 2),
    }
    rounds = 1 if ctx.quick else 3
    times: dict[tuple[str, int], list[float]] = {}
    copies: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            copies.append(_time(lambda: {k: v.clone() for k, v in base.items()}))
            for name, (fn, _) in fns.items():
                for T in (2, 3):
                    times.setdefault((name, T), []).append(_time(lambda: fn(T)))
    finally:
        torch.set_num_threads(threads)
    copy_s = best(copies)
    costs = {name: {T: best(times[(name, T)]) for T in (2, 3)} for name in fns}
    rows = []
    for name, (_, floor) in fns.items():
        progress(f"sweep estimate: {name} on {label.split(';')[0]}: T=2 {costs[name][2]:.2f} s, T=3 {costs[name][3]:.2f} s")
        measured = costs[name][3] * scale
        base_s = copy_s * scale
        rows.append(row(
            "ViT-B/32 merge cost (for the estimate)", f"{name}, T=3", measured, base_s,
            "one copy of the model's memory (clone: read + write), same machine, same rounds",
            measured / base_s, f"{floor(3):.1f} copies (reads T models{' and θ0' if name != 'weight_average' else ''}, "
            "writes one)" + ("; the trim's selection adds passes" if name == "ties" else ""),
            f"{label}; T=2: {costs[name][2] * scale:.2f} s; torch 1 thread; best of {rounds} rounds (T=3 rounds, "
            f"scaled: {', '.join(f'{t * scale:.2f}' for t in times[(name, 3)])} s: the first pays fresh-memory page "
            "faults)",
            ratio_means="merge seconds / copy seconds (= model copies)",
            gap=f"{measured / base_s / floor(3):.1f}× the floor", ideal_value=floor(3)))
    model = {}
    for name, c in costs.items():
        b = c[3] - c[2]
        a = c[2] - 2 * b
        if b <= 0 or a < 0:  # noise on a loaded machine: fall back to proportional to T
            a, b = 0.0, (c[2] / 2 + c[3] / 3) / 2
        model[name] = (a * scale, b * scale)
    return rows, model


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _estimate(ctx: Context, model: dict) -> list[dict]:
    from raymerge.sweep import subsets

    cart = ctx.shared.get("cart_vitb32", {})
    svd_bt = cart.get("exact_svd_s_per_block_task", float("nan"))
    if cart.get("width", 768) != 768:  # quick mode: scale the reduced width's cost to 768 as n³
        svd_bt *= (768 / cart["width"]) ** 3
    put_s = ctx.shared.get("vitb32_put_s", float("nan"))
    names = list(TEST_SIZES)
    plan = subsets(names)
    cost = {m: (lambda T, ab=ab: ab[0] + ab[1] * T) for m, ab in model.items()}
    n_total = sum(TEST_SIZES.values())
    images_static = sum(TEST_SIZES[t] for s in plan for t in s)  # per static method
    images_dawin = images_static + len(names) * n_total  # phase 2, + phase 1 once per (model, task): cached
    images = 4 * images_static + images_dawin
    gpu = images / (GPUS * GPU_IMAGES_PER_S)
    sum_sizes = sum(len(s) for s in plan)
    per_method = {
        "weight_average": sum(cost["weight_average"](len(s)) for s in plan),
        "task_arithmetic": sum(cost["task_arithmetic"](len(s)) for s in plan),
        "ties": sum(cost["ties"](len(s)) for s in plan),
        # CART on the driver: θavg (≈ a weight average) and T fine-tuned models put; its SVD jobs over the cluster
        "cart": sum(cost["weight_average"](len(s)) + len(s) * put_s
                    + len(s) * VITB32_BLOCKS * svd_bt / min(SVD_CORES, len(s) * 48) for s in plan),
    }
    prefetch = sum(per_method.values())
    dominant = max(per_method, key=per_method.get)
    dawin_merges = sum(len(s) * cost["task_arithmetic"](len(s)) for s in plan)  # K=1 per test set, main thread
    puts = (4 * len(plan) + sum_sizes) * put_s
    main = gpu + dawin_merges + puts
    estimate = max(prefetch, main)
    assumptions = (f"ASSUMED: {GPU_IMAGES_PER_S:.0f} images/s per GPU (ViT-B/32 fp16, A100/H100 class; raymerge's "
                   f"EvalWorker runs fp32 today) × {GPUS} GPUs; test sets {', '.join(f'{k} {v:,}' for k, v in TEST_SIZES.items())} "
                   f"(task_vectors benchmark); {SVD_CORES} CPU cores for SVD tasks")
    measured = (f"MEASURED here: merge cost a + b·T per method at ViT-B/32 size, exact SVD {svd_bt:.1f} s per block "
                f"and task (1 core), hash + put {put_s:.2f} s per weight set; driver CPU costs are one core of this loaded "
                "shared machine: a dedicated head node's cores, and several of them per merge, may be several times faster")
    h = 3600.0
    return [
        row("Full ViT-B/32 sweep estimate", "GPU evaluation (ideal)", gpu, gpu,
            "itself", 1.0, "the ideal",
            f"{len(plan)} subsets × 5 methods; {images / 1e6:.1f} M images: 4 static methods × {images_static / 1e6:.2f} M "
            f"(each task's test set once per subset holding it) + DaWin {images_dawin / 1e6:.2f} M (phase 2 once, phase 1 "
            f"once per (model, task) thanks to the logit cache; validation splits not counted); {assumptions}",
            value=gpu / h, unit="hours", estimate=True, ratio_means="—", gap="—", ideal_value=1.0),
        row("Full ViT-B/32 sweep estimate", "driver prefetch thread (WA, TA, TIES, CART merges)", prefetch, gpu,
            "GPU evaluation time", prefetch / gpu, "≤ 1× GPU time (hidden behind evaluation)",
            f"one background thread builds each static merge in turn: "
            f"{', '.join(f'{m} {v / h:.2f} h' for m, v in per_method.items())}; CART: θavg + "
            f"{sum_sizes * VITB32_BLOCKS * 4:,} SVD jobs over the cluster's cores; {measured}",
            dominant=dominant,
            value=prefetch / h, unit="hours", estimate=True, ratio_means="seconds / GPU seconds",
            gap=f"{prefetch / gpu:.1f}× GPU time", ideal_value=1.0),
        row("Full ViT-B/32 sweep estimate", "driver main thread (GPU eval + DaWin merges + weight puts)", main, gpu,
            "GPU evaluation time", main / gpu, "1× GPU time",
            f"DaWin (K=1) builds one task-arithmetic merge per (subset, task) = {sum_sizes} merges on the main thread, "
            f"not prefetched ({dawin_merges / h:.1f} h); {4 * len(plan) + sum_sizes} weight sets hashed and put "
            f"({puts / h:.1f} h); {measured}",
            value=main / h, unit="hours", estimate=True, ratio_means="seconds / GPU seconds",
            gap=f"{main / gpu:.1f}× GPU time", ideal_value=1.0),
        row("Full ViT-B/32 sweep estimate", "estimated wall time (max of the two driver threads)", estimate, gpu,
            "GPU evaluation time (the ideal)", estimate / gpu, "1× (GPU-bound)",
            f"{'driver-bound: the prefetch thread' if prefetch > main else 'the main thread'} sets the pace; "
            f"{assumptions}; {measured}",
            value=estimate / h, unit="hours", estimate=True, ratio_means="estimate / GPU-bound ideal",
            gap=f"{estimate / gpu:.1f}× the GPU-bound ideal", ideal_value=1.0),
    ]


def run(ctx: Context) -> list[dict]:
    rows, _ = _measure_sweep(ctx)
    merge_rows, model = _merge_costs(ctx)
    rows += merge_rows
    if "cart_vitb32" in ctx.shared and "vitb32_put_s" in ctx.shared:
        rows += _estimate(ctx, model)
    else:
        progress("sweep: no estimate (it needs the cart and evaluation sections of the same run)")
    return rows


def meaning(rows: list[dict]) -> str:
    head = rows[0]
    est = [r for r in rows if r["benchmark"] == "Full ViT-B/32 sweep estimate"]
    text = (f"The zoo sweep runs {head['value']:.1f} subsets/min, {head['ratio']:.1f}× its evaluation-only ideal: with "
            "tiny models, evaluation is cheap and per-candidate fixed costs (DaWin's phase 1 and mixture, Ray round "
            "trips, the results store) dominate.")
    if est:
        gpu, prefetch, main, final = est[0], est[1], est[2], est[-1]
        text += (f" For ViT-B/32 on 16 GPUs the estimate is {final['value']:.1f} h against {gpu['value']:.2f} h of GPU "
                 f"work ({final['ratio']:.1f}×)")
        if final["ratio"] > 1.5:
            bound = (f"the prefetch thread's merges ({prefetch.get('dominant', '?')} above all)"
                     if prefetch["ratio"] >= main["ratio"] else "the main thread's DaWin merges")
            text += (f": bound by {bound} on the driver, not by the GPUs; spreading merges over Ray tasks (as CART's "
                     "SVDs already are) is what would make the cluster pay off")
        text += ". The CPU costs behind it were measured on one loaded core here: treat it as an order of magnitude."
    return text
