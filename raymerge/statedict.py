"""Checks and conversions shared by every merge: one place that knows what a valid set of checkpoints is.

A state dict here is a plain ``dict[str, torch.Tensor]``. Nothing in this module touches files or Ray.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from raymerge.errors import InputError

StateDict = dict[str, torch.Tensor]


class StateDictError(InputError):
    """A checkpoint (or set of checkpoints) cannot be merged or loaded as asked; the message names the key and model."""


def _names(models: Sequence[object], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"model {i}" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} models")
    return list(names)


def check_compatible(
    models: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    min_models: int = 1,
) -> None:
    """Raise :class:`StateDictError` unless all ``models`` share keys, shapes and dtypes.

    The message names the first key (in the first model's order) that differs and the model it differs in,
    so that a user with 8 checkpoints knows which file to look at.
    """
    labels = _names(models, names)
    if len(models) < min_models:
        what = "an empty list of models" if not models else f"{len(models)} model ({labels[0]})"
        raise StateDictError(f"this merge needs at least {min_models} models, got {what}")
    ref, ref_name = models[0], labels[0]
    for sd, name in zip(models[1:], labels[1:]):
        missing = [k for k in ref if k not in sd]
        if missing:
            raise StateDictError(f"key {missing[0]!r} of {ref_name} is missing from {name}")
        extra = [k for k in sd if k not in ref]
        if extra:
            raise StateDictError(f"key {extra[0]!r} of {name} is not in {ref_name}")
        for key, tensor in ref.items():
            other = sd[key]
            if tuple(other.shape) != tuple(tensor.shape):
                raise StateDictError(
                    f"key {key!r} has shape {tuple(other.shape)} in {name} "
                    f"but {tuple(tensor.shape)} in {ref_name}"
                )
            if other.dtype != tensor.dtype:
                raise StateDictError(f"key {key!r} has dtype {other.dtype} in {name} but {tensor.dtype} in {ref_name}")


def _finite_bounds(tensor: torch.Tensor) -> bool:
    """Whether a non-empty floating tensor holds no NaN and no Inf: min and max propagate NaN and are ±Inf where an
    Inf is. One read and no temporary as large as the tensor, where ``isfinite(t).all()`` costs ~20× as much."""
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def check_finite(models: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise :class:`StateDictError` naming the first key and model that holds a NaN or an Inf."""
    for sd, name in zip(models, _names(models, names)):
        for key, tensor in sd.items():
            if tensor.is_floating_point() and tensor.numel() and not _finite_bounds(tensor):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise StateDictError(f"key {key!r} of {name} contains {bad}")


def check_mergeable(
    models: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    min_models: int = 1,
) -> None:
    """Everything a merge checks before it does any work: count, keys, shapes, dtypes, finiteness."""
    check_compatible(models, names, min_models=min_models)
    check_finite(models, names)


def compute_dtype(tensor: torch.Tensor, precision: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype merge arithmetic runs in: ``precision`` for floating tensors (never a half type), else unchanged."""
    return precision if tensor.is_floating_point() else tensor.dtype


def state_dict_hash(sd: Mapping[str, torch.Tensor] | Mapping[str, np.ndarray]) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and raw bytes: equal hashes mean bit-identical weights."""
    h = hashlib.sha256()
    for key in sorted(sd):
        value = sd[key]
        arr = value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
        h.update(key.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        if isinstance(arr, torch.Tensor):
            # bfloat16 has no numpy dtype: hash the raw bytes through an integer view of the same width
            arr = arr.view(torch.int16).numpy() if arr.dtype == torch.bfloat16 else arr.numpy()
        h.update(arr.tobytes())
    return h.hexdigest()


def to_numpy(sd: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Detach to numpy (float32 for bfloat16) so that ``ray.put`` stores it zero-copy (see RAY-NOTES.md)."""
    out = {}
    for key, tensor in sd.items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[key] = t.contiguous().numpy()
    return out


def numpy_views(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """Tensors sharing memory with ``arrays`` (no copy), e.g. read-only object-store arrays that a merge reads.

    Safe only for readers: merges never write into their inputs (:mod:`raymerge.merge`), so torch's warning about
    non-writable arrays does not apply and is silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(arr) for key, arr in arrays.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """Inverse of :func:`to_numpy`; copies, because object-store arrays are read-only."""
    return {key: torch.from_numpy(np.array(arr, copy=True)) for key, arr in arrays.items()}


def check_nonfloating_equal(models: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise :class:`StateDictError` naming the key and model where a non-floating tensor differs from the first's.

    Merges average floating tensors only; integer and boolean buffers are copied from the first model, which is
    only meaningful when every model holds the same values. Assumes :func:`check_compatible` has passed.
    """
    labels = _names(models, names)
    ref, ref_name = models[0], labels[0]
    for key, tensor in ref.items():
        if tensor.is_floating_point():
            continue
        for sd, name in zip(models[1:], labels[1:]):
            if not torch.equal(sd[key], tensor):
                raise StateDictError(
                    f"non-floating key {key!r} differs between {name} and {ref_name}: "
                    "merges copy it, so it must be equal"
                )
