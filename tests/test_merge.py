"""Static merges (raymerge.merge) against float64 references written independently here, and hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raymerge.cart import LowRankRule
from raymerge.merge import (
    cart,
    interpolate,
    iso_c,
    iso_cts,
    model_stock,
    task_arithmetic,
    ties,
    tsv_merge,
    weight_average,
)
from raymerge.statedict import StateDictError

SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "conv": (3, 2, 2), "scale": ()}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_models(n_finetuned: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A base and ``n_finetuned`` perturbed copies, each with an integer buffer that all models share."""
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen).to(dtype) for key, shape in SHAPES.items()}
    base["steps"] = torch.tensor([3, 1, 4])
    finetuned = []
    for _ in range(n_finetuned):
        ft = {key: (base[key] + 0.5 * torch.randn(shape, generator=gen)).to(dtype) for key, shape in SHAPES.items()}
        ft["steps"] = base["steps"].clone()
        finetuned.append(ft)
    return base, finetuned


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def assert_matches(merged: dict, reference: dict, like: dict) -> None:
    """Same keys and checkpoint dtypes; floating values equal to the float64 reference at the dtype's tolerance."""
    assert list(merged) == list(like)
    for key, tensor in merged.items():
        assert tensor.dtype == like[key].dtype, key
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, torch.from_numpy(np.asarray(reference[key])).to(tensor.dtype), msg=key)
        else:
            assert torch.equal(tensor, like[key]), key


def snapshot(models):
    return [{k: v.clone() for k, v in sd.items()} for sd in models]


def assert_unchanged(models, before) -> None:
    for sd, old in zip(models, before):
        for key in old:
            assert torch.equal(sd[key], old[key]), key


# --- weight averaging, WiSE-FT, task arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_average_matches_float64_mean(dtype):
    _, fts = make_models(3, dtype)
    ref = {k: sum(np64(ft[k]) for ft in fts) / 3 for k in SHAPES}
    assert_matches(weight_average(fts), ref, fts[0])


def test_weight_average_of_one_model_is_a_copy():
    _, (ft,) = make_models(1)
    out = weight_average([ft])
    for key in ft:
        assert torch.equal(out[key], ft[key])
        assert out[key].data_ptr() != ft[key].data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, -0.5, 1.5])
def test_interpolate_matches_float64(dtype, lam):
    base, (ft,) = make_models(1, dtype)
    ref = {k: (1 - lam) * np64(base[k]) + lam * np64(ft[k]) for k in SHAPES}
    assert_matches(interpolate(base, ft, lam), ref, base)


def test_interpolate_endpoints_are_exact():
    base, (ft,) = make_models(1, torch.bfloat16)
    for lam, expected in ((0.0, base), (1.0, ft)):
        out = interpolate(base, ft, lam)
        assert all(torch.equal(out[k], expected[k]) for k in base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_float64(dtype):
    base, fts = make_models(3, dtype)
    for lam, lams in ((0.3, [0.3, 0.3, 0.3]), ([0.1, -0.2, 0.7], [0.1, -0.2, 0.7])):
        ref = {k: np64(base[k]) + sum(l * (np64(ft[k]) - np64(base[k])) for l, ft in zip(lams, fts)) for k in SHAPES}
        assert_matches(task_arithmetic(base, fts, lam), ref, base)


def test_task_arithmetic_low_rank_matches_numpy_svd():
    base, fts = make_models(2)
    lams = [0.4, 0.8]
    ref = {}
    for key in SHAPES:
        total = np.zeros(SHAPES[key])
        for l, ft in zip(lams, fts):
            tau = np64(ft[key]) - np64(base[key])
            if key == "enc.weight":  # 6 × 5, rank_ratio 0.5: k = floor(2.5) = 2
                u, s, vh = np.linalg.svd(tau, full_matrices=False)
                tau = u[:, :2] @ np.diag(s[:2]) @ vh[:2]
            total += l * tau
        ref[key] = np64(base[key]) + total
    out = task_arithmetic(base, fts, lams, rank_ratio=0.5, rule=LowRankRule((r"enc\.weight",)))
    assert_matches(out, ref, base)


def test_task_arithmetic_low_rank_endpoints():
    base, fts = make_models(2)
    rule = LowRankRule((r"enc\.weight",))
    full = task_arithmetic(base, fts, 0.3, rank_ratio=1.0, rule=rule)
    torch.testing.assert_close(full, task_arithmetic(base, fts, 0.3))
    zero = task_arithmetic(base, fts, 0.3, rank_ratio=0.0, rule=rule)
    assert torch.equal(zero["enc.weight"], base["enc.weight"])  # the rank-reduced matrix keeps θ0
    assert torch.equal(zero["enc.bias"], full["enc.bias"])  # the others keep their full task vectors


def test_task_arithmetic_lambda_length_mismatch():
    base, fts = make_models(2)
    with pytest.raises(ValueError, match="3 per-task coefficients for 2 fine-tuned models"):
        task_arithmetic(base, fts, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"lam\[1\].*nan"):
        task_arithmetic(base, fts, [0.1, float("nan")])


# --- TIES -----------------------------------------------------------------------------------------------------------


def test_ties_hand_worked_example():
    # base 1 everywhere; task vectors over keys a (4 entries) and b (2 entries), flattened a then b:
    #   τ1 = [ 4, -3,  1, 2 | 0.5, -2]    τ2 = [-4, 3, -2, 2 | 0.5, 1]
    base = {"a": torch.ones(4), "b": torch.ones(2)}
    ft1 = {"a": 1 + torch.tensor([4.0, -3, 1, 2]), "b": 1 + torch.tensor([0.5, -2])}
    ft2 = {"a": 1 + torch.tensor([-4.0, 3, -2, 2]), "b": 1 + torch.tensor([0.5, 1])}
    # density 0.5 of 6 entries keeps 3 per task: the 3rd largest magnitude is 2 in both, and magnitude 2 occurs twice,
    # so both tied entries stay (4 kept). Trimming is global: per tensor, τ1's a would have dropped its 2.
    #   trimmed1 = [ 4, -3,  0, 2 | 0, -2]   trimmed2 = [-4, 3, -2, 2 | 0, 0]
    #   sum      = [ 0,  0, -2, 4 | 0, -2]   sign = [0, 0, -1, +1, 0, -1], whose sum is -1: zero sums elect -1
    #   elected  = [-1, -1, -1, +1 | -1, -1]
    #   disjoint mean = [-4, -3, -2, 2 | 0 (no entry agrees), -2]
    # θ = 1 + 0.5 · merged
    out = ties(base, [ft1, ft2], lam=0.5, density=0.5)
    torch.testing.assert_close(out["a"], torch.tensor([-1.0, -0.5, 0.0, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([1.0, 0.0]), rtol=0, atol=0)


def test_ties_all_zero_sums_and_zero_majority_give_base():
    # both sums are 0 and so is the sum of the elected signs: no sign wins, the merged entries are 0
    base = {"w": torch.zeros(2)}
    out = ties(base, [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([-1.0, 1.0])}], density=1.0)
    assert torch.equal(out["w"], torch.zeros(2))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: unlike torch.equal, −0.0 differs from +0.0."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def ties_reference(base, fts, lam, density):
    keys = [k for k, v in base.items() if v.is_floating_point()]
    taus = [np.concatenate([(np64(ft[k]) - np64(base[k])).ravel() for k in keys]) for ft in fts]
    n = taus[0].size
    keep = max(1, math.floor(round(density * n, 9)))
    trimmed = []
    for tau in taus:
        threshold = np.sort(np.abs(tau))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
    trimmed = np.array(trimmed)
    elected = np.sign(trimmed.sum(axis=0))
    elected[elected == 0] = np.sign(elected.sum())
    merged = np.zeros(n)
    for j in range(n):
        agreeing = [v for v in trimmed[:, j] if v != 0 and np.sign(v) == elected[j]]
        merged[j] = np.mean(agreeing) if agreeing else 0.0
    ref, offset = {}, 0
    for k in keys:
        size = base[k].numel()
        ref[k] = np64(base[k]) + lam * merged[offset : offset + size].reshape(tuple(base[k].shape))
        offset += size
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_float64_reference(dtype, density):
    base, fts = make_models(4, dtype, seed=3)
    assert_matches(ties(base, fts, lam=0.7, density=density), ties_reference(base, fts, 0.7, density), base)


# TIES runs chunk by chunk and finds each threshold from a sample's bracket: none of that may show in the result.
TIES_SHAPES = {"blocks.0.w": (40, 24), "blocks.0.b": (40,), "conv": (6, 3, 5, 5), "scale": (), "blocks.1.w": (24, 40),
               "empty": (0, 3)}


def grid_models(n_finetuned, dtype=torch.float32, seed=0, sparse_last=False):
    """θ0 on a grid of 1/16 and task vectors of small multiples of 1/4, so every difference and sum is exact (float32,
    bfloat16, float64 alike): magnitudes tie often, at the thresholds too, and trimmed values often sum to exactly 0.
    ``sparse_last``: the last task vector is 90% zeros, so at density ≥ 0.1 its threshold is 0 (it keeps all)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-32, 33, s, generator=gen) / 16 for k, s in TIES_SHAPES.items()}
    finetuned = []
    for i in range(n_finetuned):
        ft = {}
        for k, s in TIES_SHAPES.items():
            tau = torch.randint(-6, 7, s, generator=gen) / 4
            if sparse_last and i == n_finetuned - 1:
                tau[torch.rand(s, generator=gen) < 0.9] = 0
            ft[k] = (base[k] + tau).to(dtype)
        ft["steps"] = torch.tensor([3, 1, 4])
        finetuned.append(ft)
    base = {k: v.to(dtype) for k, v in base.items()} | {"steps": torch.tensor([3, 1, 4])}
    return base, finetuned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize(
    "models",
    # in the second, entries listed near a threshold decide the majority sign of the zero sums (at density 0.5)
    [{"n_finetuned": 5, "seed": 7, "sparse_last": True}, {"n_finetuned": 3, "seed": 1}],
    ids=["5 tasks, one sparse", "3 tasks"],
)
def test_ties_with_ties_and_zero_sums_matches_float64_reference_in_any_chunking(monkeypatch, dtype, density, models):
    import raymerge.merge as merge

    selections = []
    exact = merge._kth_magnitude
    monkeypatch.setattr(merge, "_kth_magnitude", lambda *args: selections.append(args[1]) or exact(*args))
    base, fts = grid_models(dtype=dtype, **models)
    reference = ties_reference(base, fts, 0.7, density)
    default = ties(base, fts, lam=0.7, density=density)
    assert_matches(default, reference, base)
    # chunks of 37 entries (keys split across chunks) and a sample of every 3rd entry (a real bracket: at the
    # default stride this small model's sample is too small to bound anything, and every entry near it is listed)
    monkeypatch.setattr(merge, "_TIES_CHUNK", {"cpu": 37})
    monkeypatch.setattr(merge, "_TIES_BLOCK", 37)
    monkeypatch.setattr(merge, "_TIES_FUSED_MIN", 0)  # the compiled pass, which ViT-sized models get on a CPU
    monkeypatch.setattr(merge, "_TIES_SAMPLE_STRIDE", 3)
    small = ties(base, fts, lam=0.7, density=density)
    assert_matches(small, reference, base)
    assert all(same_bits(small[k], default[k]) for k in base)
    assert selections == []  # the brackets held (a threshold of 0 included): no full selection
    monkeypatch.setattr(merge, "_TIES_FUSED_MIN", math.inf)  # the eager pass, which accelerators and small models run
    eager = ties(base, fts, lam=0.7, density=density)
    assert all(same_bits(eager[k], default[k]) for k in base)


@pytest.mark.parametrize("dtype,precision,lam", [(torch.float32, torch.float32, 0.7), (torch.bfloat16, torch.float32, 0.7),
                                                 (torch.float32, torch.float64, 0.7), (torch.float32, torch.float32, -0.7)])
def test_ties_compiled_and_eager_passes_give_the_same_bits(monkeypatch, dtype, precision, lam):
    import raymerge.merge as merge

    # random (not grid) values, so that every sum, division and λ·merged + θ0 rounds; chunks and blocks of 37,
    # slices of 1,000 (a key over several calls of the compiled pass) and a sample of every 3rd entry, so that the
    # brackets are real and most entries come out of the pass, not its redo
    monkeypatch.setattr(merge, "_TIES_CHUNK", {"cpu": 37})
    monkeypatch.setattr(merge, "_TIES_BLOCK", 37)
    monkeypatch.setattr(merge, "_TIES_SLICE", 1000)
    monkeypatch.setattr(merge, "_TIES_FUSED_MIN", 0)
    monkeypatch.setattr(merge, "_TIES_SAMPLE_STRIDE", 3)
    gen = torch.Generator().manual_seed(5)
    shapes = {"w": (256, 96), "b": (256,), "conv": (16, 3, 7, 7)}
    base = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
           for _ in range(4)]
    # θ0 = θt = −0 at every 5th bias entry, where no task keeps anything and the result is −0 + λ·(+0): its sign
    # depends on λ's; and strided 1-D views beside contiguous ones (a state dict's tensors need not share a layout)
    for model in (base, *fts):
        model["b"][::5] = -0.0
    base["b"] = torch.stack([base["b"], base["b"]], 1)[:, 0]
    fts[1]["b"] = torch.stack([fts[1]["b"], fts[1]["b"]], 1)[:, 0]
    passes = []
    real_pass = merge._ties_pass
    monkeypatch.setattr(merge, "_ties_pass", lambda *args: passes.append(real_pass(*args)) or passes[-1])
    compiled = ties(base, fts, lam=lam, density=0.3, precision=precision)
    listed = sum(where.numel() for where in passes[-1].listed.values())
    assert 0 < listed < sum(v.numel() for v in base.values()) / 4
    zeros = compiled["b"][(compiled["b"] == 0) & (base["b"] == 0)]  # no task kept the entry: θ0 + λ·(+0)
    assert zeros.numel() and bool(torch.signbit(zeros).any()) == (lam < 0)  # −0 + (+0) is +0, −0 + (−0) is −0
    monkeypatch.setattr(merge, "_TIES_FUSED_MIN", math.inf)
    eager = ties(base, fts, lam=lam, density=0.3, precision=precision)
    assert all(same_bits(eager[k], compiled[k]) for k in base)
    assert_matches(compiled, ties_reference(base, fts, lam, 0.3), base)


def test_ties_exact_when_the_sample_misses_the_threshold(monkeypatch):
    import raymerge.merge as merge

    # every sampled entry of each task vector (stride 3: entries 0, 3, 6, ...) is small and every other one large,
    # so the sample puts the threshold far too low and the merge must select it exactly over the whole vector
    monkeypatch.setattr(merge, "_TIES_SAMPLE_STRIDE", 3)
    selections = []
    exact = merge._kth_magnitude
    monkeypatch.setattr(merge, "_kth_magnitude", lambda *args: selections.append(args[1]) or exact(*args))
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randint(-32, 33, (300,), generator=gen) / 16, "b": torch.zeros(7)}
    fts = []
    for _ in range(3):
        ft = {}
        for k, v in base.items():
            tau = torch.randint(1, 7, v.shape, generator=gen) / 4 * (2 * torch.randint(0, 2, v.shape, generator=gen) - 1)
            offset = 0 if k == "w" else 300
            sampled = (torch.arange(v.numel()) + offset) % 3 == 0
            ft[k] = v + torch.where(sampled, tau / 64, tau * 4)
        fts.append(ft)
    out = ties(base, fts, lam=0.5, density=0.3)
    assert selections == [0, 1, 2]
    assert_matches(out, ties_reference(base, fts, 0.5, 0.3), base)


def test_ties_without_floating_entries_copies_the_base():
    base = {"empty": torch.zeros(0, 4), "steps": torch.tensor([3, 1, 4])}
    out = ties(base, [{"empty": torch.zeros(0, 4), "steps": torch.tensor([3, 1, 4])}])
    assert out["empty"].shape == (0, 4) and torch.equal(out["steps"], base["steps"])
    assert out["steps"].data_ptr() != base["steps"].data_ptr()


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01, float("nan")])
def test_ties_rejects_density(density):
    base, fts = make_models(2)
    with pytest.raises(ValueError, match=f"density.*{density}"):
        ties(base, fts, density=density)


# --- Model Stock ----------------------------------------------------------------------------------------------------


def test_model_stock_hand_computed_ratios():
    s3 = math.sqrt(3)
    base = {"sixty": torch.ones(2), "orthogonal": torch.zeros(2), "same": torch.zeros(2), "zero": torch.zeros(2),
            "opposite": torch.zeros(2)}
    ft1 = {"sixty": torch.tensor([3.0, 1.0]), "orthogonal": torch.tensor([1.0, 0.0]), "same": torch.tensor([1.0, 2.0]),
           "zero": torch.tensor([0.0, 0.0]), "opposite": torch.tensor([1.0, 1.0])}
    ft2 = {"sixty": torch.tensor([1.5, 1 + s3 / 2]), "orthogonal": torch.tensor([0.0, 2.0]),
           "same": torch.tensor([2.0, 4.0]), "zero": torch.tensor([1.0, 1.0]), "opposite": torch.tensor([-1.0, -1.0])}
    out = model_stock(base, [ft1, ft2])
    # sixty: deltas [2, 0] and [0.5, √3/2] are 60° apart, cos φ = 1/2, t = 2·½ / (1 + ½) = 2/3;
    # θ = θ0 + t·(mean delta) = 1 + 2/3·[1.25, √3/4]
    torch.testing.assert_close(out["sixty"], torch.tensor([1 + 2 / 3 * 1.25, 1 + s3 / 6]))
    torch.testing.assert_close(out["orthogonal"], base["orthogonal"])  # cos 0 → t 0 → θ0
    torch.testing.assert_close(out["same"], torch.tensor([1.5, 3.0]))  # cos 1 → t 1 → mean of the fine-tuned
    torch.testing.assert_close(out["zero"], base["zero"])  # a zero delta counts as cos 0 → θ0, no NaN
    torch.testing.assert_close(out["opposite"], base["opposite"])  # cos −1 clamped to 0 → θ0, no pole


def model_stock_reference(base, fts):
    ref = {}
    n = len(fts)
    for k in SHAPES:
        deltas = [(np64(ft[k]) - np64(base[k])).ravel() for ft in fts]
        cosines = [
            deltas[i] @ deltas[j] / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j]))
            for i in range(n)
            for j in range(i + 1, n)
        ]
        c = min(max(np.mean(cosines), 0.0), 1.0)
        t = n * c / (1 + (n - 1) * c)
        ref[k] = t * np.mean([np64(ft[k]) for ft in fts], axis=0) + (1 - t) * np64(base[k])
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_stock_matches_float64_reference(dtype):
    base, fts = make_models(3, dtype, seed=5)
    # a shared direction per key makes the cosines positive, as between real fine-tunes of one task
    shared = {k: torch.randn(SHAPES[k], generator=torch.Generator().manual_seed(9)) for k in SHAPES}
    fts = [{k: (v + shared[k]).to(dtype) if k in SHAPES else v for k, v in ft.items()} for ft in fts]
    assert_matches(model_stock(base, fts), model_stock_reference(base, fts), base)


# --- every merge: precision, inputs untouched, validation ---------------------------------------------------------

MERGES = {
    "weight_average": lambda base, fts, **kw: weight_average(fts, **kw),
    "interpolate": lambda base, fts, **kw: interpolate(base, fts[0], 0.4, **kw),
    "task_arithmetic": lambda base, fts, **kw: task_arithmetic(base, fts, 0.3, **kw),
    "task_arithmetic_low_rank": lambda base, fts, **kw: task_arithmetic(
        base, fts, 0.3, rank_ratio=0.4, rule=LowRankRule((r"enc\.weight",)), **kw
    ),
    "ties": lambda base, fts, **kw: ties(base, fts, **kw),
    "model_stock": lambda base, fts, **kw: model_stock(base, fts, **kw),
    "cart": lambda base, fts, **kw: cart(base, fts, 0.4, rule=LowRankRule((r"enc\.weight",)), **kw),
    "tsv_merge": lambda base, fts, **kw: tsv_merge(base, fts, **kw),
    "iso_c": lambda base, fts, **kw: iso_c(base, fts, **kw),
    "iso_cts": lambda base, fts, **kw: iso_cts(base, fts, 0.7, 0.5, **kw),
}


@pytest.mark.parametrize("name", MERGES)
def test_inputs_unmodified_and_outputs_fresh(name):
    base, fts = make_models(3)
    before = snapshot([base, *fts])
    out = MERGES[name](base, fts)
    assert_unchanged([base, *fts], before)
    inputs = {t.data_ptr() for sd in (base, *fts) for t in sd.values()}
    assert not inputs & {t.data_ptr() for t in out.values()}


@pytest.mark.parametrize("name", MERGES)
def test_float64_precision_keeps_checkpoint_dtype(name):
    base, fts = make_models(3, torch.bfloat16)
    out32, out64 = MERGES[name](base, fts), MERGES[name](base, fts, precision=torch.float64)
    for key in base:
        assert out64[key].dtype == base[key].dtype
    torch.testing.assert_close(out32, out64)
    with pytest.raises(ValueError, match="precision"):
        MERGES[name](base, fts, precision=torch.float16)


def labelled(name, base, fts):
    """Call a merge with the fine-tuned models named ft0, ft1, ... (interpolate names its own: theta0, theta1)."""
    names = [f"ft{i}" for i in range(len(fts))]
    if name == "weight_average":
        return weight_average(fts, names=names)
    if name == "interpolate":
        return interpolate(base, fts[0], 0.4)
    return MERGES[name](base, fts, names=names)


def culprit(name, fts):
    """The model to corrupt and the label the error must give it: never the reference model (the first one)."""
    if name == "weight_average":
        return fts[1], "ft1"
    return fts[0], "theta1" if name == "interpolate" else "ft0"


@pytest.mark.parametrize("name", MERGES)
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("enc.bias"), "'enc.bias'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "'extra'"),
        (lambda sd: sd.update({"conv": torch.zeros(3, 4)}), r"'conv' has shape \(3, 4\)"),
        (lambda sd: sd.update({"conv": sd["conv"].double()}), "'conv' has dtype torch.float64"),
        (lambda sd: sd["enc.weight"].__setitem__((1, 2), float("nan")), "'enc.weight'.*NaN"),
        (lambda sd: sd["scale"].fill_(float("inf")), "'scale'.*Inf"),
        (lambda sd: sd.update(steps=torch.tensor([3, 1, 5])), "'steps'"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf", "nonfloat"],
)
def test_bad_checkpoints_name_key_and_model(name, change, message):
    base, fts = make_models(2)
    model, label = culprit(name, fts)
    change(model)
    with pytest.raises(StateDictError, match=message) as err:
        labelled(name, base, fts)
    assert label in str(err.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda base, fts: weight_average([]), "empty list"),
        (lambda base, fts: task_arithmetic(base, []), "task_arithmetic needs at least 1 fine-tuned models, got none"),
        (lambda base, fts: ties(base, []), "ties needs at least 1"),
        (lambda base, fts: model_stock(base, fts[:1]), r"model_stock needs at least 2 fine-tuned models, got 1 \("),
        (lambda base, fts: cart(base, fts[:1]), r"cart needs at least 2 fine-tuned models, got 1 \(finetuned 0\)"),
        (lambda base, fts: tsv_merge(base, []), "tsv_merge needs at least 1 fine-tuned models, got none"),
        (lambda base, fts: iso_c(base, []), "iso_c needs at least 1 fine-tuned models, got none"),
        (lambda base, fts: iso_cts(base, []), "iso_cts needs at least 1 fine-tuned models, got none"),
    ],
    ids=["weight_average", "task_arithmetic", "ties", "model_stock", "cart", "tsv_merge", "iso_c", "iso_cts"],
)
def test_too_few_models(call, message):
    base, fts = make_models(2)
    with pytest.raises(StateDictError, match=message):
        call(base, fts)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), "0.3", None])
def test_coefficients_must_be_finite_reals(lam):
    base, fts = make_models(2)
    calls = (lambda: interpolate(base, fts[0], lam), lambda: ties(base, fts, lam=lam), lambda: cart(base, fts, lam=lam),
             lambda: tsv_merge(base, fts, lam), lambda: iso_c(base, fts, lam), lambda: iso_cts(base, fts, lam))
    for call in calls:
        with pytest.raises(ValueError, match=f"lam must be a finite real number, got {lam!r}"):
            call()
