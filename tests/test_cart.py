"""CART (raymerge.cart): endpoints, a float64 numpy reference (fused and split q/k/v), the selection rule on a real
open_clip ViT, SVD determinism and precision, and the plan → jobs → assemble split a distributed driver relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raymerge.cart import (
    LowRankRule,
    cart,
    cart_job,
    job_seed,
    low_rank_approx,
    plan_cart,
    rank_for,
    select_low_rank,
)
from raymerge.lowrank import Factors, Operand, assemble, low_rank_factors, run_job, run_jobs, svd
from raymerge.merge import weight_average
from raymerge.statedict import StateDictError

SHAPES = {"blocks.0.w": (12, 8), "blocks.0.b": (12,), "blocks.1.w": (5, 9), "embed": (4, 8)}
MATRICES = LowRankRule((r"blocks\.\d+\.w",))
BLOCK_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def make_models(n_finetuned: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen).to(dtype) for key, shape in SHAPES.items()}
    fts = [{key: (t + 0.3 * torch.randn(t.shape, generator=gen)).to(dtype) for key, t in base.items()}
           for _ in range(n_finetuned)]
    return base, fts


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def numpy_low_rank(matrix: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :k] @ np.diag(s[:k]) @ vh[:k]


def decaying_matrix(m: int, n: int, decay: float, seed: int = 0) -> torch.Tensor:
    """An m × n float32 matrix with singular values decay**i and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return ((u * decay ** torch.arange(n, dtype=torch.float64)) @ v.T).float()


@pytest.fixture(scope="module")
def vit_state_dict() -> dict[str, torch.Tensor]:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = json.loads((Path(__file__).parents[1] / "raymerge/model_configs/raymerge-tiny-vit.json").read_text())
    torch.manual_seed(0)
    tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
    return {key: value.detach().clone() for key, value in tower.state_dict().items()}


# --- the math -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, ratio, k",
    [((192, 64), 0.08, 5), ((100, 300), 0.29, 29), ((64, 64), 0.001, 1), ((64, 64), 0.0, 0), ((5, 9), 1.0, 5)],
)
def test_rank_for(shape, ratio, k):
    # k = max(1, ⌊ρ·min(m, n)⌋) for ρ > 0; 0.29 · 100 is 29 although the binary product is 28.999…; ρ = 0 keeps none
    assert rank_for(shape, ratio) == k


@pytest.mark.parametrize("precision", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 2.0, -0.7])
def test_full_rank_is_weight_average_for_any_lambda(dtype, lam, precision):
    base, fts = make_models(3, dtype)
    out = cart(base, fts, rank_ratio=1.0, lam=lam, rule=MATRICES, precision=precision)
    average = weight_average(fts, precision=precision)
    assert all(out[key].dtype == dtype for key in out)
    if dtype == torch.bfloat16 and precision == torch.float32:
        # Σt SVD_full(τ̄t) is 0 only up to float32 SVD rounding (~1e-7 relative), which can move a value lying that
        # close to a bfloat16 rounding boundary to the neighbouring bfloat16 number: allow one bfloat16 step
        for key in out:
            step = torch.finfo(torch.bfloat16).eps * average[key].double().abs()
            assert ((out[key].double() - average[key].double()).abs() <= step).all(), key
    else:
        torch.testing.assert_close(out, average, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 3.0])
def test_zero_rank_is_theta_avg_exactly(lam):
    base, fts = make_models(3, torch.float16)
    out, average = cart(base, fts, rank_ratio=0.0, lam=lam, rule=MATRICES), weight_average(fts)
    assert all(torch.equal(out[key], average[key]) for key in SHAPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_mid_rank_matches_numpy_svd_reference(svd, dtype):
    base, fts = make_models(3, dtype, seed=1)
    lam = 1.5
    avg = {key: np.mean([np64(ft[key]) for ft in fts], axis=0) for key in SHAPES}
    ref = dict(avg)
    # rank_ratio 0.4: blocks.0.w (12 × 8) keeps k = ⌊3.2⌋ = 3, blocks.1.w (5 × 9) keeps k = ⌊2.0⌋ = 2
    for key, k in (("blocks.0.w", 3), ("blocks.1.w", 2)):
        ref[key] = avg[key] + lam * sum(numpy_low_rank(np64(ft[key]) - avg[key], k) for ft in fts)
    out = cart(base, fts, rank_ratio=0.4, lam=lam, svd=svd, rule=MATRICES)
    # randomized: min(m, n) ≤ 2k + 10 here, so the sketch spans the whole space and the result is exact too
    for key in SHAPES:
        assert out[key].dtype == dtype
        torch.testing.assert_close(out[key], torch.from_numpy(ref[key]).to(dtype), msg=key)


def test_base_is_optional_and_only_validated():
    base, fts = make_models(2)
    with_base, without = cart(base, fts, rule=MATRICES), cart(None, fts, rule=MATRICES)
    assert all(torch.equal(with_base[key], without[key]) for key in SHAPES)


# --- q, k, v fused or split ----------------------------------------------------------------------------------------


def vit_finetunes(vit: dict[str, torch.Tensor], n: int, scale: float = 0.01, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{key: value + scale * torch.randn(value.shape, generator=gen) for key, value in vit.items()} for _ in range(n)]


def numpy_cart(fts: list[dict], rank_ratio: float, lam: float, split: bool) -> dict[str, np.ndarray]:
    """CART in float64 numpy straight from Eq. 3–4, on the four block matrices; with ``split`` each in_proj_weight is
    three d × d matrices q, k, v."""
    avg = {key: np.mean([np64(ft[key]) for ft in fts], axis=0) for key in fts[0]}
    out = dict(avg)
    for key in avg:
        if not key.endswith(BLOCK_MATRICES):
            continue
        pieces = np.split(np.arange(avg[key].shape[0]), 3) if split and key.endswith("in_proj_weight") else [None]
        parts = []
        for rows in pieces:
            rows = slice(None) if rows is None else rows
            k = max(1, int(np.floor(rank_ratio * min(avg[key][rows].shape))))
            parts.append(sum(numpy_low_rank(np64(ft[key])[rows] - avg[key][rows], k) for ft in fts))
        out[key] = avg[key] + lam * np.concatenate(parts)
    return out


@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_qkv_layouts_match_numpy_references(vit_state_dict, qkv):
    fts = vit_finetunes(vit_state_dict, 3)
    ref = numpy_cart(fts, 0.25, 1.5, split=qkv == "split")
    out = cart(vit_state_dict, fts, rank_ratio=0.25, lam=1.5, qkv=qkv, precision=torch.float64)
    for key in ref:
        np.testing.assert_allclose(np64(out[key]), ref[key].astype(np.float32), rtol=0, atol=1e-6, err_msg=key)
    other = numpy_cart(fts, 0.25, 1.5, split=qkv != "split")
    key = "transformer.resblocks.0.attn.in_proj_weight"
    assert np.abs(ref[key] - other[key]).max() > 1e-4  # the layouts do give different merges


def test_split_keeps_k_per_block_and_labels_the_parts(vit_state_dict):
    fts = vit_finetunes(vit_state_dict, 2)
    plan = plan_cart(vit_state_dict, fts, rank_ratio=0.1, qkv="split")
    key = "transformer.resblocks.2.attn.in_proj_weight"
    blocks = plan.blocks[key]
    assert [(b.label, b.start, b.stop) for b in blocks] == [(f"{key}[{p}]", 64 * i, 64 * (i + 1))
                                                            for i, p in enumerate("qkv")]
    assert {job.args[2] for job in plan.jobs if job.name[1].startswith(key)} == {6}  # ⌊0.1 · 64⌋ per part
    assert len(plan.jobs) == 2 * 4 * (3 + 3)  # per block: q, k, v + out_proj, c_fc, c_proj; 2 tasks


def test_qkv_is_checked_before_any_work():
    base, fts = make_models(2)
    with pytest.raises(ValueError, match="unknown qkv 'stacked'"):
        cart(base, fts, qkv="stacked")
    # these toy models (and Hugging Face layouts) have no fused attention projection to split
    with pytest.raises(ValueError, match="qkv='split'.*none of the 2 matrices.*no fused attention weights"):
        cart(base, fts, rule=MATRICES, qkv="split")
    odd = {**base, "attn.in_proj_weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match=r"'attn.in_proj_weight' of shape \(8, 4\).*do not split in three"):
        cart(odd, [{**ft, "attn.in_proj_weight": torch.zeros(8, 4)} for ft in fts], rule=LowRankRule((r"attn.*",)),
             qkv="split")


# --- the SVD kernel -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_svd_in_either_orientation_matches_numpy(shape):
    matrix = decaying_matrix(max(shape), min(shape), 0.9, seed=2).double()
    matrix = matrix if shape[0] >= shape[1] else matrix.T
    u, s, vh = svd(matrix)
    assert u.shape == (shape[0], 12) and vh.shape == (12, shape[1])
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(matrix.numpy(), compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), matrix.numpy(), atol=1e-12)
    np.testing.assert_allclose((u.T @ u).numpy(), np.eye(12), atol=1e-12)
    np.testing.assert_allclose((vh @ vh.T).numpy(), np.eye(12), atol=1e-12)
    left, right = low_rank_factors(matrix, 4)
    np.testing.assert_allclose((left @ right).numpy(), numpy_low_rank(matrix.numpy(), 4), atol=1e-12)


def test_float32_merge_is_within_1e_6_of_float64_on_decaying_spectra(vit_state_dict):
    # the float32 SVDs (the default) against float64 ones, relative per matrix, on task vectors with the decaying
    # spectra of real fine-tunes (σi ∝ 1/i, random singular vectors), as bench/cart.py measures at ViT-B/32 size.
    # (I.i.d. Gaussian task vectors, with no spectral decay, come out at ~1.3e-6 here: use precision=float64 there.)
    gen = torch.Generator().manual_seed(3)
    fts = []
    for _ in range(4):
        ft = {}
        for key, value in vit_state_dict.items():
            if value.ndim == 2:
                m, n = value.shape
                r = min(m, n)
                u = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
                v = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
                ft[key] = value + (u * (0.05 / torch.arange(1, r + 1))) @ v.T
            else:
                ft[key] = value + 0.01 * torch.randn(value.shape, generator=gen)
        fts.append(ft)
    for rank_ratio, lam in ((0.04, 1.0), (0.08, 1.0), (0.12, 2.0)):
        out32 = cart(vit_state_dict, fts, rank_ratio=rank_ratio, lam=lam)
        out64 = cart(vit_state_dict, fts, rank_ratio=rank_ratio, lam=lam, precision=torch.float64)
        for key in out64:
            error = (out32[key].double() - out64[key].double()).norm() / out64[key].double().norm()
            assert error.item() < 1e-6, (rank_ratio, key)


# --- which tensors are rank-reduced ---------------------------------------------------------------------------------


def test_default_rule_picks_the_block_matrices_of_an_open_clip_vit(vit_state_dict):
    expected = {f"transformer.resblocks.{i}.{name}" for i in range(4) for name in BLOCK_MATRICES}
    assert set(select_low_rank(vit_state_dict, 0.08)) == expected
    prefixed = {f"visual.{key}": value for key, value in vit_state_dict.items()}
    assert set(select_low_rank(prefixed, 0.08)) == {f"visual.{key}" for key in expected}
    # proj and positional_embedding are 2-D but not block matrices; in_proj_weight (192 × 64) keeps ⌊0.08·64⌋ = 5
    assert select_low_rank(vit_state_dict, 0.08)["transformer.resblocks.0.attn.in_proj_weight"] == 5


def test_cart_on_a_vit_leaves_unselected_tensors_at_the_average(vit_state_dict):
    gen = torch.Generator().manual_seed(1)
    fts = [{key: value + 0.01 * torch.randn(value.shape, generator=gen) for key, value in vit_state_dict.items()}
           for _ in range(3)]
    out, average = cart(vit_state_dict, fts, rank_ratio=0.08, lam=2.0), weight_average(fts)
    selected = set(select_low_rank(vit_state_dict, 0.08))
    for key in vit_state_dict:
        assert torch.equal(out[key], average[key]) != (key in selected), key


def test_custom_rules(vit_state_dict):
    assert set(select_low_rank(vit_state_dict, 0.5, LowRankRule((r"proj",)))) == {"proj"}
    assert set(select_low_rank(vit_state_dict, 0.5, lambda key, t: key.startswith("positional"))) == {
        "positional_embedding"
    }
    # a LowRankRule only ever selects 2-D tensors; a custom callable selecting anything else is an error
    assert select_low_rank(vit_state_dict, 0.5, LowRankRule((r"ln_pre\.weight",))) == {}
    with pytest.raises(ValueError, match=r"'ln_pre.weight' of shape \(64,\)"):
        select_low_rank(vit_state_dict, 0.5, lambda key, t: key == "ln_pre.weight")
    with pytest.raises(TypeError, match="not one string"):
        LowRankRule("proj")


# --- the SVD --------------------------------------------------------------------------------------------------------


def test_randomized_matches_exact_on_decaying_spectra():
    # 120 × 80 matrices, k = 8, singular values decay**i. Stated tolerance (relative Frobenius difference from the
    # exact rank-k approximation): 1e-6 for decay 0.8, 1e-3 for decay 0.9 (measured: ~5e-9 and ~2e-5 over 20 seeds).
    # In float64, so that the algorithm's error is measured rather than float32 rounding.
    for decay, tolerance in ((0.8, 1e-6), (0.9, 1e-3)):
        matrix = decaying_matrix(120, 80, decay).double()
        exact = low_rank_approx(matrix, 8)
        for seed in range(3):
            randomized = low_rank_approx(matrix, 8, "randomized", seed)
            assert ((randomized - exact).norm() / exact.norm()).item() < tolerance


def test_randomized_is_seeded_and_leaves_the_global_rng_alone():
    matrix = decaying_matrix(120, 80, 0.99)
    state = torch.random.get_rng_state()
    first = low_rank_approx(matrix, 8, "randomized", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(12345)
    assert torch.equal(low_rank_approx(matrix, 8, "randomized", seed=7), first)
    assert not torch.equal(low_rank_approx(matrix, 8, "randomized", seed=8), first)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_low_rank_approx_is_bitwise_independent_of_thread_count(svd):
    # float64 (no rounding to float32 to hide the last bits) and large enough that MKL's SVD differs between 1 and 2
    # threads without low_rank_approx's fixed thread count
    matrix = decaying_matrix(300, 200, 0.99).double()
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(low_rank_approx(matrix, 20, svd, seed=3))
            assert torch.get_num_threads() == threads  # restored after the call
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def test_low_rank_approx_edges():
    matrix = decaying_matrix(6, 4, 0.5)
    assert torch.equal(low_rank_approx(matrix, 0), torch.zeros(6, 4))
    torch.testing.assert_close(low_rank_approx(matrix, 4), matrix)
    assert low_rank_approx(matrix.double(), 2).dtype == torch.float64
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\].*got 5"):
        low_rank_approx(matrix, 5)
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(6,\)"):
        low_rank_approx(matrix[:, 0], 1)
    with pytest.raises(ValueError, match="unknown svd 'lanczos'"):
        low_rank_approx(matrix, 1, "lanczos")


# --- plan → jobs → assemble ----------------------------------------------------------------------------------------


def test_plan_lists_one_job_per_block_and_task():
    base, fts = make_models(2)
    plan = plan_cart(base, fts, rank_ratio=0.4, svd="randomized", seed=5, rule=MATRICES)
    assert [job.name for job in plan.jobs] == [
        ("cart", "blocks.0.w", 0), ("cart", "blocks.0.w", 1), ("cart", "blocks.1.w", 0), ("cart", "blocks.1.w", 1)
    ]
    # arguments: θt's block, θavg's block, k, the SVD, the per-(block, task) seed
    assert [(job.args[0].source, job.args[1].source, job.args[2:4]) for job in plan.jobs] == [
        (0, "origin", (3, "randomized")), (1, "origin", (3, "randomized")),
        (0, "origin", (2, "randomized")), (1, "origin", (2, "randomized")),
    ]
    assert [job.args[4] for job in plan.jobs] == [job_seed(5, job.name[1], job.name[2]) for job in plan.jobs]
    assert len({job.args[4] for job in plan.jobs}) == 4
    assert plan.origin["embed"].dtype == torch.float32
    assert plan_cart(base, fts, rank_ratio=0.0, rule=MATRICES).jobs == ()


def test_jobs_in_any_order_then_assemble_equals_cart_bitwise():
    base, fts = make_models(3, torch.bfloat16)
    plan = plan_cart(base, fts, rank_ratio=0.4, svd="randomized", rule=MATRICES)
    theta_avg = {key: value.clone() for key, value in plan.origin.items()}
    results = {}
    for job in reversed(plan.jobs):  # results arriving out of order, as from Ray
        results[job.name] = run_job(job, plan.sources.__getitem__, results.__getitem__)
    for lam in (1.0, 2.0):  # one plan, several λ: the plan must come back untouched
        expected = cart(base, fts, rank_ratio=0.4, lam=lam, svd="randomized", rule=MATRICES)
        out = assemble(plan, results, lam)
        assert all(torch.equal(out[key], expected[key]) for key in SHAPES)
        assert all(torch.equal(plan.origin[key], theta_avg[key]) for key in SHAPES)


def test_cart_job_is_the_low_rank_approximation_of_the_centered_block():
    base, fts = make_models(3)
    plan = plan_cart(base, fts, rank_ratio=0.4, rule=MATRICES)
    avg = np.mean([np64(ft["blocks.0.w"]) for ft in fts], axis=0)
    left, right = cart_job(fts[1]["blocks.0.w"], plan.origin["blocks.0.w"], 3, "exact", 0)
    assert left.shape == (12, 3) and right.shape == (3, 8)
    np.testing.assert_allclose(np64(left @ right), numpy_low_rank(np64(fts[1]["blocks.0.w"]) - avg, 3), atol=1e-5)


def test_assemble_rejects_missing_or_mistyped_results():
    base, fts = make_models(2)
    plan = plan_cart(base, fts, rank_ratio=0.4, rule=MATRICES)
    results = run_jobs(plan)
    incomplete = dict(results)
    del incomplete[("cart", "blocks.1.w", 1)]
    with pytest.raises(ValueError, match=r"no result for job \('cart', 'blocks.1.w', 1\) of 'blocks.1.w'"):
        assemble(plan, incomplete)
    name = ("cart", "blocks.0.w", 0)
    mistyped = {**results, name: Factors(results[name].left.double(), results[name].right.double())}
    with pytest.raises(ValueError, match="update of 'blocks.0.w' has shape .* dtype torch.float64"):
        assemble(plan, mistyped)


def test_job_seeds_are_deterministic_and_distinct():
    assert job_seed(0, "a", 0) == job_seed(0, "a", 0)
    assert len({job_seed(s, k, t) for s in (0, 1) for k in ("a", "b") for t in (0, 1)}) == 8
    assert 0 <= job_seed(-3, "a", 0) < 2**63


# --- inputs -------------------------------------------------------------------------------------------------------


def test_inputs_unmodified():
    base, fts = make_models(3)
    before = [{key: value.clone() for key, value in sd.items()} for sd in (base, *fts)]
    cart(base, fts, rank_ratio=0.5, lam=2.0, rule=MATRICES)
    for sd, old in zip((base, *fts), before):
        assert all(torch.equal(sd[key], old[key]) for key in old)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_rank_ratio_outside_unit_interval(ratio):
    base, fts = make_models(2)
    with pytest.raises(ValueError, match=f"rank_ratio.*{ratio}"):
        cart(base, fts, rank_ratio=ratio)


def test_unknown_svd():
    base, fts = make_models(2)
    with pytest.raises(ValueError, match="unknown svd 'lanczos'"):
        cart(base, fts, svd="lanczos")


def test_bad_checkpoints_are_named():
    base, fts = make_models(3)
    fts[2]["blocks.1.w"] = fts[2]["blocks.1.w"].clone()
    fts[2]["blocks.1.w"][0, 0] = float("nan")
    with pytest.raises(StateDictError, match="'blocks.1.w' of svhn contains NaN"):
        cart(base, fts, names=["mnist", "cars", "svhn"])
    fts[2]["blocks.1.w"] = torch.zeros(9, 5)
    with pytest.raises(StateDictError, match=r"'blocks.1.w' has shape \(9, 5\) in svhn"):
        cart(None, fts, names=["mnist", "cars", "svhn"])
    with pytest.raises(StateDictError, match="needs at least 2 fine-tuned models, got none"):
        cart(base, [])
