"""The low-rank merges' SVD jobs spread over Ray tasks give the single-process merge bit for bit: CART, TSV-M,
Iso-C and Iso-CTS, fused and split q/k/v."""

from __future__ import annotations

import pytest
import torch

from conftest import random_encoder
from raymerge.cart import cart
from raymerge.merge import iso_c, iso_cts, tsv_merge
from raymerge.workers import distributed_cart, distributed_low_rank


@pytest.fixture(scope="module")
def pool():
    base = random_encoder(0)
    return base, [random_encoder(s, base, scale=0.05) for s in (1, 2, 3)]


def assert_bitwise_equal(remote: dict, local: dict) -> None:
    assert set(remote) == set(local)
    for key in local:
        assert remote[key].dtype == local[key].dtype, key
        assert torch.equal(remote[key], local[key]), key


def test_bad_arguments_fail_before_ray_work(pool):
    # first in this file and without ray_local: validation must raise before anything would start Ray or use it
    import ray

    started = ray.is_initialized()
    base, finetuned = pool
    with pytest.raises(ValueError, match="unknown qkv"):
        distributed_cart(base, finetuned, qkv="qkv")
    with pytest.raises(ValueError, match="common_space_fraction"):
        distributed_low_rank("iso_cts", base, finetuned, common_space_fraction=2.0)
    with pytest.raises(ValueError, match="lam must be a finite real number"):
        distributed_low_rank("tsv_merge", base, finetuned, lam=float("nan"))
    with pytest.raises(ValueError, match="unknown low-rank method 'tsv'"):
        distributed_low_rank("tsv", base, finetuned)
    assert ray.is_initialized() == started


@pytest.mark.parametrize("svd, qkv", [("exact", "fused"), ("randomized", "fused"), ("exact", "split")])
def test_distributed_cart_equals_local(ray_local, pool, svd, qkv):
    base, finetuned = pool
    local = cart(base, finetuned, rank_ratio=0.12, lam=2.0, svd=svd, seed=7, qkv=qkv)
    remote = distributed_cart(base, finetuned, rank_ratio=0.12, lam=2.0, svd=svd, seed=7, num_cpus=0.5, qkv=qkv)
    assert_bitwise_equal(remote, local)


def test_distributed_cart_float64(ray_local, pool):
    base, finetuned = pool
    local = cart(base, finetuned, rank_ratio=0.08, precision=torch.float64)
    assert_bitwise_equal(distributed_cart(base, finetuned, 0.08, num_cpus=0.5, precision=torch.float64), local)


@pytest.mark.parametrize("qkv", ["fused", "split"])
@pytest.mark.parametrize(
    "local_merge, remote_merge",
    [
        (lambda b, f, q: tsv_merge(b, f, 0.8, q),
         lambda b, f, q: distributed_low_rank("tsv_merge", b, f, 0.8, qkv=q, num_cpus=0.5)),
        (lambda b, f, q: iso_c(b, f, 1.3, q),
         lambda b, f, q: distributed_low_rank("iso_c", b, f, 1.3, qkv=q, num_cpus=0.5)),
        (lambda b, f, q: iso_cts(b, f, 1.1, 0.7, q),
         lambda b, f, q: distributed_low_rank("iso_cts", b, f, 1.1, common_space_fraction=0.7, qkv=q, num_cpus=0.5)),
    ],
    ids=["tsv_merge", "iso_c", "iso_cts"],
)
def test_distributed_tsv_and_iso_equal_local(ray_local, pool, local_merge, remote_merge, qkv):
    base, finetuned = pool
    assert_bitwise_equal(remote_merge(base, finetuned, qkv), local_merge(base, finetuned, qkv))


def test_distributed_rank_zero_is_average(ray_local):
    base = random_encoder(0)
    finetuned = [random_encoder(s, base) for s in (1, 2)]
    merged = distributed_cart(base, finetuned, rank_ratio=0.0, num_cpus=0.5)
    for key, value in merged.items():
        expected = (finetuned[0][key].double() + finetuned[1][key].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), key
