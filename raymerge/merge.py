"""Static merges of fine-tuned state dicts (METHODS §1), plus the low-rank family re-exported: CART
(:mod:`raymerge.cart`), TSV-M (:mod:`raymerge.tsv`), Iso-C and Iso-CTS (:mod:`raymerge.iso`).

Every merge is a pure function: it validates its inputs (:mod:`raymerge.statedict`: count, keys, shapes, dtypes,
NaN/Inf, equal non-floating tensors), never writes into them, and returns a new ``dict[str, torch.Tensor]``.
Arithmetic runs in float32, or float64 with ``precision=torch.float64``, whatever the checkpoints' dtype; the result
has the checkpoints' dtypes. Non-floating tensors are copied from the base (or first) model.

Notation: θ0 the pre-trained weights (``base``), θ1..θT the fine-tuned ones, τt = θt − θ0 their task vectors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from raymerge._arith import (
    PRECISIONS,
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
    return cast_to(per_key(models, lambda key, tensors: average(tensors), precision), dtypes_of(models[0]), copy=False)


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
    return cast_to(merged, dtypes_of(theta0), copy=False)


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
            total += tau.mul_(coefficient)  # tau is this merge's own
        # METHODS §1 task arithmetic: θ = θ0 + Σt λt τt
        return total.add_(theta0)

    return cast_to(per_key([base, *finetuned], merge_key, precision), dtypes_of(base), copy=False)


# TIES without T flattened task vectors side by side. Each τt's trim threshold stays the exact k-th largest
# magnitude, but a sample of |τt| first brackets it: one pass over the models, chunk by chunk and task by task,
# settles every entry outside the brackets, and lists the few inside one (and those with a zero sum, whose sign
# waits for the global majority). Once the pass has counted what each bracket keeps, the listed entries give the
# exact thresholds and are computed again from scratch. A bracket decides the speed, never the result: where a
# sample misses, the exact threshold comes from a full selection and the pass runs again.
_TIES_SAMPLE_STRIDE = 97  # a prime: the strided sample walks across the columns of every matrix
_TIES_BRACKET_SIGMAS = 4.0  # bracket half-width, in binomial standard deviations of the k-th largest's sample rank
_TIES_CHUNK = {"cpu": 1 << 17}  # entries per chunk of the eager pass: on a CPU the chunk's working set stays in cache
_TIES_BLOCK = 1 << 12  # entries per block of the compiled pass: its running sums stay in the L1 cache
_TIES_SLICE = 1 << 20  # entries per call of the compiled pass: what it converts to the compute dtype at once
# a CPU runs the compiled pass (raymerge._ties_kernel) for models of at least this many entries: below, numba's import
# and first call in a process (~1-2 s) cost more than the eager pass does
_TIES_FUSED_MIN = 1 << 20
_TIES_DEVICE_CHUNK = 1 << 24  # on an accelerator, few large kernels
_TIES_SUMS = ("sum", "pos", "neg", "n_pos", "n_neg", "listed")


class _TiesInputs(NamedTuple):
    """Flat views of the floating, non-empty tensors of θ0 and each θt, in θ0's key order."""

    keys: list[str]
    base: list[torch.Tensor]
    tasks: list[list[torch.Tensor]]  # [task][key]
    dtype: torch.dtype  # the compute dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return sum(theta0.numel() for theta0 in self.base)

    def scratch(self, size: int) -> dict[str, torch.Tensor]:
        """Buffers for :func:`_trimmed_sums` over at most ``size`` entries."""
        names = (*_TIES_SUMS, "base", "theta", "tau", "part", "sign")
        return {name: torch.empty(size, dtype=self.dtype, device=self.device) for name in names}


def _ties_inputs(
    base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], precision: torch.dtype
) -> _TiesInputs:
    keys = [key for key, tensor in base.items() if tensor.is_floating_point() and tensor.numel()]
    device = base[keys[0]].device if keys else torch.device("cpu")
    return _TiesInputs(keys, [base[key].reshape(-1) for key in keys],
                       [[theta[key].reshape(-1) for key in keys] for theta in finetuned], precision, device)


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value``, so that ``|τ| > _below(thr)`` is ``|τ| ≥ thr``."""
    return torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)).item()


def _in_dtype(tensor: torch.Tensor, inputs: _TiesInputs, out: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the compute dtype on the merge's device: itself when it already is, else copied into ``out``."""
    if tensor.dtype == inputs.dtype and tensor.device == inputs.device:
        return tensor
    return out.copy_(tensor)


def _trimmed_sums(
    theta0: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    keep_above: Sequence[float],
    list_above: Sequence[float] | None,
    inputs: _TiesInputs,
    scratch: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Per-entry sums, in task order, of the trimmed task vectors over one chunk of c entries.

    ``theta0`` (c,) in the compute dtype, ``thetas`` T tensors (c,). Task t keeps the entries with
    ``|τt| > keep_above[t]``. Returns (c,) views into ``scratch``: ``sum`` (Σ kept τt), ``pos`` (Σ kept positive
    τt), ``neg`` (Σ kept negative |τt|), ``n_pos`` and ``n_neg`` (how many), ``listed`` (how many tasks have
    ``|τt| > list_above[t]``;
    only with ``list_above``, which must not exceed ``keep_above``; zeros never count), and per task the number of
    non-zero entries it keeps (0-dim tensors). Each τt is materialized for one chunk only, and the sums add one task
    after another, so that no entry's sum depends on the chunking or the device.
    """
    c = theta0.numel()
    buf = {name: tensor[:c] for name, tensor in scratch.items()}
    sums = {name: buf[name].zero_() for name in _TIES_SUMS if name != "listed" or list_above is not None}
    part, sign = buf["part"], buf["sign"]
    kept = []
    for t, theta in enumerate(thetas):
        tau = torch.sub(_in_dtype(theta, inputs, buf["theta"]), theta0, out=buf["tau"])
        # METHODS §1 TIES: trim τt to its top-density entries by magnitude (positive and negative ones apart;
        # threshold(x, cut, 0) is x where x > cut, else 0)
        torch.threshold(tau, keep_above[t], 0.0, out=part)
        sums["sum"].add_(part)
        sums["pos"].add_(part)
        sums["n_pos"].add_(torch.sign(part, out=sign))
        count = sign.sum()
        torch.threshold_(torch.neg(tau, out=part), keep_above[t], 0.0)
        sums["sum"].sub_(part)  # exactly += τt: of part and the one added above, one is 0
        sums["neg"].add_(part)
        sums["n_neg"].add_(torch.sign(part, out=sign))
        kept.append(count + sign.sum())
        if list_above is not None:
            torch.threshold_(tau.abs_(), list_above[t], 0.0)
            sums["listed"].add_(torch.sign(tau, out=sign))
    return sums, kept


def _disjoint_mean(sums: Mapping[str, torch.Tensor], majority: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged entries (new tensor) and their elected signs (−1, 0 or +1) from :func:`_trimmed_sums`' sums.

    The elected sign is that of ``sum``; where that is 0, ``majority`` (the released code's rule, see :func:`ties`).
    """
    # METHODS §1 TIES: elect the sign of the summed trimmed values
    elected = torch.sign(sums["sum"])
    if majority:
        elected = torch.where(elected == 0, majority, elected)
    # METHODS §1 TIES: disjoint mean, the mean of the kept entries with the elected sign (0 where there are none);
    # the factors are exactly 0 or 1, so each entry is one of the two means, or +0
    up, down = elected.clamp(min=0), elected.neg().clamp(min=0)
    merged = sums["pos"] / sums["n_pos"].clamp(min=1) * up - sums["neg"] / sums["n_neg"].clamp(min=1) * down
    return merged, elected


class _TiesPass(NamedTuple):
    out: dict[str, torch.Tensor]  # per key, flat θ0 + λ·merged in the checkpoint dtype, except at ``listed``
    listed: dict[str, torch.Tensor]  # per key, the flat positions to compute again
    theta0: torch.Tensor  # θ0 at the listed positions, concatenated in key order, in the compute dtype
    thetas: list[torch.Tensor]  # each θt likewise
    kept: list[int]  # per task, how many non-zero entries |τt| > keep_above[t] holds
    votes: int  # Σ elected signs over the entries not listed


class _KeyPass(NamedTuple):
    """:func:`_ties_pass` over one key."""

    out: torch.Tensor  # (n,) θ0 + λ·merged in the compute dtype, except at ``listed``
    listed: torch.Tensor  # (m,) int64 positions, ascending
    values: torch.Tensor  # (T + 1, m) θ0 and each θt at ``listed``, in the compute dtype
    kept: list[int]
    votes: int


def _key_pass_eager(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], keep_above: Sequence[float],
                    list_above: Sequence[float] | None, lam: float, inputs: _TiesInputs) -> _KeyPass:
    """Chunk by chunk in torch operations, on any device: what accelerators run."""
    numel = theta0.numel()
    chunk = _TIES_CHUNK.get(inputs.device.type, _TIES_DEVICE_CHUNK)
    scratch = inputs.scratch(min(chunk, numel))
    kept = [torch.zeros((), dtype=torch.float64, device=inputs.device) for _ in thetas]
    votes = torch.zeros((), dtype=torch.float64, device=inputs.device)
    out = torch.empty(numel, dtype=inputs.dtype, device=inputs.device)
    positions = []
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        base = _in_dtype(theta0[start:stop], inputs, scratch["base"][: stop - start])
        sums, counts = _trimmed_sums(base, [theta[start:stop] for theta in thetas], keep_above, list_above, inputs,
                                     scratch)
        for t, count in enumerate(counts):
            kept[t] += count
        merged, elected = _disjoint_mean(sums, 0.0)
        n_kept = sums["n_pos"] + sums["n_neg"]
        redo = n_kept * (1 - elected.abs())  # > 0 where kept values sum to 0
        if list_above is not None:
            redo += sums["listed"] - n_kept  # > 0 where some task has the entry in its bracket
        where = redo.nonzero().squeeze(1)
        votes += elected.sum() - elected[where].sum()
        positions.append(where + start)
        # METHODS §1 TIES: θ = θ0 + λ·merged
        out[start:stop] = merged.mul_(lam).add_(base)
    listed = torch.cat(positions)
    values = torch.stack([tensor.index_select(0, listed).to(inputs.dtype) for tensor in [theta0, *thetas]])
    return _KeyPass(out, listed, values, [int(count.item()) for count in kept], int(votes.item()))


def _key_pass_fused(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], keep_above: Sequence[float],
                    list_above: Sequence[float] | None, lam: float, inputs: _TiesInputs) -> _KeyPass:
    """The same pass compiled (:mod:`raymerge._ties_kernel`), on a CPU: each entry of each task read once."""
    from numba.typed import List

    from raymerge._ties_kernel import ties_tensor

    dtype = inputs.dtype
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    keep_cuts = np.asarray(keep_above, dtype=numpy_dtype)
    list_cuts = keep_cuts if list_above is None else np.asarray(list_above, dtype=numpy_dtype)  # unread if None
    consts = np.array([0.0, 1.0, lam], dtype=numpy_dtype)
    out = torch.empty(theta0.numel(), dtype=dtype)
    kept = np.zeros(len(thetas), dtype=np.int64)
    votes, positions, values = 0, [], []
    # a slice at a time, so that a checkpoint not in the compute dtype (bf16, or precision float64) is converted a
    # slice at a time rather than T + 1 whole keys; contiguous, as the typed list holds arrays of one layout
    for start in range(0, theta0.numel(), _TIES_SLICE):
        part = slice(start, start + _TIES_SLICE)
        part_votes, listed, listed_values = ties_tensor(
            theta0[part].to(dtype).contiguous().numpy(),
            List([theta[part].to(dtype).contiguous().numpy() for theta in thetas]),
            keep_cuts, list_cuts, list_above is not None, consts, _TIES_BLOCK, out[part].numpy(), kept)
        votes += part_votes
        positions.append(torch.from_numpy(listed) + start)
        values.append(torch.from_numpy(listed_values))
    return _KeyPass(out, torch.cat(positions), torch.cat(values, 1), kept.tolist(), int(votes))


def _ties_pass(
    inputs: _TiesInputs,
    keep_above: Sequence[float],
    list_above: Sequence[float] | None,
    lam: float,
    dtypes: Mapping[str, torch.dtype],
) -> _TiesPass:
    """One pass over every key: trim at ``keep_above``, elect, disjoint mean, θ0 + λ·merged.

    Lists, with their values, the entries that some task has in its bracket (``list_above[t] < |τt| ≤
    keep_above[t]``) and those whose trimmed values sum to 0 without all being 0 (their sign waits for the majority).
    """
    fused = inputs.device.type == "cpu" and inputs.numel >= _TIES_FUSED_MIN
    key_pass = _key_pass_fused if fused else _key_pass_eager
    kept, votes = [0] * len(inputs.tasks), 0
    out, listed, values = {}, {}, []
    for i, key in enumerate(inputs.keys):
        run = key_pass(inputs.base[i], [task[i] for task in inputs.tasks], keep_above, list_above, lam, inputs)
        out[key] = run.out.to(dtypes[key])
        kept = [a + b for a, b in zip(kept, run.kept)]
        votes += run.votes
        if run.listed.numel():
            listed[key] = run.listed
            values.append(run.values)
    # row by row: each row's parts are contiguous, so each is one copy
    theta0, *thetas = (torch.cat([part[row] for part in values]) if values else
                       torch.empty(0, dtype=inputs.dtype, device=inputs.device)
                       for row in range(len(inputs.tasks) + 1))
    return _TiesPass(out, listed, theta0, thetas, kept, votes)


def _redo_listed(run: _TiesPass, cuts: Sequence[float], lam: float, inputs: _TiesInputs,
                 dtypes: Mapping[str, torch.dtype]) -> None:
    """Compute the listed entries of ``run.out`` from scratch, trimming task t at ``|τt| > cuts[t]``."""
    sums, _ = _trimmed_sums(run.theta0, run.thetas, cuts, None, inputs, inputs.scratch(run.theta0.numel()))
    # released TIES code (resolve_zero_signs, "majority"): where the sum is exactly 0, the sign of the sum of the
    # elected signs over all entries; if that is 0 too the entry stays 0 and no task agrees with it
    votes = run.votes + int(torch.sign(sums["sum"]).sum().item())
    majority = float((votes > 0) - (votes < 0))
    values = _disjoint_mean(sums, majority)[0].mul_(lam).add_(run.theta0)
    offset = 0
    for key, where in run.listed.items():
        run.out[key][where] = values[offset : offset + where.numel()].to(dtypes[key])
        offset += where.numel()


def _strided_sample(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Every ``_TIES_SAMPLE_STRIDE``-th entry of ``tensors`` taken one after another, in ``dtype``."""
    parts, offset = [], 0
    for tensor in tensors:
        parts.append(tensor[-offset % _TIES_SAMPLE_STRIDE :: _TIES_SAMPLE_STRIDE].to(dtype))
        offset += tensor.numel()
    return torch.cat(parts)


def _bracket(sample: torch.Tensor, keep: int, n: int) -> tuple[float, float]:
    """(lo, hi) around the ``keep``-th largest of n magnitudes, from a uniform sample of them: hi is ∞ and lo is 0
    where the sample cannot bound that side."""
    m = sample.numel()
    rate = keep / n
    spread = _TIES_BRACKET_SIGMAS * math.sqrt(m * rate * (1 - rate)) + 1
    top, bottom = math.floor(rate * m - spread), math.ceil(rate * m + spread)  # sample ranks from the largest
    # ascending positions of the two order statistics, found by one selection (numpy's takes several kth at once)
    wanted = [index for index in (m - top, m - bottom) if 0 <= index < m]
    values = dict(zip(wanted, np.partition(sample.cpu().numpy(), wanted)[wanted].tolist())) if wanted else {}
    return values.get(m - bottom, 0.0), values.get(m - top, math.inf)


def _bracketed_threshold(magnitudes: torch.Tensor, kept: int, keep: int, lo: float, hi: float) -> float | None:
    """The ``keep``-th largest magnitude of τt, or ``None`` where it is not in [lo, hi].

    ``kept`` entries of τt are > hi; ``magnitudes`` hold |τt| wherever it may lie in [lo, hi] (and elsewhere)."""
    inside = magnitudes[(magnitudes >= lo) & (magnitudes <= hi) & (magnitudes > 0)]
    rank = keep - kept  # its rank among the entries inside
    if 1 <= rank <= inside.numel():
        return inside.kthvalue(inside.numel() - rank + 1).values.item()
    if rank > inside.numel() and lo == 0:  # only zeros are left: everything is kept
        return 0.0
    return None


def _kth_magnitude(inputs: _TiesInputs, t: int, keep: int) -> float:
    """The ``keep``-th largest |τt| by a selection over the whole task vector (the fallback: n entries in memory)."""
    magnitudes = torch.cat([(theta.to(inputs.dtype) - theta0.to(inputs.dtype)).abs_()
                            for theta0, theta in zip(inputs.base, inputs.tasks[t])])
    return magnitudes.kthvalue(magnitudes.numel() - keep + 1).values.item()


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

    Runs on θ0's device (where the fine-tuned tensors must be too), chunk by chunk (on a CPU, from 1 M entries, a
    compiled pass over slices of 1 M entries): besides the result it holds a few chunks or slices of each model and
    the entries near a threshold, never a flattened task vector. Sums over tasks run in task order and the majority
    counts signs exactly, so every entry is computed the same way whatever the chunking, the pass or the device.
    """
    lam = check_real("lam", lam)
    if not 0 < check_real("density", density) <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be torch.float32 or torch.float64, got {precision}")
    validate_with_base("ties", base, finetuned, names, min_finetuned=1)
    inputs = _ties_inputs(base, finetuned, precision)
    dtypes = dtypes_of(base)
    merged: dict[str, torch.Tensor] = {}
    n = inputs.numel
    if n:
        keep = max(1, floor_fraction(density, n))
        base_sample = _strided_sample(inputs.base, precision)
        brackets = [_bracket((_strided_sample(task, precision) - base_sample).abs_(), keep, n) for task in inputs.tasks]
        run = _ties_pass(inputs, [hi for _, hi in brackets], [_below(lo, precision) for lo, _ in brackets], lam, dtypes)
        thresholds = [
            _bracketed_threshold((theta - run.theta0).abs_(), run.kept[t], keep, lo, hi)
            for t, (theta, (lo, hi)) in enumerate(zip(run.thetas, brackets))
        ]
        if None in thresholds:  # a sample missed: exact selection for those tasks, and a pass without brackets
            thresholds = [_kth_magnitude(inputs, t, keep) if thr is None else thr for t, thr in enumerate(thresholds)]
            run = _ties_pass(inputs, [_below(thr, precision) for thr in thresholds], None, lam, dtypes)
        _redo_listed(run, [_below(thr, precision) for thr in thresholds], lam, inputs, dtypes)
        merged = {key: run.out[key].view(base[key].shape) for key in inputs.keys}
    return {key: merged[key] if key in merged else tensor.clone() for key, tensor in base.items()}


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

    return cast_to(per_key([base, *finetuned], merge_key, precision), dtypes_of(base), copy=False)


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
