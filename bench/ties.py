"""Benchmark: TIES at ViT-B/32 size against one model copy, and against the previous implementation.

Inputs: the state dict of ``build_encoder("ViT-B-32")`` (real key names and shapes, 87.8 M parameters, float32) as
θ0, and T fine-tuned models θt = θ0 + 1e-3 · std(θ0 key) · N(0, 1) per key (seeded; layers differ in scale, as real
task vectors do, so the global trim matters). T = 8 (the 8-task benchmark) and T = 3 (the subsets' mean size and the
sweep section's merge-cost row). λ = 1, density 0.2.

Timed in a fresh process, torch on 1 thread (on this shared 2-core machine two intra-op threads wait on each other
whenever another user holds a core), best of several rounds. Each round times one model copy (``{k: v.clone()}`` of
θ0: a read and a write of the whole model) and :func:`raymerge.merge.ties` side by side, each twice: on fresh pages
(freed heap memory given back to the kernel first, as for a process's first merge) and then reusing the memory the
first call freed (as in a loop of merges); and the validation every merge runs
(:func:`raymerge._arith.validate_with_base`) on its own. The previous implementation (below, kept as the baseline)
runs once per T, on fresh pages, each time in a process of its own: at T = 8 it needs ~14 GiB and is skipped when
the machine has less free. Peak extra memory: the process's resident high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) minus its resident size before the call, on fresh pages; the merged
model the call returns counts (one copy). tracemalloc does not see torch's allocations, hence the kernel's figures.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import time
from pathlib import Path

import torch

from bench.common import Context, best, progress, row, spread

TITLE = "TIES at ViT-B/32 size: one model copy, the previous implementation, memory"
USES_RAY = False  # merges of in-process state dicts
TARGET = 10.0  # issue #16: TIES within 10× of one model copy at ViT-B/32 size
LAM, DENSITY = 1.0, 0.2
TASKS = (3, 8)


# ---------------------------------------------------------------------------------------------------------------
# BASELINE, NOT raymerge's code: the TIES implementation raymerge.merge had before the chunked one (up to commit
# bba42bb), kept verbatim in substance so that its time and memory are measured side by side with the new one's. It
# concatenates each task vector into one flat tensor, finds its threshold with kthvalue over all n entries, stacks
# the T trimmed vectors (T × n) and elects signs and means over the stack.


def _baseline_trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    from raymerge._arith import floor_fraction

    keep = max(1, floor_fraction(density, vector.numel()))
    magnitude = vector.abs()
    threshold = magnitude.kthvalue(vector.numel() - keep + 1).values
    return torch.where(magnitude >= threshold, vector, torch.zeros_like(vector))


def baseline_ties(base: dict, finetuned: list, lam: float = 1.0, density: float = 0.2) -> dict:
    """The previous ``raymerge.merge.ties`` (float32), for comparison only."""
    from raymerge._arith import cast_to, dtypes_of, per_key, validate_with_base

    validate_with_base("ties", base, finetuned, None, min_finetuned=1)
    keys = [key for key, tensor in base.items() if tensor.is_floating_point()]
    trimmed = []
    for theta_t in finetuned:
        tau = per_key([base, theta_t], lambda key, tensors: tensors[1] - tensors[0], torch.float32)
        trimmed.append(_baseline_trim(torch.cat([tau[key].flatten() for key in keys]), density))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(dim=0))
    elected = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    agrees = torch.sign(stacked) * elected > 0
    total = torch.where(agrees, stacked, torch.zeros_like(stacked)).sum(dim=0)
    merged = dict(zip(keys, (total / agrees.sum(dim=0).clamp(min=1)).split([base[key].numel() for key in keys])))
    return cast_to(per_key([base], lambda key, tensors: tensors[0] + lam * merged[key].view_as(tensors[0]),
                           torch.float32), dtypes_of(base))


# ---------------------------------------------------------------------------------------------------------------
# the measuring process


def _models(architecture: str, tasks: int, seed: int = 0) -> tuple[dict, list[dict]]:
    from raymerge import models

    base = {k: v.detach().clone() for k, v in models.build_encoder(architecture).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    scale = {k: 1e-3 * (float(v.std()) if v.numel() > 1 and float(v.std()) > 0 else 1.0)
             for k, v in base.items() if v.is_floating_point()}
    finetuned = [{k: v + scale[k] * torch.randn(v.shape, generator=gen) if k in scale else v.clone()
                  for k, v in base.items()} for _ in range(tasks)]
    return base, finetuned


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _call(fn) -> tuple[float, int | None, object]:
    """Seconds and peak extra resident bytes of ``fn()`` (``None`` where the kernel cannot say), and its result."""
    can_peak = _peak_reset()
    before = _status("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, _status("VmHWM") - before if can_peak else None, result


def _trim_heap() -> None:
    """Give freed heap memory back to the kernel (glibc), so that the next call starts on fresh pages and its
    resident growth is all its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(architecture: str, rounds: int) -> dict:
    """Runs in a fresh process: the timing and memory figures of the copy and the new TIES.

    Each round calls the copy and each merge twice: "cold" after :func:`_trim_heap` (fresh pages, as a process's
    first merge; its peak memory is the one reported), then "warm" right after (the first call's freed memory is
    reused, as in a loop of merges that drops each result before the next)."""
    from raymerge._arith import validate_with_base
    from raymerge.merge import ties

    torch.set_num_threads(1)
    base, finetuned = _models(architecture, max(TASKS))
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    calls = {"copy": lambda: {k: v.clone() for k, v in base.items()}}
    calls.update({T: (lambda T=T: ties(base, finetuned[:T], LAM, DENSITY)) for T in TASKS})
    cold, warm = {name: [] for name in calls}, {name: [] for name in calls}
    validation = {T: [] for T in TASKS}
    for _ in range(rounds):
        for name, fn in calls.items():
            _trim_heap()
            cold[name].append(_call(fn)[:2])
            warm[name].append(_call(fn)[0])
        for T in TASKS:
            validation[T].append(_call(lambda: validate_with_base("ties", base, finetuned[:T], None, 1))[0])
    return {"params": sum(v.numel() for v in base.values()), "model_bytes": model_bytes, "cold": cold, "warm": warm,
            "validation": validation}


def measure_previous(architecture: str, tasks: int) -> tuple[float, int | None, int, float] | str:
    """Runs in a fresh process of its own (the previous implementation may exhaust memory): its seconds and peak
    extra bytes on fresh pages, and how many entries of its result differ from the new one's, and by how much at
    most; or why it did not run."""
    from raymerge.merge import ties

    torch.set_num_threads(1)
    base, finetuned = _models(architecture, tasks)  # the same seed: the first T models of measure()'s
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    # it holds the T trimmed vectors and their stack while it builds two more T × n tensors and a T × n mask, plus
    # a few models (measured at T = 3: 18 copies), and a GiB to spare for the machine's other users
    need = (4.5 * tasks + 6) * model_bytes + 2**30
    if _available() < need:
        return f"not run: it needs ~{need / 2**30:.0f} GiB free, {_available() / 2**30:.0f} GiB were"
    _trim_heap()
    seconds, extra, previous = _call(lambda: baseline_ties(base, finetuned, LAM, DENSITY))
    merged = ties(base, finetuned, LAM, DENSITY)
    differ = sum(int((merged[k] != previous[k]).sum()) for k in merged)
    largest = max(float((merged[k].double() - previous[k].double()).abs().max()) for k in merged
                  if merged[k].is_floating_point())
    return seconds, extra, differ, largest


# ---------------------------------------------------------------------------------------------------------------
# rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _in_fresh_process(fn, *args):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(ctx: Context) -> list[dict]:
    architecture = "raymerge-tiny-vit" if ctx.quick else "ViT-B-32"
    rounds = 1 if ctx.quick else 3
    progress(f"ties: {architecture}, T = {', '.join(map(str, TASKS))}, {rounds} round(s) in a fresh process "
             "(building the models takes a minute; the previous implementation runs once per T, in a process of its "
             "own, after it" + ("; quick: all at once" if ctx.quick else "") + ")")
    # one after the other, so that no measurement shares the machine; --quick measures nothing worth that time
    with concurrent.futures.ThreadPoolExecutor(1 + len(TASKS) if ctx.quick else 1) as threads:
        current = threads.submit(_in_fresh_process, measure, architecture, rounds)
        previous = {T: threads.submit(_in_fresh_process, measure_previous, architecture, T) for T in TASKS}
        m = current.result()
        m["old"] = {}
        for T, future in previous.items():
            progress(f"ties: the previous implementation, T = {T}, in a process of its own")
            try:
                m["old"][T] = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                m["old"][T] = "killed before it finished (out of memory?)"
    size = f"{m['params'] / 1e6:.1f} M parameters, {_gib(m['model_bytes'])}" + (
        "; quick: the tiny ViT, meaningless as a measurement" if ctx.quick else "")
    common = (f"{architecture} state dict ({size}) float32, fine-tuned = θ0 + 1e-3·std·N(0,1) per key; λ={LAM}, "
              f"density {DENSITY}; torch 1 thread, fresh process, best of {rounds}")
    conditions = {
        "memory reused": ("warm", "right after the same call, whose freed memory it reuses (a loop of merges)"),
        "fresh pages": ("cold", "after returning freed heap memory to the kernel (malloc_trim), so every page of the "
                                "result is faulted in anew (a process's first merge)"),
    }
    seconds = {"warm": m["warm"], "cold": {name: [s for s, _ in calls] for name, calls in m["cold"].items()}}
    rows = []
    for label, (cond, how) in conditions.items():
        copy_s = best(seconds[cond]["copy"])
        for T in TASKS:
            new_s, floor = best(seconds[cond][T]), (T + 2) / 2
            rows.append(row(
                "TIES / one model copy at ViT-B/32 size", f"{T} tasks, {label}", new_s, copy_s,
                "one model copy ({k: v.clone()} of θ0) under the same condition, same rounds", new_s / copy_s,
                f"≤ {TARGET:.0f}× (issue #16); floor {floor:.1f} copies (reads T models and θ0, writes one)",
                f"{common}; {label}: each call {how}; TIES {spread(seconds[cond][T])} s, one copy "
                f"{spread(seconds[cond]['copy'])} s; of TIES, validation (shared by every merge) "
                f"{best(m['validation'][T]):.2f} s",
                ratio_means="merge seconds / copy seconds (= model copies)",
                gap=f"{new_s / copy_s / TARGET:.1f}× the target, {new_s / copy_s / floor:.1f}× the floor",
                ideal_value=TARGET, params=m["params"]))
    for T in TASKS:
        new_s = best(seconds["cold"][T])
        old = m["old"][T]
        if isinstance(old, tuple):
            differ, largest = old[2:]
            rows.append(row(
                "TIES: chunked vs previous implementation", f"{T} tasks", new_s, old[0],
                "the previous implementation (flattened task vectors, kthvalue over n, T × n stacks), once, fresh "
                "pages", old[0] / new_s, "—",
                f"{common}; the new one on fresh pages as well; results: " + ("all entries bit-identical" if not differ
                else f"{m['params'] - differ:,} of {m['params']:,} entries bit-identical, the others differ by at "
                f"most {largest:.1e} (the previous code's stacked sum adds 5 or more tasks in another order than one "
                "after another)"),
                ratio_means="previous seconds / new seconds", gap=f"{old[0] / new_s:.1f}× as fast"))
        peaks = [p for _, p in m["cold"][T] if p is not None]
        if peaks:
            peak, old_peak = max(peaks), old[1] if isinstance(old, tuple) else None
            copy_peak = max(p for _, p in m["cold"]["copy"])
            rows.append(row(
                "TIES: peak extra memory", f"{T} tasks", new_s, best(seconds["cold"]["copy"]),
                f"one model copy's bytes ({_gib(m['model_bytes'])})", peak / m["model_bytes"],
                "1 copy (the merged model it returns)",
                f"{common}; resident high-water mark during the call minus resident size before it, on fresh pages: "
                f"{_gib(peak)} (a model copy's own: {_gib(copy_peak)})"
                + (f"; previous implementation {_gib(old_peak)}" if old_peak is not None else
                   f"; previous implementation {old}"),
                value=peak / m["model_bytes"], unit="copies", baseline_value=1.0,
                ratio_means="peak extra bytes / one model copy's bytes",
                gap=f"{peak / m['model_bytes'] - 1:+.2f} copies over the result"
                + (f"; previous {old_peak / m['model_bytes']:.1f} copies" if old_peak is not None else ""),
                ideal_value=1.0, **({"previous": old_peak / m["model_bytes"]} if old_peak is not None else {})))
    return rows


def meaning(rows: list[dict]) -> str:
    cost = [r for r in rows if r["benchmark"] == "TIES / one model copy at ViT-B/32 size"]
    versus = {r["case"]: r for r in rows if r["benchmark"] == "TIES: chunked vs previous implementation"}
    memory = {r["case"]: r for r in rows if r["benchmark"] == "TIES: peak extra memory"}
    text = ("At ViT-B/32 size TIES costs " + ", ".join(f"{r['ratio']:.0f} model copies ({r['case']})" for r in cost)
            + f" against a target of ≤ {TARGET:.0f}")
    if versus:
        text += "; it runs " + ", ".join(f"{r['ratio']:.1f}× as fast as the previous implementation ({r['case']})"
                                         for r in versus.values())
    if memory:
        text += "; its peak extra memory is " + ", ".join(
            f"{r['value']:.2f} copies ({r['case']}" + (f", previously {r['previous']:.0f})" if "previous" in r else ")")
            for r in memory.values())
    return (text + ". A copy is the cheapest thing a merge can do to a model (one read and one write); TIES reads "
            "T + 1 models and writes one. On a CPU its pass is one compiled loop (raymerge/_ties_kernel.py) that reads "
            "each task's entries once and keeps the running sums in cache (eager torch made about 17 elementwise "
            "passes over each task's chunk); then each task's threshold is selected among the few percent of entries "
            "in its sampled bracket, and those entries are merged again. Its cost still grows with T, the copy's does "
            "not. Fresh pages cost every call the same page faults, which narrows the ratio.")
