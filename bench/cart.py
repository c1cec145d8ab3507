"""Benchmark: CART merges (cart-2025.md Eq. 3–4): raymerge's exact path against the authors' loop, float32 against
float64 SVDs, exact against randomized SVD, and distributed over Ray workers.

(0) raymerge's exact CART (float32 SVDs in the cheaper orientation, one job per (matrix, task), factors summed as one
    product) against a float32 loop written here after the released code (JH-GEECS/CART ``src/merging.py``: per task
    and per attention/MLP weight matrix, the centered matrix τt + θ0 − θavg, a full ``torch.linalg.svd``, the rank-k
    reconstruction, summed over tasks, θavg + λ·sum), both on one thread, on one ViT-B/32-shaped block with 4 tasks
    and on the zoo; each merge's error against a float64 merge. Then the precision decision: the worst per-matrix
    relative difference between float32 and float64 merges on the zoo (ρ 0.04–0.25, fused and split q/k/v) and on
    ViT-B/32 shapes (three spectra), against the 1e-6 criterion; and the two orientations of a wide matrix's SVD.

(a) the zoo's 8 multi-task fine-tuned tiny ViTs (16 matrices of at most 256 × 64 per model);
(b) ViT-B/32-shaped matrices: per residual block in_proj 2304×768, out_proj 768×768, c_fc 3072×768,
    c_proj 768×3072, with 8 random task vectors of decaying spectrum σi ∝ 1/i and random orthogonal factors (QR).
    Only some blocks are built (one in the full run: an exact SVD of the four matrices takes ~5–10 s per task on one
    core here, so 12 blocks × 8 tasks would take 10–20 minutes alone); times per block scale linearly to 12.

Local merges run :func:`raymerge.cart.cart`'s own three steps (``plan_cart`` → ``low_rank_approx`` per job →
``assemble_cart``; ``cart()`` is exactly that), so each SVD's time is known too. ρ = 0.08, λ = 1, seed 0.
:func:`raymerge.workers.distributed_cart` runs on a local Ray restarted with 1 CPU ("1 worker"), then with 2 CPUs
("2 workers"), tasks of 1 CPU, after a warm-up; ``--quick`` keeps the running Ray and limits concurrency with the task
shape instead. Its result is checked bit-identical to the local merge.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from bench.common import Context, best, pct_over, progress, row, spread, wait_for_idle_cpus

TITLE = ("CART: raymerge's exact path vs the authors' loop, float32 vs float64 SVDs, exact vs randomized SVD, and "
         "distributed_cart over 1 vs 2 Ray workers")
PRECISION_CRITERION = 1e-6  # the float32 merge must stay within this of the float64 one, relative, per matrix
RHO = 0.08
SEED = 0
FLOAT32_EPS = float(np.finfo(np.float32).eps)
VITB32_MATRICES = {  # key suffix -> (rows, cols) at width 768
    "attn.in_proj_weight": (3, 1),
    "attn.out_proj.weight": (1, 1),
    "mlp.c_fc.weight": (4, 1),
    "mlp.c_proj.weight": (1, 4),
}
SPECTRA = {"σi = 0.97^i": lambda i: 0.97 ** i, "σi ∝ 1/i": lambda i: 1.0 / i, "σi ∝ 1/√i": lambda i: i ** -0.5}
MAIN_SPECTRUM = "σi ∝ 1/i"


# ---------------------------------------------------------------------------------------------------------------
# the merge, timed step by step


def timed_cart(base, finetuned, svd: str, lam: float = 1.0, precision: torch.dtype = torch.float32) -> dict:
    """``cart(base, finetuned, RHO, lam, svd, SEED, precision=precision)`` as its three steps; returns the merge, the
    rank-k approximations (dense, per (matrix, task)) and the time of each step and each SVD job."""
    from raymerge.cart import plan_cart
    from raymerge.lowrank import assemble, run_jobs

    start = time.perf_counter()
    plan = plan_cart(base, finetuned, RHO, svd, SEED, precision=precision)
    plan_s = time.perf_counter() - start
    job_s = {}
    results = run_jobs(plan, on_job=lambda job, seconds: job_s.__setitem__(job.name[1:], seconds))
    t = time.perf_counter()
    merged = assemble(plan, results, lam)
    assemble_s = time.perf_counter() - t
    approximations = {name[1:]: factors.left @ factors.right for name, factors in results.items()}
    return {"total": time.perf_counter() - start, "plan": plan_s, "svds": sum(job_s.values()), "assemble": assemble_s,
            "job_s": job_s, "approximations": approximations, "merged": merged, "plan_obj": plan}


def errors(exact: dict, randomized: dict) -> tuple[float, float, float]:
    """(relative error of the whole low-rank update λΣt SVDk(τ̄t) over all selected matrices, max and median
    per-matrix relative error ‖SVDk_rand − SVDk_exact‖F / ‖SVDk_exact‖F), in float64."""
    a, b = exact["approximations"], randomized["approximations"]
    by_key: dict[str, list] = {}
    for (key, t) in a:
        by_key.setdefault(key, []).append((key, t))
    num = den = 0.0
    for names in by_key.values():
        se = sum(a[n].double() for n in names)
        sr = sum(b[n].double() for n in names)
        num += float((sr - se).square().sum())
        den += float(se.square().sum())
    per = [float((b[n].double() - a[n].double()).norm() / a[n].double().norm()) for n in a]
    return math.sqrt(num / den), max(per), float(np.median(per))


def flops_exact(m: int, n: int, k: int) -> float:
    """Thin SVD (Golub & Van Loan: the cheaper of Golub–Reinsch 14ab²+8b³ and R-SVD 6ab²+20b³, a ≥ b) plus the
    rank-k reconstruction 2mnk."""
    a, b = max(m, n), min(m, n)
    return min(14 * a * b * b + 8 * b**3, 6 * a * b * b + 20 * b**3) + 2 * m * n * k


def flops_randomized(m: int, n: int, k: int) -> float:
    """torch.svd_lowrank as low_rank_approx calls it: q = min(k + max(k, 10), min(m, n)) columns, 4 power
    iterations: 10 products of 2mnq, 9 QRs of a×q (~4aq² each), an SVD of the q×b sketch, the reconstruction."""
    from raymerge.cart import RANDOMIZED_MIN_OVERSAMPLING, RANDOMIZED_POWER_ITERATIONS

    a, b = max(m, n), min(m, n)
    q = min(k + max(k, RANDOMIZED_MIN_OVERSAMPLING), b)
    it = RANDOMIZED_POWER_ITERATIONS
    return (2 * it + 2) * 2 * m * n * q + (2 * it + 1) * 4 * a * q * q + 14 * b * q * q + 8 * q**3 + 2 * m * n * k


def _flop_ratio(plan) -> float:
    from raymerge.cart import rank_for

    shapes = [tuple(plan.origin[job.name[1]].shape) for job in plan.jobs]
    ks = [rank_for(s, RHO) for s in shapes]
    return sum(flops_exact(*s, k) for s, k in zip(shapes, ks)) / sum(flops_randomized(*s, k) for s, k in zip(shapes, ks))


# ---------------------------------------------------------------------------------------------------------------
# inputs


def zoo_models(ctx: Context):
    import yaml

    from raymerge import models

    manifest = ctx.manifest()
    pool = yaml.safe_load(manifest.read_text())["settings"]["multitask"]["model_pool"]
    root = manifest.parent
    arch = pool["architecture"]
    base = models.load_encoder_weights(arch, root / pool["base"])
    finetuned = [models.load_encoder_weights(arch, root / p) for p in pool["finetuned"].values()]
    return base, finetuned


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen)).Q


def low_rank_matrix(m: int, n: int, spectrum, gen: torch.Generator, scale: float = 0.01) -> torch.Tensor:
    r = min(m, n)
    sigma = scale * torch.tensor([spectrum(i) for i in range(1, r + 1)])
    return (orthonormal(m, r, gen) * sigma) @ orthonormal(n, r, gen).T


def vitb32_blocks(blocks: int, tasks: int, width: int, spectrum, seed: int = 0):
    """θ0 and ``tasks`` fine-tuned state dicts holding only the 4 CART matrices of ``blocks`` residual blocks of a
    ViT-B/32-shaped encoder (width 768; smaller widths keep the proportions), task vectors U diag(σ) Vᵀ."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"transformer.resblocks.{b}.{name}": (r * width, c * width)
              for b in range(blocks) for name, (r, c) in VITB32_MATRICES.items()}
    base = {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in shapes.items()}
    finetuned = [{key: base[key] + low_rank_matrix(*shape, spectrum, gen) for key, shape in shapes.items()}
                 for _ in range(tasks)]
    return base, finetuned


# ---------------------------------------------------------------------------------------------------------------
# rows


def _merge_rows(label: str, exact: dict, randomized: dict, setup: str) -> list[dict]:
    ideal = _flop_ratio(exact["plan_obj"])
    speedup = exact["total"] / randomized["total"]
    update_err, max_err, med_err = errors(exact, randomized)
    jobs = len(exact["job_s"])
    rows = [
        row("CART exact vs randomized SVD", f"{label}: merge time", randomized["total"], exact["total"],
            "the same merge with exact SVD (torch.linalg.svd, float32, 1 thread)", speedup,
            f"≈ {ideal:.1f}× (flop-count ratio, see note)",
            f"{setup}; {jobs} SVD jobs; exact: SVDs {exact['svds']:.2f} s + θavg/plan {exact['plan']:.2f} s + assemble "
            f"{exact['assemble']:.2f} s; randomized: SVDs {randomized['svds']:.2f} s; ideal = Σ flops of thin SVDs "
            "(cheaper of Golub–Reinsch / R-SVD) over Σ flops of svd_lowrank (q = 2k, 4 power iterations); "
            "LAPACK's SVD runs below its flop rate, so beating this ideal is possible",
            ratio_means="exact seconds / randomized seconds", gap=f"{speedup / ideal:.2f} of the flop-ratio ideal",
            ideal_value=ideal),
        row("CART exact vs randomized SVD", f"{label}: error of the low-rank update", randomized["total"],
            exact["total"], "the exact merge", speedup,
            f"≤ {FLOAT32_EPS:.1e} (float32 rounding of the stored checkpoint)",
            "‖λΣt SVDk_rand(τ̄t) − λΣt SVDk_exact(τ̄t)‖F / ‖λΣt SVDk_exact(τ̄t)‖F over all selected matrices "
            "(= ‖merge_rand − merge_exact‖ / ‖merge_exact − θavg‖ before the float32 cast); "
            f"per-matrix median {med_err:.1e}",
            value=update_err, unit="relative error", ratio_means="exact seconds / randomized seconds",
            gap=f"{update_err / FLOAT32_EPS:.2g}× float32 eps", ideal_value=FLOAT32_EPS),
        row("CART exact vs randomized SVD", f"{label}: worst per-matrix error", randomized["total"], exact["total"],
            "the exact SVDk of the same centered matrix", speedup,
            f"≤ {FLOAT32_EPS:.1e} (float32 rounding)",
            "max over (matrix, task) of ‖SVDk_rand(τ̄) − SVDk_exact(τ̄)‖F / ‖SVDk_exact(τ̄)‖F",
            value=max_err, unit="relative error", ratio_means="exact seconds / randomized seconds",
            gap=f"{max_err / FLOAT32_EPS:.2g}× float32 eps", ideal_value=FLOAT32_EPS),
    ]
    return rows


def _shape_rows(label: str, exact: dict, randomized: dict) -> list[dict]:
    from raymerge.cart import rank_for

    rows = []
    plan = exact["plan_obj"]
    for suffix in VITB32_MATRICES:
        names = [n for n in exact["job_s"] if n[0].endswith(suffix)]
        shape = tuple(plan.origin[names[0][0]].shape)
        k = rank_for(shape, RHO)
        e = float(np.mean([exact["job_s"][n] for n in names]))
        r = float(np.mean([randomized["job_s"][n] for n in names]))
        ideal = flops_exact(*shape, k) / flops_randomized(*shape, k)
        rows.append(row(
            "CART exact vs randomized SVD: per matrix", f"{label}: {suffix} {shape[0]}×{shape[1]}, k={k}", r, e,
            "exact SVD of the same matrices (mean per job)", e / r, f"≈ {ideal:.1f}× (flop-count ratio)",
            f"mean of {len(names)} jobs, 1 thread, float32; exact Gflop {flops_exact(*shape, k) / 1e9:.1f}, "
            f"randomized {flops_randomized(*shape, k) / 1e9:.1f}; exact at "
            f"{flops_exact(*shape, k) / e / 1e9:.1f} Gflop/s",
            ratio_means="exact / randomized seconds", gap=f"{e / r / ideal:.2f} of the flop-ratio ideal",
            ideal_value=ideal))
    return rows


def _spectrum_rows(width: int, quick: bool) -> list[dict]:
    """Error of the randomized SVD on one c_fc-shaped matrix for three spectra (the decay decides the error)."""
    from raymerge.cart import low_rank_approx, rank_for

    m, n = 4 * width, width
    k = rank_for((m, n), RHO)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, spectrum in SPECTRA.items():
        a = low_rank_matrix(m, n, spectrum, gen)
        te, exact = _timed(lambda: low_rank_approx(a, k, "exact"))
        tr, rand = _timed(lambda: low_rank_approx(a, k, "randomized", 7))
        err = float((rand.double() - exact.double()).norm() / exact.double().norm())
        rows.append(row(
            "CART randomized SVD error by spectrum", f"{m}×{n}, k={k}, {name}", tr, te, "exact SVD, same matrix",
            te / tr, f"≤ {FLOAT32_EPS:.1e} (float32 rounding)",
            "one matrix U diag(σ) Vᵀ with random orthogonal U, V; slower decay leaves more energy beyond the "
            "sketch, which 4 power iterations only partly remove" + ("; quick: reduced width" if quick else ""),
            value=err, unit="relative error", ratio_means="exact / randomized seconds",
            gap=f"{err / FLOAT32_EPS:.2g}× float32 eps", ideal_value=FLOAT32_EPS))
    return rows


def authors_loop(base, finetuned, rank_ratio: float, lam: float) -> dict:
    """CART as the released code computes it (JH-GEECS/CART ``StaticMergeModule._merge_weights("CART")``), rewritten
    here: θavg = θ0 + (1/T) Σt τt; per task, every key with "attn" or "mlp" in it and neither "ln" nor "bias" gets
    τt + θ0 − θavg decomposed by a float32 ``torch.linalg.svd`` of the whole matrix and replaced by its rank
    ``max(1, int(ρ·r))`` reconstruction, other keys keep τt + θ0 − θavg; then θavg + λ·Σt of those."""
    tasks = len(finetuned)
    theta_avg = {key: value + sum(ft[key] - value for ft in finetuned) * (1.0 / tasks) for key, value in base.items()}
    total = {key: torch.zeros_like(value) for key, value in base.items()}
    for ft in finetuned:
        for key, theta0 in base.items():
            centered = (ft[key] - theta0) + theta0 - theta_avg[key]
            if ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key):
                u, s, vh = torch.linalg.svd(centered, full_matrices=False)
                k = max(1, int(rank_ratio * s.shape[0]))
                centered = (u[:, :k] * s[:k]) @ vh[:k, :]
            total[key] += centered
    return {key: theta_avg[key] + lam * total[key] for key in base}


def worst_relative(merged: dict, reference: dict, keys) -> float:
    """max over ``keys`` of ‖merged − reference‖F / ‖reference‖F, in float64."""
    return max(float((merged[k].double() - reference[k].double()).norm() / reference[k].double().norm()) for k in keys)


def _one_thread(fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def _authors_rows(label: str, base, finetuned, rank_ratio: float, lam: float, repeats: int) -> list[dict]:
    """raymerge's exact CART vs the authors' loop, one thread each, alternating, best of ``repeats``; errors against a
    float64 merge."""
    from raymerge._arith import validate_with_base
    from raymerge.cart import cart, select_low_rank

    ours_s, theirs_s = [], []
    validation_s = best([_one_thread(lambda: _timed(lambda: validate_with_base("cart", base, finetuned, None, 2)))[0]
                         for _ in range(repeats)])
    for _ in range(repeats):
        t, ours = _one_thread(lambda: _timed(lambda: cart(base, finetuned, rank_ratio, lam)))
        ours_s.append(t)
        t, theirs = _one_thread(lambda: _timed(lambda: authors_loop(base, finetuned, rank_ratio, lam)))
        theirs_s.append(t)
    t64, reference = _one_thread(lambda: _timed(lambda: cart(base, finetuned, rank_ratio, lam, precision=torch.float64)))
    keys = list(select_low_rank(base, rank_ratio))
    ours_err, theirs_err = worst_relative(ours, reference, keys), worst_relative(theirs, reference, keys)
    between = worst_relative(ours, theirs, keys)
    o, a = best(ours_s), best(theirs_s)
    note = (f"{len(keys)} matrices × {len(finetuned)} tasks, ρ={rank_ratio}, λ={lam}, one thread, best of {repeats} "
            f"(raymerge {spread(ours_s)} s, authors' loop {spread(theirs_s)} s, alternating); worst per-matrix relative "
            f"error against a float64 merge: raymerge {ours_err:.1e}, authors' loop {theirs_err:.1e} (criterion "
            f"{PRECISION_CRITERION:.0e}); raymerge vs the authors' loop {between:.1e}; raymerge's time includes checking "
            f"its inputs (keys, shapes, dtypes, NaN/Inf of all {len(finetuned) + 1} checkpoints), which the authors' "
            f"loop does not do: {validation_s:.3f} s ({validation_s / o:.0%}); the float64 option takes {t64:.2f} s")
    return [
        row("CART exact: raymerge vs the authors' loop (float32)", f"{label}: merge time", o, a,
            "the released code's loop, float32, rewritten here", a / o, "≥ 1.0× at equal accuracy", note,
            ratio_means="authors' seconds / raymerge seconds",
            gap="met" if a / o >= 1.0 and ours_err <= max(PRECISION_CRITERION, theirs_err) else "missed",
            ideal_value=1.0, validation_s=validation_s),
        row("CART exact: raymerge vs the authors' loop (float32)", f"{label}: float64 option", t64, o,
            "raymerge's default float32 path", t64 / o, "≈ 2× (float64 LAPACK runs at about half the float32 rate)",
            note, ratio_means="float64 seconds / float32 seconds", gap=f"{t64 / o:.2f}×"),
    ]


def _precision_rows(zoo_base, zoo_ft, width: int, quick: bool) -> list[dict]:
    """Worst per-matrix relative difference between the float32 and float64 CART merges: zoo and ViT-B/32 shapes."""
    from raymerge.cart import cart, select_low_rank

    rows = []
    cases = [("zoo", zoo_base, zoo_ft, rho, lam, qkv)
             for rho, lam in ((0.04, 1.0), (0.08, 1.0), (0.12, 2.0), (0.25, 1.0)) for qkv in ("fused", "split")]
    for name, spectrum in SPECTRA.items():
        base, finetuned = vitb32_blocks(1, 4, width, spectrum, seed=2)
        cases += [(f"ViT-B/32 shapes {name}", base, finetuned, rho, lam, "fused") for rho, lam in ((0.08, 1.0), (0.12, 2.0))]
    for label, base, finetuned, rho, lam, qkv in cases:
        t32, out32 = _one_thread(lambda: _timed(lambda: cart(base, finetuned, rho, lam, qkv=qkv)))
        t64, out64 = _one_thread(lambda: _timed(lambda: cart(base, finetuned, rho, lam, qkv=qkv, precision=torch.float64)))
        err = worst_relative(out32, out64, list(select_low_rank(base, rho)))
        rows.append(row(
            "CART float32 vs float64 SVDs: worst per-matrix relative difference",
            f"{label}, ρ={rho}, λ={lam}, qkv={qkv}", t32, t64, "the same merge with float64 SVDs (precision=float64)",
            t64 / t32, f"≤ {PRECISION_CRITERION:.0e} (the criterion for float32)",
            f"max over the low-ranked matrices of ‖merge32 − merge64‖F / ‖merge64‖F (merges in the checkpoint dtype, "
            f"float32); {len(finetuned)} tasks; one thread" + ("; quick: reduced width" if quick and "ViT" in label else ""),
            value=err, unit="relative difference", ratio_means="float64 seconds / float32 seconds",
            gap="met" if err <= PRECISION_CRITERION else f"missed ({err / PRECISION_CRITERION:.1f}× the criterion)",
            ideal_value=PRECISION_CRITERION))
    return rows


def _orientation_rows(width: int, repeats: int) -> list[dict]:
    """A wide matrix's float32 SVD as it is and as its transpose (what raymerge.lowrank.svd does)."""
    m, n = width, 4 * width  # c_proj
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    direct = best([_one_thread(lambda: _timed(lambda: torch.linalg.svd(a, full_matrices=False)))[0]
                   for _ in range(repeats)])
    from raymerge.lowrank import svd

    turned = best([_one_thread(lambda: _timed(lambda: svd(a)))[0] for _ in range(repeats)])
    return [row("CART exact: raymerge vs the authors' loop (float32)", f"SVD of a wide {m}×{n} matrix (c_proj)", turned,
                direct, "torch.linalg.svd of the matrix as it is", direct / turned, "> 1× (LAPACK's gesdd favours tall)",
                f"float32, one thread, best of {repeats}; raymerge.lowrank.svd decomposes the transpose and swaps the "
                "factors back (including the copy into a fresh buffer)",
                ratio_means="direct seconds / transposed seconds", gap=f"{direct / turned:.2f}×")]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _worker_pids() -> set[int]:
    """Pids of this Ray's worker processes (children of our raylet, from /proc): to count workers started during a
    timed call."""
    import ray
    from pathlib import Path

    node = ray._private.worker._global_node
    raylet = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == raylet:  # field 4 of /proc/<pid>/stat: the parent pid
            pids.add(int(stat.parent.name))
    return pids


def _distributed_times(cases: list[tuple], workers: int, restart: bool) -> dict[str, dict]:
    """Time ``distributed_cart`` with ``workers`` concurrent tasks on every case.

    ``restart``: Ray is restarted with ``workers`` CPUs and tasks ask for 1 CPU (the full run); otherwise the running
    2-CPU Ray is kept and tasks ask for 2 / ``workers`` CPUs (the smoke run: no restarts, but a change of task shape
    can make the raylet start fresh worker processes, which the note counts).
    """
    import ray

    from bench.common import start_ray
    from raymerge.workers import distributed_cart

    if restart:
        ray.shutdown()
        start_ray(num_cpus=workers)
    num_cpus = 1.0 if restart else 2.0 / workers
    out = {}
    first = cases[0]
    for _ in range(2 if restart else 1):  # warm-up: every worker process imports torch and raymerge
        wait_for_idle_cpus()
        distributed_cart(first[1], first[2], RHO, 1.0, first[3], SEED, num_cpus=num_cpus)
    for label, base, finetuned, svd, repeats in cases:
        times, started, merged = [], 0, None
        for _ in range(repeats):
            wait_for_idle_cpus()
            before = _worker_pids()
            t, merged = _timed(lambda: distributed_cart(base, finetuned, RHO, 1.0, svd, SEED, num_cpus=num_cpus))
            started += len(_worker_pids() - before)
            times.append(t)
        out[label] = {"times": times, "started": started, "merged": merged}
    return out


def _distributed_rows(cases: list[tuple], locals_: dict[str, dict], restart: bool) -> list[dict]:
    """``distributed_cart`` with 1 worker, then 2 (see :func:`_distributed_times`); a restarted Ray is left with 2
    CPUs for the next sections."""
    one = _distributed_times(cases, 1, restart)
    two = _distributed_times(cases, 2, restart)
    how = ("a fresh local Ray started with num_cpus=1, then one with num_cpus=2 (tasks of 1 CPU), each warmed up"
           if restart else "the running 2-CPU Ray, tasks of 2 CPUs (1 at a time) then 1 CPU (2 at a time), warmed up")
    rows = []
    for label, _, _, svd, repeats in cases:
        local = locals_[label]
        t1, t2 = best(one[label]["times"]), best(two[label]["times"])
        identical = all(torch.equal(one[label]["merged"][k], local["merged"][k])
                        and torch.equal(two[label]["merged"][k], local["merged"][k]) for k in local["merged"])
        common = (f"{len(local['job_s'])} SVD tasks ({svd}) on {how}; best of {repeats} (1 worker: "
                  f"{spread(one[label]['times'])} s, 2 workers: {spread(two[label]['times'])} s); worker processes "
                  f"started during the timed calls: {one[label]['started']} and {two[label]['started']}; result "
                  f"bit-identical to the local merge: {'yes' if identical else 'NO'}")
        rows += [
            row("distributed_cart: 2 vs 1 Ray workers", label, t2, t1,
                "distributed_cart with one worker", t1 / t2,
                "2.0× (two cores)", common + "; the cores are shared with other users' processes",
                ratio_means="1-worker seconds / 2-worker seconds", gap=f"{t1 / t2 / 2:.0%} of the ideal speedup",
                ideal_value=2.0),
            row("distributed_cart: 2 vs 1 Ray workers", f"{label}: 1 worker vs local cart()", t1, local["total"],
                f"the same merge in one process (cart's plan → {svd} SVDs → assemble)", local["total"] / t1,
                "1.0× (Ray adds nothing)", common + "; the local merge was timed earlier in this section",
                ratio_means="local seconds / 1-worker seconds",
                gap=pct_over(t1, local["total"]).replace("ideal", "local"), ideal_value=1.0),
        ]
    return rows


def run(ctx: Context) -> list[dict]:
    rows = []
    zoo_base, zoo_ft = zoo_models(ctx)
    repeats = 1 if ctx.quick else 3
    width = 128 if ctx.quick else 768
    # (0) the authors' loop, precision, orientation
    progress("cart (0): raymerge's exact CART vs the authors' loop, one ViT-B/32 block × 4 tasks and the zoo")
    base4, finetuned4 = vitb32_blocks(1, 3 if ctx.quick else 4, width, SPECTRA[MAIN_SPECTRUM], seed=1)
    rows += _authors_rows(f"ViT-B/32 shapes, 1 block × {len(finetuned4)} tasks" + (f" (quick: width {width})"
                                                                                   if ctx.quick else ""),
                          base4, finetuned4, 0.12, 2.0, 1 if ctx.quick else 2)
    rows += _authors_rows(f"zoo ({len(zoo_ft)} tiny ViTs)", zoo_base, zoo_ft, 0.12, 2.0, repeats)
    rows += _orientation_rows(width, repeats)
    progress("cart (0): float32 vs float64 SVDs on the zoo and on ViT-B/32 shapes")
    rows += _precision_rows(zoo_base, zoo_ft, width, ctx.quick)
    # (a) the zoo
    progress(f"cart (a): zoo, {len(zoo_ft)} tasks, exact and randomized, best of {repeats}")
    zoo_exact = min((timed_cart(zoo_base, zoo_ft, "exact") for _ in range(repeats)), key=lambda r: r["total"])
    zoo_rand = min((timed_cart(zoo_base, zoo_ft, "randomized") for _ in range(repeats)), key=lambda r: r["total"])
    zoo_label = f"zoo ({len(zoo_ft)} tiny ViTs)"
    rows += _merge_rows(zoo_label, zoo_exact, zoo_rand, f"zoo multi-task models, ρ={RHO}, best of {repeats}")

    # (b) ViT-B/32 shapes
    blocks, tasks = (1, 3) if ctx.quick else (1, 8)
    label = f"ViT-B/32 shapes, {blocks} block × {tasks} tasks" + (f" (quick: width {width})" if width != 768 else "")
    progress(f"cart (b): building {label}, {MAIN_SPECTRUM}")
    base, finetuned = vitb32_blocks(blocks, tasks, width, SPECTRA[MAIN_SPECTRUM])
    progress(f"cart (b): exact merge ({4 * blocks * tasks} SVDs)")
    exact = timed_cart(base, finetuned, "exact")
    progress(f"cart (b): exact {exact['total']:.1f} s; randomized merge")
    rand = timed_cart(base, finetuned, "randomized")
    progress(f"cart (b): randomized {rand['total']:.1f} s")
    setup = (f"{blocks} block(s) of 4 matrices, {tasks} task vectors {MAIN_SPECTRUM} (random orthogonal factors), "
             f"ρ={RHO}; timed once (each SVD ≥ 0.1 s)")
    rows += _merge_rows(label, exact, rand, setup)
    rows += _shape_rows(label, exact, rand)
    ctx.shared["cart_vitb32"] = {
        "width": width, "blocks": blocks, "tasks": tasks,
        "exact_svd_s_per_block_task": exact["svds"] / (blocks * tasks),
        "randomized_svd_s_per_block_task": rand["svds"] / (blocks * tasks),
    }
    progress("cart (b): randomized SVD error by spectrum")
    rows += _spectrum_rows(width, ctx.quick)

    progress("cart: distributed_cart with 1 worker, then 2 (zoo exact; ViT-B/32 shapes randomized)"
             + ("" if ctx.quick else "; Ray restarted with 1 CPU, then 2"))
    cases = [(f"{zoo_label}, {len(zoo_exact['job_s'])} tiny SVDs", zoo_base, zoo_ft, "exact", repeats),
             (label, base, finetuned, "randomized", 1)]
    dist = _distributed_rows(cases, {cases[0][0]: zoo_exact, cases[1][0]: rand}, restart=not ctx.quick)
    capacity = ctx.shared.get("capacity", [None])[0]
    for r in dist:
        if capacity is not None:
            r["machine_capacity"] = float(capacity)
    return rows + dist


def _authors_meaning(rows: list[dict]) -> str:
    versus = [r for r in rows if r["benchmark"].startswith("CART exact: raymerge vs") and r["case"].endswith("merge time")]
    precision = [r for r in rows if r["benchmark"].startswith("CART float32 vs float64")]
    text = ""
    if versus:
        text += ("raymerge's exact CART runs " + ", ".join(
            f"{r['ratio']:.2f}× as fast as the authors' float32 loop ({r['case'].split(':')[0]}, {r['gap']}"
            + (f"; {r['validation_s'] / r['measured_s']:.0%} of raymerge's time is input validation"
               if "validation_s" in r else "") + ")" for r in versus)
                 + " on one thread, at the same float32 accuracy: the SVD of a wide matrix's transpose is what it gains "
                 "on ViT-B/32 shapes; on the zoo's tiny matrices its input checks weigh as much as that gain. ")
    if precision:
        worst = max(precision, key=lambda r: r["value"])
        met = sum(r["value"] <= PRECISION_CRITERION for r in precision)
        text += (f"Float32 SVDs keep the merge within {PRECISION_CRITERION:.0e} of float64 (relative, per matrix) in "
                 f"{met} of {len(precision)} cases (worst {worst['value']:.1e}: {worst['case']}), hence float32 by "
                 "default and precision=torch.float64 as the option. ")
    return text


def meaning(rows: list[dict]) -> str:
    vit = [r for r in rows if r["benchmark"] == "CART exact vs randomized SVD" and r["case"].startswith("ViT")]
    spectra = [r for r in rows if r["benchmark"] == "CART randomized SVD error by spectrum"]
    dist = [r for r in rows if r["benchmark"] == "distributed_cart: 2 vs 1 Ray workers" and "local" not in r["case"]]
    text = _authors_meaning(rows)
    if len(vit) > 1:
        text += (f"On ViT-B/32-shaped matrices ({MAIN_SPECTRUM}) the randomized-SVD merge runs {vit[0]['ratio']:.1f}× as "
                 f"fast as the exact one ({vit[0]['gap']}), and its low-rank update differs from the exact one by "
                 f"{vit[1]['value']:.1e} (relative)")
        if spectra:
            text += "; on one matrix the error is " + ", ".join(f"{r['value']:.0e} for {r['case'].split(', ')[-1]}"
                                                               for r in spectra)
        text += (": the randomized SVD is accurate when the spectrum has decayed well within the kept rank k and "
                 "loses accuracy as the decay slows, so check a real model's spectrum before switching. ")
    if dist:
        text += (f"Two Ray workers give {' and '.join(format(r['ratio'], '.2f') + '×' for r in dist)} "
                 "(zoo, ViT-B/32 shapes) against an ideal 2×"
                 + (f", while two plain processes got {dist[0]['machine_capacity']:.2f}× on this machine at the start "
                    "of the run" if "machine_capacity" in dist[0] else "")
                 + ". The zoo's 128 tiny SVDs carry Ray's per-task overhead (one worker runs at "
                 + ", ".join(format(r["ratio"], ".2f") + "×" for r in rows if r["case"].endswith("1 worker vs local cart()"))
                 + " the speed of the local merge), and the second core is shared with other users.")
    return text
