"""Plumbing shared by :mod:`raymerge.merge` and :mod:`raymerge.cart` (private).

It lives apart from both so that ``merge`` can re-export CART without ``cart`` importing ``merge``.
Everything here is pure: state dicts in, new state dicts out, inputs never written to.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import torch

from raymerge.statedict import StateDict, StateDictError, check_mergeable, check_nonfloating_equal, compute_dtype

PRECISIONS = (torch.float32, torch.float64)


def check_real(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` naming the parameter unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def validate(models: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """All a merge checks before any work: count (≥ 1), keys, shapes, dtypes, NaN/Inf, equal non-floating tensors."""
    check_mergeable(models, names)
    check_nonfloating_equal(models, names)


def validate_with_base(
    method: str,
    base: Mapping[str, torch.Tensor] | None,
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None,
    min_finetuned: int,
) -> None:
    """Validate ``base`` (skipped when ``None``) together with at least ``min_finetuned`` fine-tuned models.

    Error messages call the models ``base`` and ``names[i]`` (default ``finetuned i``) and start with ``method``.
    """
    if names is None:
        labels = [f"finetuned {i}" for i in range(len(finetuned))]
    elif len(names) != len(finetuned):
        raise ValueError(f"got {len(names)} names for {len(finetuned)} fine-tuned models")
    else:
        labels = list(names)
    if len(finetuned) < min_finetuned:
        got = "none" if not finetuned else f"{len(finetuned)} ({', '.join(labels)})"
        raise StateDictError(f"{method} needs at least {min_finetuned} fine-tuned models, got {got}")
    if base is None:
        validate(finetuned, labels)
    else:
        validate([base, *finetuned], ["base", *labels])


def per_key(
    models: Sequence[Mapping[str, torch.Tensor]],
    fn: Callable[[str, list[torch.Tensor]], torch.Tensor],
    precision: torch.dtype,
) -> StateDict:
    """``{key: fn(key, [each model's tensor in the compute dtype])}`` over the floating keys of ``models[0]``.

    The result stays in the compute dtype (``precision``); :func:`cast_to` brings it back to the checkpoint's.
    Non-floating tensors are copied from ``models[0]`` (validation has checked that all models agree on them).
    ``fn`` must not write into its arguments: for float32 checkpoints they are the input tensors themselves.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be torch.float32 or torch.float64, got {precision}")
    merged = {}
    for key, first in models[0].items():
        if first.is_floating_point():
            dtype = compute_dtype(first, precision)
            merged[key] = fn(key, [model[key].to(dtype) for model in models])
        else:
            merged[key] = first.clone()
    return merged


def dtypes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """The checkpoint dtype of every key, which a merge's output must keep."""
    return {key: tensor.dtype for key, tensor in sd.items()}


def cast_to(merged: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], *, copy: bool = True) -> StateDict:
    """``merged`` cast to ``dtypes`` in a new dict. It copies, so results never share storage with inputs, unless
    ``copy=False``: for tensors the merge's own arithmetic made, which only a dtype change needs to copy (a copy of a
    model is a tenth of a cheap merge's time, most of it page faults)."""
    return {key: tensor.to(dtypes[key], copy=copy) for key, tensor in merged.items()}


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of same-shape tensors, summed in list order so the bits do not depend on the caller."""
    total = torch.zeros_like(tensors[0])
    for tensor in tensors:
        total += tensor
    # METHODS §1 uniform soup / CART θavg: θ = (1/T) Σt θt
    return total.div_(len(tensors))


def floor_fraction(ratio: float, n: int) -> int:
    """``⌊ratio · n⌋`` taken on the decimal the user wrote: ``0.29 × 100`` is 29, where binary floats give 28.999…"""
    return math.floor(Fraction(str(float(ratio))) * n)
