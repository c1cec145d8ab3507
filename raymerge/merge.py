"""Static merges of fine-tuned state dicts (METHODS §1), plus the low-rank family re-exported: CART
(:mod:`raymerge.cart`), TSV-M (:mod:`raymerge.tsv`), Iso-C and Iso-CTS (:mod:`raymerge.iso`).

Every merge is a pure function: it validates its inputs (:mod:`raymerge.statedict`: count, keys, shapes, dtypes,
NaN/Inf, equal non-floating tensors), never writes into them, and returns a new ``dict[str, torch.Tensor]``.
Arithmetic runs in float32, or float64 with ``precision=torch.float64``, whatever the checkpoints' dtype; the result
has the checkpoints' dtypes. Non-floating tensors are copied from the base (or first) model.

Notation: θ0 the pre-trained weights (``base``), θ1..θT the fine-tuned ones, τt = θt − θ0 their task vectors.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from raymerge._arith import (
    average,
    cast_to,
    check_real,
    dtypes_of,
    floor_fraction,
    per_key,
    validate,
    validate_with_base,
)
from raymerge.cart import cart, check_rank_ratio, job_seed, rank_for
from raymerge.iso import iso_c, iso_cts
from raymerge.lowrank import (
    LowRankRule,
    RuleLike,
    check_qkv,
    check_svd,
    low_rank_approx,
    matrix_blocks,
    select_matrices,
)
from raymerge.statedict import StateDict, StateDictError
from raymerge.tsv import tsv_merge

__all__ = [
    "weight_average", "interpolate", "task_arithmetic", "ties", "model_stock", "greedy_soup", "cart", "tsv_merge",
    "iso_c", "iso_cts",
]


def _task_vector(theta_t: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    # METHODS notation: task vector τt = θt − θ0
    return theta_t - theta0


def weight_average(
    models: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    *,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """Uniform soup ``θ = (1/T) Σt θt`` of T ≥ 1 state dicts (METHODS §1); ``names`` label them in error messages."""
    validate(models, names)
    return cast_to(per_key(models, lambda key, tensors: average(tensors), precision), dtypes_of(models[0]))


def interpolate(
    theta0: Mapping[str, torch.Tensor],
    theta1: Mapping[str, torch.Tensor],
    lam: float,
    *,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """WiSE-FT ``θλ = (1−λ)θ0 + λθ1`` (METHODS §1).

    ``lam`` λ may be any finite real; [0, 1] interpolates (λ = 0 gives θ0 and λ = 1 gives θ1 exactly), outside it
    extrapolates. The usual grid is 0.0..1.0 in steps of 0.1.
    """
    lam = check_real("lam", lam)
    validate([theta0, theta1], ["theta0", "theta1"])
    # METHODS §1 WiSE-FT: θλ = (1−λ)θ0 + λθ1
    merged = per_key([theta0, theta1], lambda key, tensors: (1 - lam) * tensors[0] + lam * tensors[1], precision)
    return cast_to(merged, dtypes_of(theta0))


def _task_coefficients(lam: float | Sequence[float], count: int) -> list[float]:
    if isinstance(lam, numbers.Real):
        return [check_real("lam", lam)] * count
    coefficients = [check_real(f"lam[{t}]", value) for t, value in enumerate(lam)]
    if len(coefficients) != count:
        raise ValueError(f"lam has {len(coefficients)} per-task coefficients for {count} fine-tuned models")
    return coefficients


def task_arithmetic(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float | Sequence[float] = 0.3,
    rank_ratio: float | None = None,
    *,
    rule: LowRankRule | RuleLike | None = None,
    svd: str = "exact",
    seed: int = 0,
    qkv: str = "fused",
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """Task arithmetic ``θ = θ0 + Σt λt τt`` over T ≥ 1 fine-tuned models (METHODS §1).

    ``lam``: one float for every task (0.3 is the usual default), or one per task (DaWin's multi-task merge uses
    ``0.3 · T · λt(x)``); a length other than T is an error.

    ``rank_ratio`` ρ in [0, 1], when set, replaces each τt on the matrices ``rule`` selects (default
    :class:`~raymerge.lowrank.LowRankRule`) by its rank-k approximation, with CART's k, ``svd``, per-(block, task)
    ``seed`` and ``qkv`` (:func:`raymerge.cart.cart`): the CART paper's "task arithmetic with low-rank task vectors".
    ρ = 0 drops those matrices' task vectors (they keep θ0); other tensors always keep their full τt. ``qkv="split"``
    needs ``rank_ratio`` (it only concerns the SVDs) and a model with fused attention projections.
    """
    coefficients = _task_coefficients(lam, len(finetuned))
    check_qkv(qkv)
    if rank_ratio is not None:
        check_rank_ratio(rank_ratio)
        check_svd(svd)
    elif qkv != "fused":
        raise ValueError(f"qkv={qkv!r} only applies to task arithmetic's low-rank mode: set rank_ratio")
    validate_with_base("task_arithmetic", base, finetuned, names, min_finetuned=1)
    rule = LowRankRule() if rule is None else rule
    blocks = {} if rank_ratio is None else matrix_blocks(base, select_matrices(base, rule), qkv)

    def low_rank(tau: torch.Tensor, key: str, t: int) -> torch.Tensor:
        parts = [
            low_rank_approx(block.of(tau), rank_for(block.shape, rank_ratio), svd, job_seed(seed, block.label, t))
            for block in blocks[key]
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def merge_key(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        theta0 = tensors[0]
        total = torch.zeros_like(theta0)
        for t, (coefficient, theta_t) in enumerate(zip(coefficients, tensors[1:])):
            tau = _task_vector(theta_t, theta0)
            if key in blocks:
                tau = low_rank(tau, key, t)
            total += coefficient * tau
        # METHODS §1 task arithmetic: θ = θ0 + Σt λt τt
        return theta0 + total

    return cast_to(per_key([base, *finetuned], merge_key, precision), dtypes_of(base))


def _trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``max(1, ⌊density · n⌋)`` largest-magnitude entries of a flat vector.

    Every entry whose magnitude equals the threshold (the k-th largest magnitude) is kept, so ties at the threshold
    may keep a few more than k entries; the result does not depend on the order of entries (hence of keys).
    """
    if vector.numel() == 0:
        return vector
    keep = max(1, floor_fraction(density, vector.numel()))
    magnitude = vector.abs()
    threshold = magnitude.kthvalue(vector.numel() - keep + 1).values
    # METHODS §1 TIES: trim to the top-density fraction by magnitude
    return torch.where(magnitude >= threshold, vector, torch.zeros_like(vector))


def _elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """Per-entry sign (−1, 0 or +1) for trimmed task vectors stacked as T × n."""
    # METHODS §1 TIES: elect the sign of the summed trimmed values
    sign = torch.sign(trimmed.sum(dim=0))
    # released TIES code (resolve_zero_signs, "majority"): where the sum is exactly 0, use the sign of the sum of the
    # elected signs over all entries; if that is 0 too the entry stays 0 and no task agrees with it
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def _disjoint_mean(trimmed: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Mean over tasks of the trimmed entries with the elected (non-zero) sign, 0 where none has it; T × n → n."""
    agrees = torch.sign(trimmed) * elected > 0
    total = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    # METHODS §1 TIES: disjoint mean (total is 0 where no entry agrees, so clamping the count there yields 0)
    return total / agrees.sum(dim=0).clamp(min=1)


def ties(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    lam: float = 1.0,
    density: float = 0.2,
    *,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """TIES-merging of T ≥ 1 fine-tuned models (METHODS §1), ``θ = θ0 + λ·merged``.

    1. Trim: each τt, flattened over all its floating tensors (global per task vector, as the original), keeps its
       ``max(1, ⌊density · n⌋)`` largest-magnitude entries; entries tied with the smallest kept magnitude are all kept.
    2. Elect: per entry, the sign of the sum of the trimmed values; where that sum is exactly 0, the sign of the sum
       of all entries' elected signs (the released code's "majority"); where that is 0 as well, the merged entry is 0.
    3. Disjoint mean: the mean of the trimmed entries whose sign equals the elected one (0 where there are none).

    ``density`` in (0, 1] (default 0.2); ``lam`` λ any finite real (default 1.0).
    """
    lam = check_real("lam", lam)
    if not 0 < check_real("density", density) <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    validate_with_base("ties", base, finetuned, names, min_finetuned=1)
    float_keys = [key for key, tensor in base.items() if tensor.is_floating_point()]
    trimmed = []
    for theta_t in finetuned:
        tau = per_key([base, theta_t], lambda key, tensors: _task_vector(tensors[1], tensors[0]), precision)
        trimmed.append(_trim(torch.cat([tau[key].flatten() for key in float_keys]), density))
    stacked = torch.stack(trimmed)
    merged_flat = _disjoint_mean(stacked, _elect_sign(stacked))
    merged_parts = dict(zip(float_keys, merged_flat.split([base[key].numel() for key in float_keys])))

    def merge_key(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        # METHODS §1 TIES: θ = θ0 + λ·merged
        return tensors[0] + lam * merged_parts[key].view_as(tensors[0])

    return cast_to(per_key([base], merge_key, precision), dtypes_of(base))


def _model_stock_ratio(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock's t (0-dim tensor) for one layer's N ≥ 2 fine-tuned deltas θi − θ0 (rules in :func:`model_stock`)."""
    n = len(deltas)
    flat = torch.stack([delta.flatten() for delta in deltas])
    norms = flat.norm(dim=1, keepdim=True)
    # a zero delta has no direction: a zero unit vector makes its cosines 0 rather than NaN
    unit = torch.where(norms > 0, flat / norms, torch.zeros_like(flat))
    rows, cols = torch.triu_indices(n, n, offset=1)
    cos_phi = (unit @ unit.T)[rows, cols].mean().clamp(0, 1)
    # METHODS §1 Model Stock: t = N cosφ / (1 + (N−1) cosφ)
    return n * cos_phi / (1 + (n - 1) * cos_phi)


def model_stock(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    names: Sequence[str] | None = None,
    precision: torch.dtype = torch.float32,
) -> StateDict:
    """Model Stock over N ≥ 2 fine-tuned models of one task (METHODS §1): per tensor, ``θ = t·θ̄ft + (1−t)·θ0``.

    Each floating tensor (layer) gets its own ``t = N cosφ / (1 + (N−1) cosφ)``, cos φ being the mean pairwise
    cosine of its N deltas θi − θ0 (METHODS' "angle between fine-tuned deltas", generalized from the paper's N = 2).

    - A zero-norm delta has no direction: its cosines with the others count as 0 (no NaN). If all deltas are zero,
      t = 0 and θ = θ0, which is also θ̄ft.
    - cos φ is clamped to [0, 1], the range Model Stock's derivation assumes: t stays in [0, 1] (negatively
      correlated deltas give θ0) and the pole at cos φ = −1/(N−1) is never reached.
    """
    validate_with_base("model_stock", base, finetuned, names, min_finetuned=2)

    def merge_key(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        theta0, thetas = tensors[0], tensors[1:]
        t = _model_stock_ratio([_task_vector(theta, theta0) for theta in thetas])
        # METHODS §1 Model Stock: θ = t·θ̄ft + (1−t)·θ0
        return t * average(thetas) + (1 - t) * theta0

    return cast_to(per_key([base, *finetuned], merge_key, precision), dtypes_of(base))


def greedy_soup(
    candidates: Mapping[str, Mapping[str, torch.Tensor]],
    score: Callable[[StateDict], float],
    *,
    precision: torch.dtype = torch.float32,
) -> tuple[StateDict, list[str]]:
    """Greedy soup (METHODS §1) of named fine-tuned state dicts.

    ``score`` evaluates a state dict on held-out data (higher is better; e.g. validation accuracy in [0, 1]). Models
    are ranked by their own score (ties keep ``candidates``' order); each, in that order, joins the soup only if the
    soup's score does not drop. Returns the uniform soup of the kept models and their names, in the order kept.
    """
    if not candidates:
        raise StateDictError("greedy_soup needs at least 1 fine-tuned model, got none")
    names = list(candidates)
    validate([candidates[n] for n in names], names)
    own = {name: score(dict(candidates[name])) for name in names}
    ranked = sorted(names, key=lambda name: -own[name])
    kept, best = [ranked[0]], own[ranked[0]]
    for name in ranked[1:]:
        trial = weight_average([candidates[n] for n in [*kept, name]], precision=precision)
        value = score(trial)
        # METHODS §1 greedy soup: keep a model only if held-out accuracy does not drop
        if value >= best:
            kept, best = [*kept, name], value
    return weight_average([candidates[n] for n in kept], kept, precision=precision), kept
