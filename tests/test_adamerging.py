"""AdaMerging and CART++ (raymerge.adamerging): the entropy's gradient against central finite differences in float64,
the loss against an independent evaluation (a rebuilt encoder, scipy's entropy), the merged state dicts against the
formulas written here in numpy, seeded and clamped coefficients, and the settings' and inputs' checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from conftest import ARCH, random_encoder
from raymerge import models
from raymerge.adamerging import (
    AdaptSettings,
    LowRankMerge,
    TaskVectorMerge,
    adapt,
    entropy,
    entropy_step,
    sample_batches,
)
from raymerge.cart import cart, plan_cart
from raymerge.lowrank import run_jobs

TASKS = ("even", "digits")


@pytest.fixture(scope="module")
def pool():
    base = random_encoder(0)
    return base, [random_encoder(seed, base, scale=0.05) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def task_data():
    gen = torch.Generator().manual_seed(4)
    heads = {task: models.Head(torch.randn(classes, 64, generator=gen), 0.1 * torch.randn(classes, generator=gen),
                               tuple(map(str, range(classes))))
             for task, classes in zip(TASKS, (2, 10))}
    images = {task: torch.randn(n, 3, 16, 16, generator=gen) for task, n in zip(TASKS, (40, 24))}
    return heads, images


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def double_heads(heads):
    return {task: models.Head(h.weight.double(), h.bias.double(), h.class_names) for task, h in heads.items()}


def cart_pp_merge(base, fts, precision=torch.float64, granularity="layer", qkv="fused"):
    plan = plan_cart(base, fts, rank_ratio=0.25, qkv=qkv, precision=precision)
    return plan, LowRankMerge(plan, run_jobs(plan), granularity)


def test_entropy_matches_scipy():
    logits = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    p = scipy.special.softmax(logits.numpy(), axis=1)
    np.testing.assert_allclose(entropy(logits).numpy(), scipy.special.entr(p).sum(axis=1), rtol=1e-13)


@pytest.mark.parametrize("kind", ["adamerging-layer", "adamerging-task", "cart_pp-layer", "cart_pp-split"])
def test_gradient_matches_central_differences(pool, task_data, kind):
    base, fts = pool
    heads, images = task_data
    if kind.startswith("adamerging"):
        merge = TaskVectorMerge(base, fts, kind.split("-")[1], precision=torch.float64)
    else:
        merge = cart_pp_merge(base, fts, qkv="split" if kind.endswith("split") else "fused")[1]
    encoder = models.build_encoder(ARCH).double().eval()
    batches = {task: [images[task][:6].double(), images[task][6:10].double()] for task in TASKS}
    heads = double_heads(heads)
    gen = torch.Generator().manual_seed(1)
    point = (0.2 + 0.3 * torch.rand(merge.coefficient_shape, generator=gen, dtype=torch.float64))
    coefficients = point.clone().requires_grad_()
    loss = entropy_step(encoder, merge, heads, batches, coefficients)
    assert loss > 0
    grad = coefficients.grad
    tasks, groups = merge.coefficient_shape
    picks = {(t, g) for t in range(tasks) for g in (0, groups // 2, groups - 1)}
    h = 1e-5
    for t, g in sorted(picks):
        step = torch.zeros_like(point)
        step[t, g] = h
        up = entropy_step(encoder, merge, heads, batches, point + step)
        down = entropy_step(encoder, merge, heads, batches, point - step)
        estimate = (up - down) / (2 * h)
        assert abs(estimate - grad[t, g].item()) <= 1e-6 * abs(estimate) + 1e-10, (merge.layers[g], t)
    assert grad.abs().sum() > 0


def test_loss_matches_an_independent_evaluation(pool, task_data):
    # the merged weights by the formula in numpy, loaded into a fresh encoder; entropies by scipy
    base, fts = pool
    heads, images = task_data
    merge = TaskVectorMerge(base, fts, precision=torch.float64)
    lam = 0.1 + 0.5 * torch.rand(merge.coefficient_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batches = {task: [images[task][:8].double(), images[task][8:12].double()] for task in TASKS}
    loss = entropy_step(models.build_encoder(ARCH).double(), merge, double_heads(heads), batches, lam)

    merged = {}
    for index, key in enumerate(merge.layers):
        taus = [np64(ft[key]) - np64(base[key]) for ft in fts]
        merged[key] = torch.from_numpy(np64(base[key]) + sum(lam[t, index].item() * tau for t, tau in enumerate(taus)))
    encoder = models.build_encoder(ARCH).double().eval()
    encoder.load_state_dict(merged)
    means = []
    with torch.no_grad():
        for task in TASKS:
            head = heads[task]
            for x in batches[task]:
                features = encoder(x).numpy()
                features = features / np.linalg.norm(features, axis=1, keepdims=True)
                logits = features @ np64(head.weight).T + np64(head.bias)
                means.append(scipy.special.entr(scipy.special.softmax(logits, axis=1)).sum(axis=1).mean())
    assert loss == pytest.approx(float(np.mean(means)), rel=1e-12)


def test_adapt_is_seeded_clamped_and_logged(pool, task_data):
    base, fts = pool
    heads, images = task_data
    merge = TaskVectorMerge(base, fts, "layer")
    # a large step size pushes coefficients past [0, 1]
    settings = AdaptSettings(steps=3, lr=0.3, batch_size=8, batches_per_step=1)
    log = []
    first = adapt(models.build_encoder(ARCH), merge, heads, images, settings, seed=3,
                  on_step=lambda step, loss, c: log.append((step, loss, c)))
    again = adapt(models.build_encoder(ARCH), merge, heads, images, settings, seed=3)
    other = adapt(models.build_encoder(ARCH), merge, heads, images, settings, seed=4)
    assert first.coefficients.shape == (3, len(merge.layers)) and first.layers == merge.layers
    assert torch.equal(first.coefficients, again.coefficients) and first.losses == again.losses
    assert not torch.equal(first.coefficients, other.coefficients)
    c = first.coefficients
    assert ((c >= 0) & (c <= 1)).all()
    assert ((c == 0) | (c == 1)).any()  # the clamp was reached, so the range check above could have failed
    assert [entry[0] for entry in log] == [0, 1, 2] and [entry[1] for entry in log] == first.losses
    assert torch.equal(log[-1][2], first.coefficients)
    assert first.losses[-1] < first.losses[0]


def test_cart_pp_starts_at_cart_and_is_not_clamped(pool, task_data):
    base, fts = pool
    heads, images = task_data
    plan, merge = cart_pp_merge(base, fts, precision=torch.float32)
    settings = AdaptSettings.for_cart_pp(2.0, steps=2, lr=0.05, batch_size=4)
    assert settings.init == 2.0 and settings.clamp is None
    at_init = merge.state_dict(torch.full(merge.coefficient_shape, 2.0))
    expected = cart(base, fts, rank_ratio=0.25, lam=2.0)
    for key in expected:
        torch.testing.assert_close(at_init[key], expected[key], rtol=1e-6, atol=1e-6)
    result = adapt(models.build_encoder(ARCH), merge, heads, images, settings, seed=0)
    assert (result.coefficients > 1).all()  # far outside [0, 1]: no clamp
    assert not torch.equal(result.coefficients, torch.full(merge.coefficient_shape, 2.0))


def test_state_dicts_at_learned_coefficients_equal_the_formulas(pool, task_data):
    base, fts = pool
    heads, images = task_data
    settings = AdaptSettings(steps=2, lr=0.05, batch_size=4)

    ada = TaskVectorMerge(base, fts, "task", precision=torch.float64)
    lam = adapt(models.build_encoder(ARCH), ada, heads, images, settings).coefficients
    assert lam.shape == (3, 1)
    merged = ada.state_dict(lam)
    for key, theta0 in base.items():
        # AdaMerging: θ = θ0 + Σt λt τt
        expected = np64(theta0) + sum(lam[t, 0].item() * (np64(ft[key]) - np64(theta0)) for t, ft in enumerate(fts))
        np.testing.assert_allclose(np64(merged[key]), expected, rtol=1.2e-7, atol=1e-9, err_msg=key)

    plan, cpp = cart_pp_merge(base, fts)
    lam = adapt(models.build_encoder(ARCH), cpp, heads, images, AdaptSettings.for_cart_pp(1.0, steps=2, lr=0.05,
                                                                                         batch_size=4)).coefficients
    merged = cpp.state_dict(lam)
    layers = {key: index for index, key in enumerate(cpp.layers)}
    for key in base:
        avg = np.mean([np64(ft[key]) for ft in fts], axis=0)
        expected = avg
        if key in layers:
            k = max(1, int(0.25 * min(avg.shape)))
            for t, ft in enumerate(fts):
                u, s, vt = np.linalg.svd(np64(ft[key]) - avg, full_matrices=False)
                # CART++ Eq. 6: θl = θavg,l + Σt λt,l SVDk(θt,l − θavg,l)
                expected = expected + lam[t, layers[key]].item() * (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(np64(merged[key]), expected, rtol=1.2e-7, atol=1e-9, err_msg=key)


def test_task_by_task_gradients_add_up(pool, task_data):
    # one backward per task, accumulated: the gradient of a two-task loss is the mean of the one-task gradients
    base, fts = pool
    heads, images = task_data
    merge = TaskVectorMerge(base, fts, precision=torch.float64)
    encoder, heads = models.build_encoder(ARCH).double(), double_heads(heads)
    batches = {task: [images[task][:5].double()] for task in TASKS}
    point = torch.full(merge.coefficient_shape, 0.3, dtype=torch.float64)
    grads = []
    for chosen in (TASKS, TASKS[:1], TASKS[1:]):
        c = point.clone().requires_grad_()
        entropy_step(encoder, merge, heads, {task: batches[task] for task in chosen}, c)
        grads.append(c.grad)
    # the loss is a mean over batches: two one-batch tasks weigh 1/2 each
    torch.testing.assert_close(grads[0], (grads[1] + grads[2]) / 2, rtol=1e-10, atol=1e-14)


def test_sampling_draws_without_replacement_per_step(task_data):
    _, images = task_data
    settings = AdaptSettings(batch_size=16, batches_per_step=2)
    batches = sample_batches(images, settings, torch.Generator().manual_seed(0))
    assert [b.shape[0] for b in batches["even"]] == [16, 16]
    assert [b.shape[0] for b in batches["digits"]] == [16, 8]  # 24 images: all of them, once
    rows = torch.cat(batches["digits"]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] == 24


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite real"),
        ({"steps": 0}, "steps must be an integer ≥ 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"batch_size": 0}, "batch_size must be an integer ≥ 1"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in"),
        ({"clamp": (1.0, 0.0)}, "low < high"),
        ({"init": 2.0}, r"init 2.0 lies outside clamp \(0.0, 1.0\)"),
    ],
)
def test_settings_out_of_range(changes, message):
    with pytest.raises(ValueError, match=message):
        AdaptSettings(**changes)


def test_bad_inputs_fail_before_work(pool, task_data):
    base, fts = pool
    heads, images = task_data
    merge = TaskVectorMerge(base, fts)
    encoder = models.build_encoder(ARCH)
    with pytest.raises(ValueError, match="no test images to adapt on"):
        adapt(encoder, merge, heads, {})
    with pytest.raises(ValueError, match="task 'digits' has no test images"):
        adapt(encoder, merge, heads, {**images, "digits": images["digits"][:0]})
    with pytest.raises(ValueError, match="task 'odd' has test images but no head"):
        adapt(encoder, merge, heads, {"odd": images["even"]})
    with pytest.raises(ValueError, match="unknown granularity 'block'"):
        TaskVectorMerge(base, fts, "block")
    with pytest.raises(ValueError, match=r"coefficients have shape \(3, 2\)"):
        merge.state_dict(torch.zeros(3, 2))
    empty = plan_cart(base, fts, rank_ratio=0.0)
    with pytest.raises(ValueError, match="CART plan has none"):
        LowRankMerge(empty, {})
