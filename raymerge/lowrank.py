"""What the low-rank merges (CART, TSV-M, Iso-C, Iso-CTS, low-rank task arithmetic) share (docs/METHODS.md).

- Which tensors are matrices: a :class:`LowRankRule`, and the attention layout ``qkv``: open_clip fuses the query,
  key and value projections into one 3d × d ``attn.in_proj_weight``; ``qkv="split"`` treats it as three d × d
  :class:`Block` s (q, k, v), each decomposed on its own, and concatenates the results back.
- The SVD kernels, deterministic and in the cheaper orientation: :func:`svd`, :func:`top_triplets`,
  :func:`low_rank_factors`, :func:`low_rank_approx`, :func:`polar`.
- The plan → jobs → assemble split every method follows, so that :mod:`raymerge.workers` can run the same jobs as
  Ray tasks and get the local result bit for bit: a :class:`LowRankPlan` lists independent :class:`SvdJob` s (pure
  module-level functions of matrix blocks and of earlier jobs' results), :func:`run_jobs` runs them here,
  :func:`assemble` adds ``λ ·`` their per-block updates to the plan's origin.

Precision: every SVD runs in the plan's compute precision (``precision=torch.float32`` by default, as the released
CART, TSV and Iso code do; ``torch.float64`` on request). Measured on CART (bench/cart.py and docs/METHODS.md
"Precision of the SVDs"): the float32 merge stays within 1e-6 (relative, per matrix) of the float64 one on the
embedded zoo's task vectors and on ViT-B/32-shaped matrices, at about half the time of a float64 SVD.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from raymerge._arith import cast_to, check_real, per_key, validate_with_base
from raymerge.statedict import StateDict

QKV_MODES = ("fused", "split")
SVD_METHODS = ("exact", "randomized")

# Randomized SVD (Halko et al. 2009, Alg. 4.4/5.1, as torch.svd_lowrank implements it): a sketch of q = k + max(k, 10)
# columns and 4 power iterations. Task-vector spectra decay slowly, so oversampling by k (rather than Halko's usual
# 5-10) and a few power iterations are what keep the top-k subspace close to the exact one. Measured on a 3072 × 768
# matrix with k = 61: relative difference from the exact rank-k approximation 4e-9 for σi = 0.97^i, 6e-5 for
# σi ∝ 1/i, 1e-2 for σi ∝ 1/√i, in about half the time of an exact SVD.
RANDOMIZED_MIN_OVERSAMPLING = 10
RANDOMIZED_POWER_ITERATIONS = 4

# LAPACK/BLAS (MKL here) block and reduce differently with different thread counts, which changes the last bits of an
# SVD or a product. Every job runs on this many threads so a Ray worker and the driver agree bit for bit; parallelism
# comes from running many jobs at once instead.
SVD_THREADS = 1

_BLOCK = r"(visual\.)?transformer\.resblocks\.\d+\."
DEFAULT_LOW_RANK_PATTERNS = (
    _BLOCK + r"attn\.in_proj_weight",
    _BLOCK + r"attn\.out_proj\.weight",
    _BLOCK + r"mlp\.c_fc\.weight",
    _BLOCK + r"mlp\.c_proj\.weight",
)
# The TSV and Iso code treat every 2-D tensor as a matrix except the text tower's output projection.
ALL_MATRIX_PATTERNS = (r"(?!.*text_projection).*",)
FUSED_QKV_SUFFIX = "in_proj_weight"

RuleLike = Callable[[str, torch.Tensor], bool]


@dataclass(frozen=True)
class LowRankRule:
    """Which tensors a low-rank merge treats as matrices: floating 2-D tensors whose key fully matches a pattern.

    The default follows the released CART code on open_clip ViTs: per residual block, the attention input projection
    (``attn.in_proj_weight``, 3d × d), ``attn.out_proj.weight``, ``mlp.c_fc.weight`` and ``mlp.c_proj.weight``,
    with or without a ``visual.`` prefix (in a full CLIP state dict the unprefixed keys are the text tower's blocks,
    which the default therefore selects too). Biases, LayerNorms, embeddings, ``conv1`` and ``proj`` are not
    selected. :data:`ALL_MATRICES` is the TSV-M / Iso rule.

    Pass ``LowRankRule(patterns=(...))`` with your own regular expressions, or any ``(key, tensor) -> bool`` callable,
    wherever a ``rule`` is accepted.
    """

    patterns: tuple[str, ...] = DEFAULT_LOW_RANK_PATTERNS

    def __post_init__(self) -> None:
        if isinstance(self.patterns, str):
            raise TypeError("patterns must be a sequence of regular expressions, not one string")
        for pattern in self.patterns:
            re.compile(pattern)

    def __call__(self, key: str, tensor: torch.Tensor) -> bool:
        return (
            tensor.ndim == 2
            and tensor.is_floating_point()
            and any(re.fullmatch(pattern, key) for pattern in self.patterns)
        )


ALL_MATRICES = LowRankRule(ALL_MATRIX_PATTERNS)


def check_qkv(qkv: str) -> str:
    """``ValueError`` naming ``qkv`` unless it is one of :data:`QKV_MODES`."""
    if qkv not in QKV_MODES:
        raise ValueError(f"unknown qkv {qkv!r}: expected one of {', '.join(map(repr, QKV_MODES))}")
    return qkv


def check_svd(svd: str) -> None:
    """``ValueError`` naming ``svd`` unless it is one of :data:`SVD_METHODS`."""
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}: expected one of {', '.join(map(repr, SVD_METHODS))}")


def select_matrices(sd: Mapping[str, torch.Tensor], rule: LowRankRule | RuleLike) -> list[str]:
    """The keys of ``sd`` that ``rule`` selects, in ``sd``'s order.

    Raises ``ValueError`` naming the key when a rule selects anything but a floating 2-D tensor.
    """
    keys = []
    for key, tensor in sd.items():
        if not rule(key, tensor):
            continue
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise ValueError(
                f"the low-rank rule selected {key!r} of shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                "but only floating 2-D matrices can be rank-reduced"
            )
        keys.append(key)
    return keys


# --- matrices and their blocks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of the m × ``cols`` matrix ``key``: the whole matrix, or one of q, k, v (``part`` 0, 1,
    2) of a fused attention projection under ``qkv="split"``."""

    key: str
    part: int | None
    start: int
    stop: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.cols)

    @property
    def label(self) -> str:
        """``key``, or ``key[q]`` / ``key[k]`` / ``key[v]`` for a part."""
        return self.key if self.part is None else f"{self.key}[{'qkv'[self.part]}]"

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This block's rows of the full tensor (a view)."""
        return tensor if self.part is None else tensor[self.start : self.stop]


def is_fused_qkv(key: str, tensor: torch.Tensor) -> bool:
    """Whether ``key`` is a fused q/k/v projection (``…in_proj_weight``, 3d × d, as open_clip and ``nn.MultiheadAttention``
    store it); ``ValueError`` naming the key when its rows do not split into three."""
    if not key.endswith(FUSED_QKV_SUFFIX) or tensor.ndim != 2:
        return False
    if tensor.shape[0] % 3:
        raise ValueError(f"{key!r} of shape {tuple(tensor.shape)} is not a fused q/k/v projection: its rows do not split in three")
    return True


def matrix_blocks(sd: Mapping[str, torch.Tensor], keys: Sequence[str], qkv: str) -> dict[str, tuple[Block, ...]]:
    """``{key: its blocks in row order}`` for the matrices ``keys`` of ``sd``.

    ``qkv="fused"``: one block per matrix. ``qkv="split"``: a fused attention projection (:func:`is_fused_qkv`) gives
    three d × d blocks q, k, v; other matrices stay whole. ``ValueError`` for an unknown ``qkv``, and for ``"split"``
    when none of ``keys`` is a fused projection (the model stores q, k and v separately already, or the rule does not
    select them): splitting would silently change nothing.
    """
    check_qkv(qkv)
    blocks = {}
    for key in keys:
        rows, cols = sd[key].shape
        if qkv == "split" and is_fused_qkv(key, sd[key]):
            d = rows // 3
            blocks[key] = tuple(Block(key, part, part * d, (part + 1) * d, cols) for part in range(3))
        else:
            blocks[key] = (Block(key, None, 0, rows, cols),)
    if qkv == "split" and not any(len(b) == 3 for b in blocks.values()):
        raise ValueError(
            f"qkv='split' splits fused attention projections ('…{FUSED_QKV_SUFFIX}', 3d × d) into q, k and v, but none "
            f"of the {len(keys)} matrices selected for low rank is one: the model has no fused attention weights "
            "(Hugging Face checkpoints store q_proj, k_proj and v_proj apart) or the rule leaves them out; use qkv='fused'"
        )
    return blocks


# --- the SVD kernels ------------------------------------------------------------------------------------------------


@contextmanager
def fixed_threads(n: int = SVD_THREADS) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (process-wide: not safe against other Python threads using torch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Triplets(NamedTuple):
    """Singular triplets of an m × n matrix: ``u`` (m, k), ``s`` (k,) descending, ``vh`` (k, n)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


class Factors(NamedTuple):
    """A rank-k matrix as ``left @ right``: ``left`` (m, k) = U_k diag(σ_k), ``right`` (k, n) = V_kᵀ."""

    left: torch.Tensor
    right: torch.Tensor


def svd(matrix: torch.Tensor) -> Triplets:
    """Thin SVD of an m × n matrix, in its dtype, all min(m, n) triplets.

    A wide matrix (m < n) is decomposed as its transpose, which LAPACK's divide-and-conquer SVD does in about half
    the time here (768 × 3072: 0.41 s direct, 0.23 s transposed, float32, one thread), then swapped back. The input
    is copied into a fresh buffer first, so its memory alignment (e.g. an object-store array) cannot change MKL's path.
    """
    wide = matrix.shape[0] < matrix.shape[1]
    a = (matrix.mT if wide else matrix).clone(memory_format=torch.contiguous_format)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return Triplets(vh.mT, s, u.mT) if wide else Triplets(u, s, vh)


def top_triplets(matrix: torch.Tensor, k: int, svd_method: str = "exact", seed: int = 0) -> Triplets:
    """The top ``k`` singular triplets of an m × n ``matrix``, in its dtype, contiguous (no view of a larger SVD).

    ``k`` in ``[0, min(m, n)]``. ``svd_method="exact"``: :func:`svd` (``torch.linalg.svd``, as the released code);
    ``"randomized"``: ``torch.svd_lowrank`` with ``k + max(k, RANDOMIZED_MIN_OVERSAMPLING)`` sketch columns (at most
    ``min(m, n)``) and ``RANDOMIZED_POWER_ITERATIONS`` power iterations, its random sketch drawn from ``seed`` under
    a forked RNG, so the caller's global RNG is neither read nor advanced.
    """
    if matrix.ndim != 2:
        raise ValueError(f"a low-rank approximation needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    check_svd(svd_method)
    full_rank = min(matrix.shape)
    if not 0 <= k <= full_rank:
        raise ValueError(f"k must be in [0, {full_rank}] for a {tuple(matrix.shape)} matrix, got {k}")
    if svd_method == "exact":
        u, s, vh = svd(matrix)
    else:
        a = matrix.clone(memory_format=torch.contiguous_format)
        devices = [a.device] if a.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(
                a, q=min(k + max(k, RANDOMIZED_MIN_OVERSAMPLING), full_rank), niter=RANDOMIZED_POWER_ITERATIONS
            )
        vh = v.mH
    return Triplets(u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous())


def low_rank_factors(matrix: torch.Tensor, k: int, svd_method: str = "exact", seed: int = 0) -> Factors:
    """The best rank-``k`` approximation of ``matrix`` as :class:`Factors` (arguments as :func:`top_triplets`)."""
    u, s, vh = top_triplets(matrix, k, svd_method, seed)
    # CART-2 (cart-2025.md Eq. 4): SVD_k(A) = Σ_{i≤k} σi ui viᵀ, kept as (U_k diag σ_k) · V_kᵀ
    return Factors(u * s, vh)


def low_rank_approx(matrix: torch.Tensor, k: int, svd: str = "exact", seed: int = 0) -> torch.Tensor:
    """The best rank-``k`` approximation ``Σ_{i≤k} σi ui viᵀ`` of an m × n ``matrix``, same shape and dtype.

    Computed in ``matrix``'s dtype (pass float64 for a float64 SVD) on :data:`SVD_THREADS` threads, so equal inputs
    give bit-identical outputs whatever the caller's thread count or process (same CPU type and torch build).
    ``k = 0`` gives zeros. ``svd`` and ``seed`` as in :func:`top_triplets`.
    """
    with fixed_threads():
        left, right = low_rank_factors(matrix, k, svd, seed)
        return left @ right


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of an m × p matrix A = P S Qᵀ (its nearest matrix with orthonormal columns,
    or rows when p > m), via :func:`svd`."""
    u, _, vh = svd(matrix)
    return u @ vh


# --- plans, jobs and assembly ---------------------------------------------------------------------------------------

Source = Union[str, int]  # "origin", or the index t of a fine-tuned model
JobName = Hashable
ORIGIN: Source = "origin"


@dataclass(frozen=True)
class Operand:
    """A job argument: ``block`` of source ``source``'s tensor (the plan's ``sources[source]``)."""

    source: Source
    block: Block


@dataclass(frozen=True)
class Output:
    """A job argument: the result of the earlier job ``name``."""

    name: JobName


@dataclass(frozen=True)
class SvdJob:
    """One independent unit of a low-rank merge: ``fn(*args)`` with :class:`Operand` and :class:`Output` arguments
    resolved to tensors. ``fn`` is a pure module-level function (picklable by reference, for Ray); other arguments are
    plain values. ``name`` is unique within its plan."""

    name: JobName
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class LowRankPlan:
    """What a low-rank merge's plan step hands to the job runner and to :func:`assemble`.

    ``origin``: every key's starting point, floating tensors in the compute precision (θavg for CART, θ0 for the
    others), non-floating ones copied. ``dense``: the update (before λ) of floating tensors that are not low-ranked,
    where the method has one (TSV-M and Iso: the mean task vector; CART: none, those tensors stay θavg).
    ``blocks``: the low-ranked matrices, each as its blocks in row order. ``jobs``: in dependency order.
    ``outputs``: per block, the names of the jobs whose results make its update (:func:`block_update`).
    ``sources``: the state dicts an :class:`Operand` refers to (``"origin"``, and the fine-tuned models by index).
    ``out_dtypes``: the checkpoint dtype of every key, which the merged state dict keeps.
    """

    method: str
    origin: StateDict
    dense: StateDict
    blocks: dict[str, tuple[Block, ...]]
    jobs: tuple[SvdJob, ...]
    outputs: dict[Block, tuple[JobName, ...]]
    sources: Mapping[Source, Mapping[str, torch.Tensor]]
    out_dtypes: dict[str, torch.dtype]

    @property
    def output_names(self) -> list[JobName]:
        """The jobs whose results :func:`assemble` needs, in plan order."""
        return [name for names in self.outputs.values() for name in names]


def block_of(sd: Mapping[str, Any], block: Block) -> torch.Tensor:
    """``block`` of ``sd[block.key]``, a tensor or (in a Ray worker) a read-only numpy array, which is copied."""
    value = sd[block.key]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value))
    return block.of(value)


def run_job(job: SvdJob, source: Callable[[Source], Mapping[str, Any]], output: Callable[[JobName], Any]) -> Any:
    """Run one job with its operands looked up by ``source`` and earlier results by ``output``, on
    :data:`SVD_THREADS` threads. The one code path for local and Ray execution (:mod:`raymerge.workers`)."""
    args = [
        block_of(source(arg.source), arg.block) if isinstance(arg, Operand)
        else output(arg.name) if isinstance(arg, Output)
        else arg
        for arg in job.args
    ]
    with fixed_threads():
        return job.fn(*args)


def run_jobs(plan: LowRankPlan, on_job: Callable[[SvdJob, float], None] | None = None) -> dict[JobName, Any]:
    """Run every job of ``plan`` in this process, in plan order; returns the results :func:`assemble` needs.

    ``on_job(job, seconds)`` is called after each job (progress, benchmarks).
    """
    results: dict[JobName, Any] = {}
    for job in plan.jobs:
        start = time.perf_counter()
        results[job.name] = run_job(job, plan.sources.__getitem__, results.__getitem__)
        if on_job is not None:
            on_job(job, time.perf_counter() - start)
    return {name: results[name] for name in plan.output_names}


def block_update(parts: Sequence[torch.Tensor | Factors]) -> torch.Tensor:
    """One block's update from its jobs' results: the sum of :class:`Factors` as one product of the concatenated
    factors (Σt Lt Rt = [L1 … LT] [R1; …; RT]), or a single dense result as it is."""
    if all(isinstance(part, Factors) for part in parts):
        return torch.cat([part.left for part in parts], dim=1) @ torch.cat([part.right for part in parts], dim=0)
    if len(parts) != 1 or not isinstance(parts[0], torch.Tensor):
        raise ValueError("a block's results must be Factors, or one dense tensor")
    return parts[0]


def assemble(plan: LowRankPlan, results: Mapping[JobName, Any], lam: float = 1.0) -> StateDict:
    """``origin + λ·update`` for every key, in the checkpoint dtypes.

    ``update``: a low-ranked matrix's blocks' :func:`block_update` s, concatenated by rows; ``plan.dense[key]`` for
    the other floating tensors that have one; none (the origin as it is) otherwise. ``results`` maps each of
    ``plan.output_names`` to its job's result (:func:`run_jobs`, or the Ray runner), in any order. The plan is not
    modified and can be assembled again with another ``lam``.
    """
    lam = check_real("lam", lam)
    merged = {}
    for key, origin in plan.origin.items():
        if key in plan.blocks:
            updates = []
            for block in plan.blocks[key]:
                missing = [name for name in plan.outputs[block] if name not in results]
                if missing:
                    raise ValueError(f"no result for job {missing[0]!r} of {block.label!r}")
                update = block_update([results[name] for name in plan.outputs[block]])
                if tuple(update.shape) != block.shape or update.dtype != origin.dtype:
                    raise ValueError(
                        f"the update of {block.label!r} has shape {tuple(update.shape)} and dtype {update.dtype}; "
                        f"expected {block.shape} and {origin.dtype}"
                    )
                updates.append(update)
            # CART-2, TSV-3, ISO-C, ISO-CTS-3: θl = origin + λ·(the blocks' updates, stacked by rows)
            merged[key] = origin + lam * (updates[0] if len(updates) == 1 else torch.cat(updates))
        elif key in plan.dense:
            merged[key] = origin + lam * plan.dense[key]
        else:
            merged[key] = origin
    return cast_to(merged, plan.out_dtypes)


def mean_task_vectors(
    finetuned: Sequence[Mapping[str, torch.Tensor]], origin: Mapping[str, torch.Tensor], skip: Mapping[str, Any]
) -> StateDict:
    """``(1/T) Σt (θt − θ0)`` in the compute precision of ``origin`` (θ0), for the floating keys not in ``skip``;
    summed in task order. What the TSV and Iso code merge every non-matrix tensor with."""
    dense = {}
    for key, theta0 in origin.items():
        if key in skip or not theta0.is_floating_point():
            continue
        dense[key] = task_sum(theta0, [theta[key] for theta in finetuned]) / len(finetuned)
    return dense


def sources_of(origin: StateDict, finetuned: Sequence[Mapping[str, torch.Tensor]]) -> dict[Source, Mapping[str, torch.Tensor]]:
    """The plan's sources: ``"origin"`` and every fine-tuned model by index."""
    return {ORIGIN: origin, **{t: theta for t, theta in enumerate(finetuned)}}


def task_vector_plan_parts(
    method: str,
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rule: LowRankRule | RuleLike | None,
    qkv: str,
    names: Sequence[str] | None,
    precision: torch.dtype,
) -> tuple[StateDict, dict[str, tuple[Block, ...]], StateDict]:
    """What TSV-M, Iso-C and Iso-CTS plan alike: validation (before any arithmetic), then θ0 in the compute precision
    (the plan's origin), the blocks of the matrices ``rule`` selects (default :data:`ALL_MATRICES`, as the released
    code) and the mean task vector of every other floating tensor (the plan's ``dense``)."""
    check_qkv(qkv)
    validate_with_base(method, base, finetuned, names, min_finetuned=1)
    blocks = matrix_blocks(base, select_matrices(base, ALL_MATRICES if rule is None else rule), qkv)
    theta0 = per_key([base], lambda key, tensors: tensors[0], precision)
    return theta0, blocks, mean_task_vectors(finetuned, theta0, blocks)


def task_sum(theta0: torch.Tensor, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σt (θt − θ0) of one block in θ0's dtype, summed in task order."""
    total = torch.zeros_like(theta0)
    for theta in thetas:
        # METHODS notation: task vector τt = θt − θ0
        total += theta.to(theta0.dtype) - theta0
    return total
