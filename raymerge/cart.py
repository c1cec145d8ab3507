"""CART: centered arithmetic with rank-reduced task vectors (docs/METHODS.md "CART", cart-2025.md Eq. 3–4).

    θavg = (1/T) Σt θt,   τ̄t = θt − θavg,   θl = θavg,l + λ Σt SVDk(τ̄t,l),   k = max(1, ⌊ρ·min(m, n)⌋)

on the m × n weight matrices a :class:`~raymerge.lowrank.LowRankRule` selects (each of q, k, v on its own with
``qkv="split"``); every other tensor is θavg (its centered vectors sum to zero).

The computation follows :mod:`raymerge.lowrank`'s plan → jobs → assemble split, so a distributed driver
(:func:`raymerge.workers.distributed_cart`) runs the same jobs anywhere and gets the same bits:

1. :func:`plan_cart` validates, computes θavg and lists one :func:`cart_job` per (block, task);
2. each job returns the rank-k :class:`~raymerge.lowrank.Factors` of its centered block (CART++ reuses them);
3. :func:`~raymerge.lowrank.assemble` adds ``λ Σt`` of the approximations to θavg.

:func:`cart` is exactly plan → :func:`~raymerge.lowrank.run_jobs` → assemble in one process.

Where the released code (JH-GEECS/CART) differs: it runs every SVD in float32 on the whole matrix; raymerge runs them
in the compute ``precision`` (float32 by default, measured within 1e-6 of float64: docs/METHODS.md), decomposes a
wide matrix as its transpose (the cheaper orientation), and sums the T approximations of a block as one product of
the concatenated factors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from raymerge._arith import average, check_real, dtypes_of, floor_fraction, per_key, validate_with_base
from raymerge.lowrank import (  # noqa: F401  (re-exported: CART's public names)
    DEFAULT_LOW_RANK_PATTERNS,
    ORIGIN,
    RANDOMIZED_MIN_OVERSAMPLING,
    RANDOMIZED_POWER_ITERATIONS,
    SVD_METHODS,
    SVD_THREADS,
    Factors,
    LowRankPlan,
    LowRankRule,
    Operand,
    RuleLike,
    SvdJob,
    assemble,
    check_qkv,
    check_svd,
    low_rank_approx,
    low_rank_factors,
    matrix_blocks,
    run_jobs,
    select_matrices,
    sources_of,
)
from raymerge.statedict import StateDict


def check_rank_ratio(rank_ratio: float) -> float:
    """``rank_ratio`` as a float; ``ValueError`` naming the value unless it lies in [0, 1]."""
    value = check_real("rank_ratio", rank_ratio)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"rank_ratio must be in [0, 1], got {rank_ratio!r}")
    return value


def rank_for(shape: Sequence[int], rank_ratio: float) -> int:
    """The rank k kept of an m × n matrix: 0 when ``rank_ratio`` ρ is 0 (no low-rank term), else max(1, ⌊ρ·min(m, n)⌋).

    ρ = 0 is the left endpoint of the rank sweep (CART then returns θavg exactly); the paper's ``max(1, ·)`` applies
    to every ρ > 0, so a tiny ratio still keeps the top singular triplet. ``ρ·min(m, n)`` is floored on the decimal
    value of ρ (0.29 of 100 is 29).
    """
    if rank_ratio == 0:
        return 0
    # CART §2: k = max(1, ⌊ρ · min(m, n)⌋)
    return max(1, floor_fraction(rank_ratio, min(shape)))


def select_low_rank(
    sd: Mapping[str, torch.Tensor], rank_ratio: float, rule: LowRankRule | RuleLike | None = None
) -> dict[str, int]:
    """``{key: k}`` for the matrices of ``sd`` that ``rule`` (default :class:`LowRankRule`) selects, in ``sd``'s order,
    k from the whole matrix's shape (:func:`rank_for`; a q, k or v block of a 3d × d projection gets the same k).

    Raises ``ValueError`` naming the key when a rule selects anything but a floating 2-D tensor.
    """
    selected = select_matrices(sd, LowRankRule() if rule is None else rule)
    return {key: rank_for(sd[key].shape, rank_ratio) for key in selected}


def job_seed(seed: int, label: str, task_index: int) -> int:
    """A 63-bit seed for one (block, task) SVD: a hash of the merge seed, the block's label (its key, or ``key[q]``
    for a part) and the task index. Independent of the order in which jobs run and of any global RNG state.
    """
    digest = hashlib.sha256(f"{seed}\0{label}\0{task_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def cart_job(theta_t: torch.Tensor, theta_avg: torch.Tensor, k: int, svd: str, seed: int) -> Factors:
    """One CART job: the rank-``k`` :class:`Factors` of the centered block τ̄t = θt − θavg (m × n), in θavg's dtype.

    ``theta_t`` in its checkpoint dtype, ``theta_avg`` in the compute precision; ``svd`` and ``seed`` as in
    :func:`raymerge.lowrank.top_triplets`.
    """
    # CART-1 (cart-2025.md Eq. 3): centered task vector τ̄t = θt − θavg
    centered = theta_t.to(theta_avg.dtype) - theta_avg
    return low_rank_factors(centered, k, svd, seed)


def plan_cart(
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rank_ratio: float = 0.08,
    svd: str = "exact",
    seed: int = 0,
    rule: LowRankRule | RuleLike | None = None,
    *,
    qkv: str = "fused",
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> LowRankPlan:
    """Step 1 of CART: validate, compute θavg (the plan's ``origin``) and list one :func:`cart_job` per (block, task),
    ordered by key (state-dict order), block, then task. A block whose k is 0 (ρ = 0) gets no jobs and stays θavg.
    Arguments as for :func:`cart`."""
    rank_ratio = check_rank_ratio(rank_ratio)
    check_svd(svd)
    check_qkv(qkv)
    validate_with_base("cart", base, finetuned, names, min_finetuned=2)
    keys = select_matrices(finetuned[0], LowRankRule() if rule is None else rule)
    blocks = {
        key: parts
        for key, parts in matrix_blocks(finetuned[0], keys, qkv).items()
        if rank_for(parts[0].shape, rank_ratio) > 0
    }
    theta_avg = per_key(finetuned, lambda key, tensors: average(tensors), precision)
    jobs, outputs = [], {}
    for parts in blocks.values():
        for block in parts:
            k = rank_for(block.shape, rank_ratio)
            names_of_block = []
            for t in range(len(finetuned)):
                name = ("cart", block.label, t)
                args = (Operand(t, block), Operand(ORIGIN, block), k, svd, job_seed(seed, block.label, t))
                jobs.append(SvdJob(name, cart_job, args))
                names_of_block.append(name)
            outputs[block] = tuple(names_of_block)
    return LowRankPlan(
        method="cart",
        origin=theta_avg,
        dense={},
        blocks=blocks,
        jobs=tuple(jobs),
        outputs=outputs,
        sources=sources_of(theta_avg, finetuned),
        out_dtypes=dtypes_of(finetuned[0]),
    )


def cart(
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rank_ratio: float = 0.08,
    lam: float = 1.0,
    svd: str = "exact",
    seed: int = 0,
    rule: LowRankRule | RuleLike | None = None,
    *,
    qkv: str = "fused",
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """CART merge of T ≥ 2 fine-tuned state dicts (docs/METHODS.md "CART", cart-2025.md Eq. 4).

    ``base``: the pre-trained weights, only validated against the fine-tuned ones (CART centers on θavg, not θ0);
    ``None`` skips that check. ``rank_ratio`` ρ in [0, 1], the fraction of ``min(m, n)`` kept per matrix
    (:func:`rank_for`); ``lam`` λ any finite real (paper: ρ = 0.08, λ = 1; released ViT-B/32 configs: ρ = 0.12,
    λ = 2.0 for 8 tasks). ``svd``: ``"exact"`` or ``"randomized"`` (:func:`raymerge.lowrank.top_triplets`), ``seed``
    seeding the latter per (block, task). ``rule`` picks the matrices to rank-reduce (default :class:`LowRankRule`).
    ``qkv``: ``"fused"`` decomposes open_clip's 3d × d ``attn.in_proj_weight`` as one matrix (the released code),
    ``"split"`` as three d × d matrices q, k, v (each keeping k = ⌊ρ·d⌋); ``"split"`` on a model without fused
    attention weights is a ``ValueError``. ``names`` label the fine-tuned models in error messages. Arithmetic,
    SVDs included, runs in ``precision`` (float32 or float64); the result has the checkpoints' dtypes.

    Endpoints: ρ = 0 returns θavg exactly (no low-rank term). ρ = 1 returns θavg up to float rounding for *every*
    λ, since a full-rank SVD reproduces each τ̄t and the τ̄t sum to zero; so it equals ``weight_average(finetuned)``.

    Memory: besides θavg, the rank-k factors of every (block, task) are held until assembly (k·(m + n) numbers each).
    """
    check_real("lam", lam)
    plan = plan_cart(base, finetuned, rank_ratio, svd, seed, rule, qkv=qkv, names=names, precision=precision)
    return assemble(plan, run_jobs(plan), lam)
