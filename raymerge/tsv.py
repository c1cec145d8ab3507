"""TSV-M: task singular vectors merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081; docs/METHODS.md "TSV-M").

Per matrix l (an m × n block, r = min(m, n)), with task matrices Δt = θt,l − θ0,l and k = ⌊r / T⌋:

    (TSV-1)  Δt ≈ Ut,k Σt,k Vt,kᵀ                      the top k singular triplets of each task matrix
    (TSV-2)  U = [U1,k … UT,k],  Σ = diag(Σ1,k … ΣT,k),  V = [V1,k … VT,k],  U⊥ = polar(U),  V⊥ = polar(V)
    (TSV-3)  Δ = U⊥ Σ V⊥ᵀ,   θl = θ0,l + λ Δ

Every other floating tensor gets θ0 + λ·(1/T) Σt τt.

Details the paper leaves open, settled as the released code (AntoAndGar/task_singular_vectors,
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``, copied into FusionBench and danielm1405/iso-merging):

- matrices: every 2-D tensor except ``text_projection`` (:data:`raymerge.lowrank.ALL_MATRICES`), so in an open_clip
  ViT also ``positional_embedding`` and ``proj``; ``conv1`` (4-D), biases, LayerNorms and ``class_embedding`` are
  merged with the *mean* of the task vectors (the code's running mean);
- k = ⌊r · (1/T)⌋, computed here as the exact integer ⌊r / T⌋; the code writes the T·k kept vectors into an
  r-column zero matrix before orthogonalizing, which gives the same product as orthogonalizing the T·k columns
  alone (the zero columns meet zero singular values);
- orthogonalization by the polar factor from an SVD (the code's ``u_u @ v_u``), not by QR or Gram–Schmidt;
- α (``lam`` here) multiplies the whole merged task vector; the code picks it on validation data, FusionBench's
  default is 1.0.

With ``qkv="split"`` the fused 3d × d ``attn.in_proj_weight`` is decomposed as q, k and v (the layout of the Hugging
Face checkpoints FusionBench merges); the released code, on open_clip, decomposes it whole (``"fused"``).

Jobs (:mod:`raymerge.lowrank`): one :func:`tsv_task_job` per (block, task), then one :func:`tsv_merge_job` per
block on their results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from raymerge._arith import check_real, dtypes_of
from raymerge.lowrank import (
    ORIGIN,
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
    task_vector_plan_parts,
    top_triplets,
)
from raymerge.statedict import StateDict


def tsv_rank(shape: Sequence[int], tasks: int, label: str) -> int:
    """k = ⌊min(m, n) / T⌋ singular triplets kept per task; ``ValueError`` naming the matrix when that is 0."""
    rank = min(shape)
    # TSV-1: k = ⌊r / T⌋
    k = rank // tasks
    if k == 0:
        raise ValueError(f"TSV-M keeps ⌊r/T⌋ singular vectors per task, but {label!r} has rank r = {rank} < T = {tasks}")
    return k


def tsv_task_job(theta_t: torch.Tensor, theta0: torch.Tensor, k: int) -> Triplets:
    """Stage 1, per (block, task): the top ``k`` singular triplets of Δt = θt − θ0, in θ0's dtype."""
    # TSV-1: Δt = θt − θ0 truncated to its top k singular triplets
    return top_triplets(theta_t.to(theta0.dtype) - theta0, k)


def tsv_merge_job(*triplets: Triplets) -> torch.Tensor:
    """Stage 2, per block: Δ = polar(U) Σ polar(Vᵀ) over the T tasks' kept triplets (m × n)."""
    u = torch.cat([t.u for t in triplets], dim=1)
    s = torch.cat([t.s for t in triplets])
    vh = torch.cat([t.vh for t in triplets], dim=0)
    # TSV-2, TSV-3: Δ = U⊥ Σ V⊥ᵀ with U⊥, V⊥ the orthogonal polar factors of the concatenated U and V
    return (polar(u) * s) @ polar(vh)


def plan_tsv_merge(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> LowRankPlan:
    """Validate, compute θ0 and the mean task vector of the non-matrix tensors, and list the jobs (see the module)."""
    theta0, blocks, dense = task_vector_plan_parts("tsv_merge", base, finetuned, rule, qkv, names, precision)
    jobs, outputs = [], {}
    for parts in blocks.values():
        for block in parts:
            k = tsv_rank(block.shape, len(finetuned), block.label)
            stage1 = [("tsv.task", block.label, t) for t in range(len(finetuned))]
            jobs += [SvdJob(name, tsv_task_job, (Operand(t, block), Operand(ORIGIN, block), k))
                     for t, name in enumerate(stage1)]
            jobs.append(SvdJob(("tsv", block.label), tsv_merge_job, tuple(Output(name) for name in stage1)))
            outputs[block] = (("tsv", block.label),)
    return LowRankPlan("tsv_merge", theta0, dense, blocks, tuple(jobs), outputs, sources_of(theta0, finetuned),
                       dtypes_of(base))


def tsv_merge(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    qkv: str = "fused",
    *,
    rule: LowRankRule | RuleLike | None = None,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """TSV-M merge ``θ0 + λ·Δ`` of T ≥ 1 fine-tuned state dicts (module docstring; docs/METHODS.md "TSV-M").

    ``lam`` α any finite real (1.0: FusionBench's default; the paper picks it on validation data). ``qkv``:
    ``"fused"`` or ``"split"`` (:func:`raymerge.lowrank.matrix_blocks`). ``rule``: the matrices (default every 2-D
    tensor but ``text_projection``, as the released code). Arithmetic, SVDs included, runs in ``precision``; the
    result has the checkpoints' dtypes. ``ValueError`` when a matrix has fewer rows or columns than there are tasks.
    """
    check_real("lam", lam)
    plan = plan_tsv_merge(base, finetuned, qkv, rule=rule, names=names, precision=precision)
    return assemble(plan, run_jobs(plan), lam)
