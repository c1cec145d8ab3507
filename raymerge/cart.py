"""CART: centered arithmetic with rank-reduced task vectors (METHODS §2, cart-2025.md Eq. 3–4).

    θavg = (1/T) Σt θt,   τ̄t = θt − θavg,   θl = θavg,l + λ Σt SVDk(τ̄t,l),   k = max(1, ⌊ρ·min(m, n)⌋)

on the m × n weight matrices a :class:`LowRankRule` selects; every other tensor is θavg (its centered vectors sum
to zero).

The computation is split so that a distributed driver can run the expensive part anywhere and get the same bits:

1. :func:`plan_cart` validates, computes θavg and lists the independent :class:`LowRankJob` s, one per (matrix, task);
2. :func:`low_rank_approx` turns one centered matrix (from :func:`centered_matrix`) into its rank-k approximation;
3. :func:`assemble_cart` adds ``λ Σt`` of the approximations to θavg, in a fixed order.

:func:`cart` is exactly plan → map → assemble in one process.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from raymerge._arith import average, cast_to, check_real, dtypes_of, floor_fraction, per_key, validate_with_base
from raymerge.statedict import StateDict

SVD_METHODS = ("exact", "randomized")

# Randomized SVD (Halko et al. 2009, Alg. 4.4/5.1, as torch.svd_lowrank implements it): a sketch of q = k + max(k, 10)
# columns and 4 power iterations. Task-vector spectra decay slowly, so oversampling by k (rather than Halko's usual
# 5-10) and a few power iterations are what keep the top-k subspace close to the exact one. Measured on a 3072 × 768
# matrix with k = 61: relative difference from the exact rank-k approximation 4e-9 for σi = 0.97^i, 6e-5 for
# σi ∝ 1/i, 1e-2 for σi ∝ 1/√i, in about half the time of an exact SVD.
RANDOMIZED_MIN_OVERSAMPLING = 10
RANDOMIZED_POWER_ITERATIONS = 4

# LAPACK/BLAS (MKL here) block and reduce differently with different thread counts, which changes the last bits of an
# SVD. Every SVD runs on this many threads so a Ray worker and the driver agree bit for bit; parallelism comes from
# running many jobs at once instead.
SVD_THREADS = 1

_BLOCK = r"(visual\.)?transformer\.resblocks\.\d+\."
DEFAULT_LOW_RANK_PATTERNS = (
    _BLOCK + r"attn\.in_proj_weight",
    _BLOCK + r"attn\.out_proj\.weight",
    _BLOCK + r"mlp\.c_fc\.weight",
    _BLOCK + r"mlp\.c_proj\.weight",
)

RuleLike = Callable[[str, torch.Tensor], bool]


@dataclass(frozen=True)
class LowRankRule:
    """Which tensors are replaced by rank-k approximations: 2-D tensors whose key fully matches one of ``patterns``.

    The default follows the released CART code on open_clip ViTs: per residual block, the attention input projection
    (``attn.in_proj_weight``, one 3d × d matrix for q, k and v together), ``attn.out_proj.weight``, ``mlp.c_fc.weight``
    and ``mlp.c_proj.weight``, with or without a ``visual.`` prefix (in a full CLIP state dict the unprefixed keys are
    the text tower's blocks, which the default therefore selects too). Biases, LayerNorms, embeddings, ``conv1`` and
    ``proj`` are not selected.

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
        return tensor.ndim == 2 and any(re.fullmatch(pattern, key) for pattern in self.patterns)


@dataclass(frozen=True)
class LowRankJob:
    """One independent unit of CART work: the rank-``k`` approximation of task ``task_index``'s centered ``key``.

    ``seed`` is derived from the merge's seed, ``key`` and ``task_index`` (:func:`job_seed`); exact SVD ignores it.
    """

    key: str
    task_index: int
    k: int
    seed: int


@dataclass(frozen=True, eq=False)
class CartPlan:
    """What :func:`plan_cart` hands to the map and assemble steps.

    ``theta_avg``: θavg for every key, floating tensors in the compute precision (float32 or float64), others copied.
    ``jobs``: the low-rank jobs, ordered by key (state-dict order) then task; empty when ``rank_ratio`` is 0.
    ``svd``: ``"exact"`` or ``"randomized"``, to pass to :func:`low_rank_approx`.
    ``out_dtypes``: the checkpoint dtype of every key, which the merged state dict keeps.
    """

    theta_avg: StateDict
    jobs: tuple[LowRankJob, ...]
    svd: str
    out_dtypes: dict[str, torch.dtype]


def check_rank_ratio(rank_ratio: float) -> float:
    """``rank_ratio`` as a float; ``ValueError`` naming the value unless it lies in [0, 1]."""
    value = check_real("rank_ratio", rank_ratio)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"rank_ratio must be in [0, 1], got {rank_ratio!r}")
    return value


def check_svd(svd: str) -> None:
    """``ValueError`` naming ``svd`` unless it is one of :data:`SVD_METHODS`."""
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd {svd!r}: expected one of {', '.join(map(repr, SVD_METHODS))}")


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
    """``{key: k}`` for the tensors of ``sd`` that ``rule`` (default :class:`LowRankRule`) selects, in ``sd``'s order.

    Raises ``ValueError`` naming the key when a rule selects anything but a floating 2-D tensor.
    """
    rule = LowRankRule() if rule is None else rule
    ranks = {}
    for key, tensor in sd.items():
        if not rule(key, tensor):
            continue
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise ValueError(
                f"the low-rank rule selected {key!r} of shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                "but only floating 2-D matrices can be rank-reduced"
            )
        ranks[key] = rank_for(tensor.shape, rank_ratio)
    return ranks


def job_seed(seed: int, key: str, task_index: int) -> int:
    """A 63-bit seed for one (key, task) SVD: a hash of the merge seed, the key and the task index.

    Independent of the order in which jobs run and of any global RNG state.
    """
    digest = hashlib.sha256(f"{seed}\0{key}\0{task_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def _threads(n: int) -> Iterator[None]:
    # process-wide setting: not safe against other Python threads running torch at the same time
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def low_rank_approx(matrix: torch.Tensor, k: int, svd: str = "exact", seed: int = 0) -> torch.Tensor:
    """The best rank-``k`` approximation ``Σ_{i≤k} σi ui viᵀ`` of an m × n ``matrix``, same shape and dtype.

    ``k`` in ``[0, min(m, n)]``; ``k = 0`` gives zeros. ``svd="exact"`` uses ``torch.linalg.svd`` (the released CART
    code); ``svd="randomized"`` uses ``torch.svd_lowrank`` with ``k + max(k, RANDOMIZED_MIN_OVERSAMPLING)`` sketch
    columns (at most ``min(m, n)``) and ``RANDOMIZED_POWER_ITERATIONS`` power iterations, its random sketch drawn
    from ``seed`` (pass a :class:`LowRankJob`'s ``seed``) under a forked RNG, so the caller's global RNG is neither
    read nor advanced.

    Deterministic: the SVD runs in float64 on a fresh copy of ``matrix`` with :data:`SVD_THREADS` threads, so equal
    inputs give bit-identical outputs whatever the caller's thread count or process (same CPU type and torch build).
    """
    if matrix.ndim != 2:
        raise ValueError(f"low_rank_approx needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    check_svd(svd)
    full_rank = min(matrix.shape)
    if not 0 <= k <= full_rank:
        raise ValueError(f"k must be in [0, {full_rank}] for a {tuple(matrix.shape)} matrix, got {k}")
    if k == 0:
        return torch.zeros_like(matrix)
    with _threads(SVD_THREADS):
        # a fresh float64 buffer: the input's alignment (e.g. an object-store array) cannot change MKL's code path
        a = matrix.to(torch.float64, copy=True)
        if svd == "exact":
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
        else:
            devices = [a.device] if a.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(
                    a, q=min(k + max(k, RANDOMIZED_MIN_OVERSAMPLING), full_rank), niter=RANDOMIZED_POWER_ITERATIONS
                )
            vh = v.mH
        # CART Eq. 4: SVDk(τ̄) = Σ_{i≤k} σi ui viᵀ
        approx = (u[:, :k] * s[:k]) @ vh[:k]
    return approx.to(matrix.dtype)


def centered_matrix(theta_t: torch.Tensor, theta_avg: torch.Tensor) -> torch.Tensor:
    """τ̄t,l (m × n) for one job, in θavg's dtype.

    Call it as ``centered_matrix(finetuned[job.task_index][job.key], plan.theta_avg[job.key])``.
    """
    # CART Eq. 3: centered task vector τ̄t = θt − θavg
    return theta_t.to(theta_avg.dtype) - theta_avg


def plan_cart(
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rank_ratio: float = 0.08,
    svd: str = "exact",
    seed: int = 0,
    rule: LowRankRule | RuleLike | None = None,
    *,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> CartPlan:
    """Step 1 of CART: validate, compute θavg and list the low-rank jobs. Arguments as for :func:`cart`."""
    rank_ratio = check_rank_ratio(rank_ratio)
    check_svd(svd)
    validate_with_base("cart", base, finetuned, names, min_finetuned=2)
    theta_avg = per_key(finetuned, lambda key, tensors: average(tensors), precision)
    ranks = select_low_rank(finetuned[0], rank_ratio, rule)
    jobs = tuple(
        LowRankJob(key, t, k, job_seed(seed, key, t))
        for key, k in ranks.items()
        if k > 0
        for t in range(len(finetuned))
    )
    return CartPlan(theta_avg=theta_avg, jobs=jobs, svd=svd, out_dtypes=dtypes_of(finetuned[0]))


def assemble_cart(
    plan: CartPlan, approximations: Mapping[tuple[str, int], torch.Tensor], lam: float = 1.0
) -> StateDict:
    """Step 3 of CART: ``θavg + λ Σt approximations`` per planned matrix, θavg elsewhere, in the checkpoint dtypes.

    ``approximations[(job.key, job.task_index)]`` is :func:`low_rank_approx`'s result for each job of ``plan``, in
    θavg's dtype; they are summed in task order whatever order they arrived in. The plan is not modified and can be
    assembled again with another ``lam``.
    """
    lam = check_real("lam", lam)
    by_key: dict[str, list[torch.Tensor]] = {}
    for job in plan.jobs:
        name = (job.key, job.task_index)
        if name not in approximations:
            raise ValueError(f"no approximation for key {job.key!r}, task {job.task_index}")
        approx = approximations[name]
        expected = plan.theta_avg[job.key]
        if approx.shape != expected.shape or approx.dtype != expected.dtype:
            raise ValueError(
                f"approximation for key {job.key!r}, task {job.task_index} has shape {tuple(approx.shape)} and dtype "
                f"{approx.dtype}; expected {tuple(expected.shape)} and {expected.dtype}"
            )
        by_key.setdefault(job.key, []).append(approx)
    merged = {}
    for key, theta_avg in plan.theta_avg.items():
        if key in by_key:
            total = torch.zeros_like(theta_avg)
            for approx in by_key[key]:
                total += approx
            # CART Eq. 4: θl = θavg,l + λ Σt SVDk(τ̄t,l)
            merged[key] = theta_avg + lam * total
        else:
            merged[key] = theta_avg
    return cast_to(merged, plan.out_dtypes)


def cart(
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    rank_ratio: float = 0.08,
    lam: float = 1.0,
    svd: str = "exact",
    seed: int = 0,
    rule: LowRankRule | RuleLike | None = None,
    *,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """CART merge of T ≥ 2 fine-tuned state dicts (METHODS §2, cart-2025.md Eq. 4).

    ``base``: the pre-trained weights, only validated against the fine-tuned ones (CART centers on θavg, not θ0);
    ``None`` skips that check. ``rank_ratio`` ρ in [0, 1], the fraction of ``min(m, n)`` kept per matrix
    (:func:`rank_for`); ``lam`` λ any finite real (paper: ρ = 0.08, λ = 1; released ViT-B/32 configs: ρ = 0.12,
    λ = 2.0 for 8 tasks). ``svd``: ``"exact"`` or ``"randomized"`` (:func:`low_rank_approx`), ``seed`` seeding the
    latter per (key, task). ``rule`` picks the matrices to rank-reduce (default :class:`LowRankRule`). ``names``
    label the fine-tuned models in error messages. Arithmetic runs in ``precision`` (float32 or float64); the result
    has the checkpoints' dtypes.

    Endpoints: ρ = 0 returns θavg exactly (no low-rank term). ρ = 1 returns θavg up to float rounding for *every*
    λ, since a full-rank SVD reproduces each τ̄t and the τ̄t sum to zero; so it equals ``weight_average(finetuned)``.

    Memory: besides θavg, all T rank-k approximations of every selected matrix are held until assembly (about the
    size of T copies of those matrices in the compute precision).
    """
    check_real("lam", lam)
    plan = plan_cart(base, finetuned, rank_ratio, svd, seed, rule, names=names, precision=precision)
    approximations = {
        (job.key, job.task_index): low_rank_approx(
            centered_matrix(finetuned[job.task_index][job.key], plan.theta_avg[job.key]), job.k, plan.svd, job.seed
        )
        for job in plan.jobs
    }
    return assemble_cart(plan, approximations, lam)
