"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces (Marczak et al. 2025,
arXiv 2502.04959; docs/METHODS.md "Iso-C", "Iso-CTS").

Per matrix l (an m × n block, r = min(m, n)), with task matrices Δt = θt,l − θ0,l:

Iso-C::

    (ISO-C)  ΔTA = Σt Δt = U Σ Vᵀ,   σ̄ = (1/r) Σi σi,   Δ = σ̄ U Vᵀ,   θl = θ0,l + λ Δ

Iso-CTS::

    (ISO-CTS-1)  Uc, Σc, Vc = the top kc singular triplets of ΔTA
    (ISO-CTS-2)  per task: the top s triplets of (I − Uc Ucᵀ) Δt
    (ISO-CTS-3)  U = polar([U1 … UT Uc]),  V = polar([V1 … VT Vc]),  Δ = σ̄ U Vᵀ (σ̄ the mean of all kept singular
                 values),  θl = θ0,l + λ Δ
    (ISO-CTS-4)  the sizes kc and s: :func:`iso_cts_dims`

Every other floating tensor gets θ0 + λ·(1/T) Σt τt.

Details the paper leaves open, settled as the released code (danielm1405/iso-merging ``src/utils/iso.py``, copied
into FusionBench's ``isotropic_merging/iso_utils.py``):

- matrices: every 2-D tensor except ``text_projection`` (:data:`raymerge.lowrank.ALL_MATRICES`); other tensors are
  merged with the *mean* of the task vectors (Iso-C's code takes the mean of all tensors and multiplies the matrices
  back by T before the SVD; Iso-CTS's keeps a running mean), not the sum;
- σ̄ is the mean over all r singular values of ΔTA (Iso-C), and over the concatenation of the kept common and
  task-specific singular values (Iso-CTS);
- the subspace sizes (:func:`iso_cts_dims`): kc0 = ⌊r · common_space_fraction⌋ (default 0.8), s = round((r − kc0) / T)
  (Python's round, half to even), kc = r − T·s, so that the T task-specific subspaces have equal sizes and the
  combined basis has r columns. raymerge caps s at ⌊r / T⌋ where round((r − kc0) / T)·T would exceed r (small
  matrices, many tasks), for which the code computes a negative kc;
- the projection (I − Uc Ucᵀ) Δt is computed as Δt − Uc (Ucᵀ Δt), without forming the m × m projector;
- orthogonalization by the polar factor from an SVD, task-specific columns first, then the common ones (the order
  does not change the product);
- α (``lam``) multiplies the whole merged task vector; the code picks it on validation data, FusionBench's default
  is 1.0.

With ``qkv="split"`` the fused 3d × d ``attn.in_proj_weight`` is decomposed as q, k and v (the layout of the Hugging
Face checkpoints FusionBench merges); the released code, on open_clip, decomposes it whole (``"fused"``).

Jobs (:mod:`raymerge.lowrank`): Iso-C one :func:`iso_c_job` per block; Iso-CTS one :func:`iso_cts_common_job` per
block, one :func:`iso_cts_task_job` per (block, task) on its result, one :func:`iso_cts_merge_job` per block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from raymerge._arith import check_real, dtypes_of, floor_fraction
from raymerge.lowrank import (
    ORIGIN,
    Block,
    LowRankPlan,
    LowRankRule,
    Operand,
    Output,
    RuleLike,
    SvdJob,
    Triplets,
    assemble,
    polar,
    run_jobs,
    sources_of,
    svd,
    task_sum,
    task_vector_plan_parts,
    top_triplets,
)
from raymerge.statedict import StateDict


def iso_c_job(theta0: torch.Tensor, *thetas: torch.Tensor) -> torch.Tensor:
    """Iso-C, per block: σ̄ U Vᵀ of the summed task matrices Σt (θt − θ0) (m × n, θ0's dtype)."""
    u, s, vh = svd(task_sum(theta0, thetas))
    # ISO-C: Δ = σ̄ U Vᵀ, σ̄ the mean singular value of ΔTA = Σt Δt
    return s.mean() * (u @ vh)


def check_common_space_fraction(fraction: float) -> float:
    """``fraction`` as a float; ``ValueError`` naming the value unless it lies in [0, 1]."""
    value = check_real("common_space_fraction", fraction)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {fraction!r}")
    return value


def iso_cts_dims(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(kc, s): the common subspace's size and each task's, for a rank-``rank`` matrix and ``tasks`` tasks.

    kc + T·s = rank. As the released code: kc0 = ⌊rank · fraction⌋, s = round((rank − kc0) / T), kc = rank − T·s;
    s is capped at ⌊rank / T⌋ so that kc ≥ 0. fraction = 1 gives s = 0 (Iso-CTS is then Iso-C).
    """
    common = floor_fraction(common_space_fraction, rank)
    # ISO-CTS-4: s = min(round((r − kc0) / T), ⌊r / T⌋), kc = r − T·s
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - tasks * per_task, per_task


def iso_cts_common_job(common: int, theta0: torch.Tensor, *thetas: torch.Tensor) -> Triplets:
    """Iso-CTS stage 1, per block: the top ``common`` singular triplets of Σt (θt − θ0)."""
    # ISO-CTS-1: the common subspace, the top kc singular triplets of ΔTA = Σt Δt
    return top_triplets(task_sum(theta0, thetas), common)


def iso_cts_task_job(per_task: int, theta_t: torch.Tensor, theta0: torch.Tensor, common: Triplets) -> Triplets:
    """Iso-CTS stage 2, per (block, task): the top ``per_task`` singular triplets of Δt outside the common subspace."""
    tau = theta_t.to(theta0.dtype) - theta0
    # ISO-CTS-2: the task-specific residual (I − Uc Ucᵀ) Δt
    residual = tau - common.u @ (common.u.mT @ tau)
    return top_triplets(residual, per_task)


def iso_cts_merge_job(common: Triplets, *task_specific: Triplets) -> torch.Tensor:
    """Iso-CTS stage 3, per block: σ̄ polar(U) polar(Vᵀ) over the task-specific and common triplets (m × n)."""
    parts = [*task_specific, common]
    u = torch.cat([p.u for p in parts], dim=1)
    s = torch.cat([p.s for p in parts])
    vh = torch.cat([p.vh for p in parts], dim=0)
    # ISO-CTS-3: Δ = σ̄ U⊥ V⊥ᵀ with the orthogonalized combined bases and the mean of the kept singular values
    return s.mean() * (polar(u) @ polar(vh))


def _plan(
    method: str,
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    qkv: str,
    rule: LowRankRule | RuleLike | None,
    names: Sequence[str] | None,
    precision: torch.dtype,
    block_jobs: Callable[[Block, int], list[SvdJob]],
) -> LowRankPlan:
    theta0, blocks, dense = task_vector_plan_parts(method, base, finetuned, rule, qkv, names, precision)
    jobs, outputs = [], {}
    for parts in blocks.values():
        for block in parts:
            listed = block_jobs(block, len(finetuned))  # the last job's result is the block's Δ
            jobs += listed
            outputs[block] = (listed[-1].name,)
    return LowRankPlan(method, theta0, dense, blocks, tuple(jobs), outputs, sources_of(theta0, finetuned),
                       dtypes_of(base))


def _all_tasks(block: Block, tasks: int) -> tuple[Operand, ...]:
    return (Operand(ORIGIN, block), *(Operand(t, block) for t in range(tasks)))


def plan_iso_c(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> LowRankPlan:
    """Validate, compute θ0 and the mean task vector of the non-matrix tensors, and list one job per block."""

    def block_jobs(block: Block, tasks: int) -> list[SvdJob]:
        return [SvdJob(("iso_c", block.label), iso_c_job, _all_tasks(block, tasks))]

    return _plan("iso_c", base, finetuned, qkv, rule, names, precision, block_jobs)


def plan_iso_cts(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    common_space_fraction: float = 0.8,
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> LowRankPlan:
    """Validate, compute θ0 and the mean task vector of the non-matrix tensors, and list the three stages' jobs."""
    fraction = check_common_space_fraction(common_space_fraction)

    def block_jobs(block: Block, tasks: int) -> list[SvdJob]:
        common, per_task = iso_cts_dims(min(block.shape), tasks, fraction)
        first = SvdJob(("iso_cts.common", block.label), iso_cts_common_job, (common, *_all_tasks(block, tasks)))
        specific = [
            SvdJob(("iso_cts.task", block.label, t), iso_cts_task_job,
                   (per_task, Operand(t, block), Operand(ORIGIN, block), Output(first.name)))
            for t in range(tasks) if per_task > 0
        ]
        last = SvdJob(("iso_cts", block.label), iso_cts_merge_job,
                      (Output(first.name), *(Output(job.name) for job in specific)))
        return [first, *specific, last]

    return _plan("iso_cts", base, finetuned, qkv, rule, names, precision, block_jobs)


def iso_c(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """Iso-C merge ``θ0 + λ·Δ`` of T ≥ 1 fine-tuned state dicts (module docstring; docs/METHODS.md "Iso-C").

    Arguments as :func:`raymerge.tsv.tsv_merge` (``lam`` α, ``qkv``, the matrix ``rule``, ``names``, ``precision``).
    """
    check_real("lam", lam)
    plan = plan_iso_c(base, finetuned, qkv, rule=rule, names=names, precision=precision)
    return assemble(plan, run_jobs(plan), lam)


def iso_cts(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    common_space_fraction: float = 0.8,
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """Iso-CTS merge ``θ0 + λ·Δ`` of T ≥ 1 fine-tuned state dicts (module docstring; docs/METHODS.md "Iso-CTS").

    ``common_space_fraction`` in [0, 1] (default 0.8, the released configs): the share of each matrix's rank given
    to the common subspace (:func:`iso_cts_dims`); 1 gives Iso-C. Other arguments as :func:`iso_c`.
    """
    check_real("lam", lam)
    plan = plan_iso_cts(base, finetuned, common_space_fraction, qkv, rule=rule, names=names, precision=precision)
    return assemble(plan, run_jobs(plan), lam)
