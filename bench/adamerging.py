"""Benchmark: peak memory of AdaMerging / CART++ test-time adaptation against the number of tasks (2, 4, 8).

On the zoo's multi-task pool (real fine-tuned tiny ViTs, their heads and test sets; the first T tasks), each
measurement in a fresh process (spawned; one torch thread): load the models, build the merge (AdaMerging: layer-wise
task vectors; CART++: CART's plan at ρ = 0.12 and its rank-k factors), then reset the process's peak resident set
(``/proc/self/clear_refs``) and run the adaptation steps (batches of 16, 2 per task per step). The number is the
peak resident memory above the resident memory just before the steps: what adaptation adds on top of the models it
holds (θ0 and T task vectors, or θavg and T·k-rank factors, which grow with T by nature and are measured apart).

Side by side, the same steps written as the released AdaMerging code writes them (every task's forward graph kept
until one ``backward`` of the summed losses; rewritten here for the baseline, not copied) against
:func:`raymerge.adamerging.adapt` (one forward and backward per task, graphs freed at once). ``--quick`` runs two
measurements at a time (each still in its own process, whose imports cost seconds).
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from bench.common import Context, progress, row

TITLE = "AdaMerging / CART++: peak memory of test-time adaptation vs the number of tasks"
BENCHMARK = "Test-time adaptation: peak memory above the resident models"
TASK_COUNTS = (2, 4, 8)
METHODS = ("adamerging", "cart_pp")
CART_RHO, CART_LAM = 0.12, 2.0  # the released CART config for ViT-B/32, 8 tasks


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _load(manifest: Path, tasks: int):
    """The first ``tasks`` tasks of the zoo's multi-task setting: architecture, θ0, their fine-tuned models, heads
    and preprocessed test images."""
    import yaml

    from raymerge import models
    from raymerge.data import load_dataset

    setting = yaml.safe_load(manifest.read_text())["settings"]["multitask"]
    pool, task_pool, root = setting["model_pool"], setting["task_pool"], manifest.parent
    arch = pool["architecture"]
    names = list(task_pool)[:tasks]
    if len(names) < tasks:
        raise ValueError(f"the zoo at {manifest} has {len(names)} multi-task tasks, fewer than {tasks}")
    base = models.load_encoder_weights(arch, root / pool["base"])
    finetuned = [models.load_encoder_weights(arch, root / pool["finetuned"][task_pool[n]["finetuned"]]) for n in names]
    heads = {n: models.load_head(root / task_pool[n]["head"]) for n in names}
    size = models.image_size(arch)
    images = {n: models.preprocess(load_dataset(root / task_pool[n]["test"]).images, size) for n in names}
    return arch, base, finetuned, heads, images


def _all_graphs_then_backward(encoder, merge, heads, images, settings, seed: int) -> None:
    """The released AdaMerging step: the merged weights, then every task's batches forward with their graphs alive,
    one ``backward`` of the summed mean entropies, an Adam step (the same merge, sampling and optimizer as adapt)."""
    import torch
    from torch.func import functional_call

    from raymerge.adamerging import entropy, sample_batches

    generator = torch.Generator().manual_seed(seed)
    raw = torch.full(merge.coefficient_shape, float(settings.init), dtype=merge.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=settings.lr, betas=settings.betas)
    for _ in range(settings.steps):
        batches = sample_batches(images, settings, generator)
        params = merge.parameters(settings.effective(raw))
        loss = sum(entropy(heads[task].logits(functional_call(encoder, params, (x,)))).mean()
                   for task, task_batches in batches.items() for x in task_batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def measure(manifest: str, method: str, tasks: int, style: str, steps: int) -> dict:
    """One measurement, to run in a fresh process (the peak resident set only sees memory the process had not
    touched before): peak memory above the resident state during ``steps`` steps, on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(manifest, method, tasks, style, steps)
    finally:
        torch.set_num_threads(threads)


def _measure(manifest: str, method: str, tasks: int, style: str, steps: int) -> dict:
    from raymerge import models
    from raymerge.adamerging import AdaptSettings, LowRankMerge, TaskVectorMerge, adapt
    from raymerge.cart import plan_cart
    from raymerge.lowrank import run_jobs

    arch, base, finetuned, heads, images = _load(Path(manifest), tasks)
    if method == "adamerging":
        merge, settings = TaskVectorMerge(base, finetuned, "layer"), AdaptSettings(steps=steps)
    else:
        plan = plan_cart(base, finetuned, CART_RHO)
        merge, settings = LowRankMerge(plan, run_jobs(plan)), AdaptSettings.for_cart_pp(CART_LAM, steps=steps)
    encoder = models.build_encoder(arch)
    del base, finetuned
    gc.collect()
    resident = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
    start = time.perf_counter()
    if style == "task by task":
        adapt(encoder, merge, heads, images, settings, seed=0)
    else:
        _all_graphs_then_backward(encoder, merge, heads, images, settings, seed=0)
    seconds = time.perf_counter() - start
    return {"peak_mib": (_status_kib("VmHWM") - resident) / 1024, "resident_mib": resident / 1024,
            "seconds_per_step": seconds / steps}


def _in_fresh_process(*args) -> dict:
    """:func:`measure` in a process of its own: its peak resident set only sees memory that process had not touched."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as process:
        return process.submit(measure, *args).result()


def run(ctx: Context) -> list[dict]:
    manifest = str(ctx.manifest())
    steps, counts = (1, TASK_COUNTS[:2]) if ctx.quick else (3, TASK_COUNTS)
    cases = [(method, tasks, style) for method in METHODS for tasks in counts
             for style in ("task by task", "all graphs then one backward")]
    progress(f"adamerging: {len(cases)} measurements of {steps} step(s), each in a fresh process"
             + (", two at a time (quick)" if ctx.quick else ""))
    results = {}
    threads = ThreadPoolExecutor(2 if ctx.quick else 1)
    try:
        running = {case: threads.submit(_in_fresh_process, manifest, *case, steps) for case in cases}
        for case, future in running.items():
            results[case] = future.result()
            progress(f"adamerging: {case[0]}, {case[1]} tasks, {case[2]}: done")
    finally:
        threads.shutdown(cancel_futures=True)  # a failed measurement does not wait for the ones not started
    rows = []
    for method in METHODS:
        flat = results[method, counts[0], "task by task"]["peak_mib"]
        for tasks in counts:
            ours, theirs = results[method, tasks, "task by task"], results[method, tasks, "all graphs then one backward"]
            rows.append(row(
                BENCHMARK, f"{method}, {tasks} tasks", ours["seconds_per_step"], theirs["seconds_per_step"],
                "the released code's step: all tasks' graphs, then one backward", theirs["peak_mib"] / ours["peak_mib"],
                f"task by task: flat in T (= its {TASK_COUNTS[0]}-task value); all graphs: grows ~linearly in T",
                f"zoo multi-task pool, first {tasks} tasks; batches of 16, 2 per task per step, {steps} step(s), one "
                f"thread, each measurement in a fresh process{' (quick: two at a time)' if ctx.quick else ''}; peak resident memory above the {ours['resident_mib']:.0f}"
                f" MiB resident before the steps (models, merge, images); seconds per step: {ours['seconds_per_step']:.2f}"
                f" task by task, {theirs['seconds_per_step']:.2f} all graphs"
                + (f"; CART++ at ρ = {CART_RHO}, from λ = {CART_LAM}" if method == "cart_pp" else "; layer-wise"),
                value=ours["peak_mib"], baseline_value=theirs["peak_mib"], unit="MiB",
                ratio_means="all-graphs peak / task-by-task peak",
                gap=f"{ours['peak_mib'] / flat:.2f}× its {TASK_COUNTS[0]}-task peak (1.00 = flat)"))
    return rows


def meaning(rows: list[dict]) -> str:
    parts = []
    for method in METHODS:
        mine = [r for r in rows if r["case"].startswith(method + ",")]
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        parts.append(
            f"{method}: task by task {first['value']:.0f} → {last['value']:.0f} MiB from {first['case'].split(', ')[1]} "
            f"to {last['case'].split(', ')[1]} ({last['value'] / first['value']:.2f}×), the released code's pattern "
            f"{first['baseline_value']:.0f} → {last['baseline_value']:.0f} MiB "
            f"({last['baseline_value'] / first['baseline_value']:.2f}×)")
    return ("; ".join(parts) + ". Freeing each task's graph by its own backward keeps the adaptation's working memory "
            "at one task's batches' activations plus three model-sized tensors (merged weights, their copies and gradients), "
            "whatever the number of tasks; keeping every task's graph until one backward grows with each task, as "
            "AdaMerging's issue #3 reports on GPUs (about 5.7 GB per ViT-B/32 task).")
