"""TIES's pass over one tensor of a CPU merge, fused into one compiled loop (private; see :func:`raymerge.merge.ties`).

Eager torch makes about 18 elementwise passes per task over each chunk (trim both signs, four running sums, counts,
the bracket listing), which put TIES at 25–100 model copies at ViT-B/32 size. Compiled, each entry of each task is
read once and the running sums stay in cache, which is what issue 16's "within 10× of one model copy" needs.
torch.compile would fuse it too, but costs ~17 s per process and task count and a C++ compiler on every node;
numba compiles this loop once per machine and compute dtype (cached beside this file, or in numba's user cache
where this directory is read-only) for any task count, in 6–8 s; a new process loads it in 1–2 s, so small models
stay eager.

The arithmetic is :func:`raymerge.merge._trimmed_sums` and :func:`raymerge.merge._disjoint_mean` (the eager form,
which accelerators run) operation for operation, in the same dtype and order, so both give the same bits
(``tests/test_merge.py`` checks it on inputs full of ties and zero sums).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# error_model="numpy": no ZeroDivisionError branch per division (the divisors are clamped to ≥ 1), so the loops
# vectorize
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def ties_tensor(theta0, thetas, keep_above, list_above, listing, consts, block, out, kept):
    """One flattened tensor: ``out`` (n,) = θ0 + λ·merged, and the positions to compute again.

    ``theta0`` (n,), ``thetas`` a numba typed list of T arrays (n,), ``keep_above`` and ``list_above`` (T,), ``consts``
    (0, 1, λ) and ``out``: all in the compute dtype. Task t keeps ``τt > keep_above[t]`` and ``−τt > keep_above[t]``;
    with ``listing``, an entry is listed where some task has ``list_above[t] < |τt| ≤ keep_above[t]``, and (always)
    where kept values sum to 0 without all being 0. ``kept`` (T,) int64 is increased by each task's kept non-zero
    entries; ``block`` entries are summed at a time (they stay in cache). Returns (Σ elected signs over the entries
    not listed, the listed positions (m,) int64, ascending, and θ0 and each θt there (T + 1, m)).
    """
    zero, one, lam = consts[0], consts[1], consts[2]
    n = theta0.size
    total = np.empty(block, theta0.dtype)
    pos = np.empty(block, theta0.dtype)
    neg = np.empty(block, theta0.dtype)
    n_pos = np.empty(block, theta0.dtype)
    n_neg = np.empty(block, theta0.dtype)
    redo = np.empty(block, theta0.dtype)
    positions = np.empty(256, np.int64)
    values = np.empty((len(thetas) + 1, 256), theta0.dtype)
    block_listed = np.empty(block, np.int64)
    listed = 0
    votes = 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        c = stop - start
        base = theta0[start:stop]
        total[:c] = zero
        pos[:c] = zero
        neg[:c] = zero
        n_pos[:c] = zero
        n_neg[:c] = zero
        redo[:c] = zero
        for t in range(len(thetas)):
            theta = thetas[t][start:stop]
            cut, list_cut = keep_above[t], list_above[t]
            count = 0
            for i in range(c):
                tau = theta[i] - base[i]
                up = tau if tau > cut else zero
                down = -tau if -tau > cut else zero
                total[i] = (total[i] + up) - down
                pos[i] += up
                neg[i] += down
                n_pos[i] += one if up > zero else (-one if up < zero else zero)
                n_neg[i] += one if down > zero else (-one if down < zero else zero)
                count += (up != zero) + (down != zero)
                if listing:
                    magnitude = abs(tau)
                    redo[i] += one if (magnitude > list_cut and magnitude > zero) else zero
            kept[t] += count
        chunk_out = out[start:stop]
        for i in range(c):
            s = total[i]
            elected = one if s > zero else (-one if s < zero else zero)
            # pos/max(n_pos, 1)·up − neg/max(n_neg, 1)·down with up, down ∈ {0, 1}: one of the two terms, or +0
            if s > zero:
                merged = pos[i] / (n_pos[i] if n_pos[i] > one else one)
            elif s < zero:
                merged = zero - neg[i] / (n_neg[i] if n_neg[i] > one else one)
            else:
                merged = zero
            n_kept = n_pos[i] + n_neg[i]
            # > 0 where kept values sum to 0, or (listing) where some task has the entry in its bracket
            again = n_kept * (one - abs(elected))
            if listing:
                again += redo[i] - n_kept
            redo[i] = again
            votes += int(elected)
            chunk_out[i] = merged * lam + base[i]
        # the listed positions, compacted without a branch (a few percent of entries, scattered: a branch per entry
        # mispredicts), apart from the loop above so that it vectorizes; θ0 and each θt there, while they are in cache
        m = 0
        for i in range(c):
            block_listed[m] = i
            m += redo[i] != zero
        if listed + m > positions.size:
            size = max(2 * positions.size, listed + m)
            grown = np.empty(size, np.int64)
            grown[:listed] = positions[:listed]
            positions = grown
            grown_values = np.empty((len(thetas) + 1, size), theta0.dtype)
            grown_values[:, :listed] = values[:, :listed]
            values = grown_values
        for j in range(m):
            i = block_listed[j]
            positions[listed + j] = start + i
            values[0, listed + j] = base[i]
            votes -= 1 if total[i] > zero else (-1 if total[i] < zero else 0)
        for t in range(len(thetas)):
            theta = thetas[t][start:stop]
            for j in range(m):
                values[t + 1, listed + j] = theta[block_listed[j]]
        listed += m
    return votes, positions[:listed], values[:, :listed]
