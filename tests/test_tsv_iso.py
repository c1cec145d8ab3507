"""TSV-M (raymerge.tsv), Iso-C and Iso-CTS (raymerge.iso) against float64 references written here from the papers'
equations (numpy SVDs, scipy's polar decomposition), fused and split q/k/v, on tiny-ViT-shaped state dicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from conftest import random_encoder
from raymerge.iso import iso_cts_dims, plan_iso_cts
from raymerge.lowrank import LowRankRule
from raymerge.merge import iso_c, iso_cts, task_arithmetic, tsv_merge
from raymerge.tsv import plan_tsv_merge

LAM = 0.7


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    # numpy's OpenBLAS on a shared 2-core machine runs these small SVDs ~50× slower multi-threaded
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def pool():
    base = random_encoder(0)
    return base, [random_encoder(seed, base, scale=0.05) for seed in (1, 2, 3)]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def top(matrix: np.ndarray, k: int):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vt[:k].T


def orthogonal(matrix: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor (scipy), the nearest matrix with orthonormal columns (or rows)."""
    return scipy.linalg.polar(matrix)[0]


def ref_tsv(taus: list[np.ndarray]) -> np.ndarray:
    # TSV-M: each Δt keeps its top ⌊r/T⌋ triplets; Δ = polar(U) Σ polar(V)ᵀ over the concatenations
    k = min(taus[0].shape) // len(taus)
    parts = [top(tau, k) for tau in taus]
    u = np.hstack([p[0] for p in parts])
    s = np.concatenate([p[1] for p in parts])
    v = np.hstack([p[2] for p in parts])
    return orthogonal(u) @ np.diag(s) @ orthogonal(v).T


def ref_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    # Iso-C: Σt Δt = U Σ Vᵀ → mean(σ) U Vᵀ, and U Vᵀ is the polar factor of Σt Δt
    total = sum(taus)
    return np.linalg.svd(total, compute_uv=False).mean() * orthogonal(total)


def ref_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    r, t = min(taus[0].shape), len(taus)
    per_task = min(round((r - math.floor(r * fraction)) / t), r // t)
    uc, sc, vc = top(sum(taus), r - t * per_task)
    us, ss, vs = [uc], [sc], [vc]  # common first here (the released code puts it last: the product is the same)
    for tau in taus:
        u, s, v = top(tau - uc @ uc.T @ tau, per_task)
        us.append(u), ss.append(s), vs.append(v)
    s = np.concatenate(ss)
    return s.mean() * orthogonal(np.hstack(us)) @ orthogonal(np.hstack(vs)).T


def reference(base, fts, merge_matrix, split: bool, lam: float = LAM) -> dict[str, np.ndarray]:
    """θ0 + λ·merge_matrix(task matrices) on every 2-D tensor (q, k, v apart with ``split``), θ0 + λ·mean τ elsewhere."""
    out = {}
    for key, theta0 in base.items():
        taus = [np64(ft[key]) - np64(theta0) for ft in fts]
        if theta0.ndim != 2:
            out[key] = np64(theta0) + lam * np.mean(taus, axis=0)
            continue
        thirds = split and key.endswith("attn.in_proj_weight")
        pieces = [np.split(tau, 3) for tau in taus] if thirds else [[tau] for tau in taus]
        delta = np.concatenate([merge_matrix([p[i] for p in pieces]) for i in range(len(pieces[0]))])
        out[key] = np64(theta0) + lam * delta
    return out


METHODS = {
    "tsv_merge": (lambda base, fts, qkv, **kw: tsv_merge(base, fts, LAM, qkv, **kw), ref_tsv),
    "iso_c": (lambda base, fts, qkv, **kw: iso_c(base, fts, LAM, qkv, **kw), ref_iso_c),
    "iso_cts": (lambda base, fts, qkv, **kw: iso_cts(base, fts, LAM, 0.8, qkv, **kw),
                lambda taus: ref_iso_cts(taus, 0.8)),
}


@pytest.mark.parametrize("qkv", ["fused", "split"])
@pytest.mark.parametrize("method", METHODS)
def test_matches_float64_reference(pool, method, qkv):
    base, fts = pool
    merge, merge_matrix = METHODS[method]
    ref = reference(base, fts, merge_matrix, split=qkv == "split")
    out64 = merge(base, fts, qkv, precision=torch.float64)
    out32 = merge(base, fts, qkv)
    for key, expected in ref.items():
        assert out64[key].dtype == out32[key].dtype == torch.float32
        # float64 arithmetic: only the final rounding to float32 remains (half a float32 ulp, 2^-24 relative)
        np.testing.assert_allclose(np64(out64[key]), expected, rtol=1.2e-7, atol=1e-9, err_msg=key)
        # the default float32 SVDs on these i.i.d. Gaussian task vectors (flat spectra: the truncations at k are
        # ill-conditioned, the worst case for float32): measured at most 8.3e-6 (TSV-M), updates are up to 0.27
        np.testing.assert_allclose(np64(out32[key]), expected, rtol=0, atol=2e-5, err_msg=key)


def test_the_layouts_give_different_merges(pool):
    base, fts = pool
    key = "transformer.resblocks.1.attn.in_proj_weight"
    for method, (merge, _) in METHODS.items():
        fused, split = merge(base, fts, "fused"), merge(base, fts, "split")
        assert (fused[key] - split[key]).abs().max() > 1e-3, method
        assert torch.equal(fused["proj"], split["proj"]), method  # matrices other than in_proj are untouched


def test_one_task_tsv_is_task_arithmetic(pool):
    # T = 1: k = r, and the polar factors of U and V are U and V themselves
    base, fts = pool
    merged, expected = tsv_merge(base, fts[:1], LAM, precision=torch.float64), task_arithmetic(base, fts[:1], LAM)
    torch.testing.assert_close(merged, expected, rtol=0, atol=2e-6)


def test_full_common_space_is_iso_c(pool):
    base, fts = pool
    plan = plan_iso_cts(base, fts, common_space_fraction=1.0)
    assert not [job for job in plan.jobs if job.name[0] == "iso_cts.task"]
    merged, expected = iso_cts(base, fts, LAM, 1.0, precision=torch.float64), iso_c(base, fts, LAM, precision=torch.float64)
    torch.testing.assert_close(merged, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "rank, tasks, fraction, dims",
    [
        (768, 8, 0.8, (616, 19)),  # kc0 = 614, s = round(19.25) = 19
        (768, 20, 0.8, (608, 8)),  # s = round(7.7) = 8
        (17, 3, 0.8, (14, 1)),     # positional_embedding of the tiny ViT
        (64, 8, 0.9, (56, 1)),     # kc0 = ⌊57.6⌋ = 57, s = round(0.875) = 1, kc = 64 − 8
        (5, 3, 0.0, (2, 1)),       # round(5/3) = 2 would need 6 > 5 directions: capped at ⌊5/3⌋ = 1
        (10, 4, 0.8, (10, 0)),     # round(2/4) = round(0.5) = 0 (half to even, as Python's round)
        (64, 8, 1.0, (64, 0)),
    ],
)
def test_iso_cts_subspace_sizes(rank, tasks, fraction, dims):
    assert iso_cts_dims(rank, tasks, fraction) == dims


def test_plans_list_the_stages(pool):
    base, fts = pool
    tsv = plan_tsv_merge(base, fts, "split")
    key = "transformer.resblocks.0.attn.in_proj_weight"
    names = [job.name for job in tsv.jobs if job.name[1] == f"{key}[k]"]
    assert names == [("tsv.task", f"{key}[k]", t) for t in range(3)] + [("tsv", f"{key}[k]")]
    assert [job.args[2] for job in tsv.jobs if job.name[0] == "tsv.task" and job.name[1] == "proj"] == [21] * 3
    assert "conv1.weight" in tsv.dense and "positional_embedding" in tsv.blocks
    cts = plan_iso_cts(base, fts)
    assert [job.name[0] for job in cts.jobs if job.name[1] == "proj"] == ["iso_cts.common"] + ["iso_cts.task"] * 3 + [
        "iso_cts"]


def test_bad_arguments_fail_before_any_svd(pool):
    base, fts = pool
    for call in (lambda: tsv_merge(base, fts, qkv="qkv"), lambda: iso_c(base, fts, qkv="qkv"),
                 lambda: iso_cts(base, fts, qkv="qkv")):
        with pytest.raises(ValueError, match="unknown qkv 'qkv'"):
            call()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="common_space_fraction"):
            iso_cts(base, fts, common_space_fraction=bad)
    no_attention = LowRankRule((r"proj",))
    with pytest.raises(ValueError, match="qkv='split'.*no fused attention weights"):
        tsv_merge(base, fts, qkv="split", rule=no_attention)
    many = [fts[0]] * 18  # the positional embedding has rank 17
    with pytest.raises(ValueError, match=r"'positional_embedding' has rank r = 17 < T = 18"):
        tsv_merge(base, many)
