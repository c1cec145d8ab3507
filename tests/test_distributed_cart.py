"""CART's per-layer SVDs spread over Ray tasks give the single-process merge bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import random_encoder
from raymerge.cart import cart
from raymerge.workers import distributed_cart


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_distributed_equals_local(ray_local, svd):
    base = random_encoder(0)
    finetuned = [random_encoder(s, base, scale=0.05) for s in (1, 2, 3)]
    local = cart(base, finetuned, rank_ratio=0.12, lam=2.0, svd=svd, seed=7)
    remote = distributed_cart(base, finetuned, rank_ratio=0.12, lam=2.0, svd=svd, seed=7, num_cpus=0.5)
    assert set(remote) == set(local)
    for key in local:
        assert torch.equal(remote[key], local[key]), key


def test_distributed_rank_zero_is_average(ray_local):
    base = random_encoder(0)
    finetuned = [random_encoder(s, base) for s in (1, 2)]
    merged = distributed_cart(base, finetuned, rank_ratio=0.0, num_cpus=0.5)
    for key, value in merged.items():
        expected = (finetuned[0][key].double() + finetuned[1][key].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), key
