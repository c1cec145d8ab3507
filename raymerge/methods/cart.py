"""CART (centered arithmetic with rank-reduced task vectors) and its accuracy-versus-rank sweep."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field

from raymerge import cart as cart_math
from raymerge import merge
from raymerge.methods.base import MERGES, MULTITASK, Candidate, Model, Paper, Params, Pool, Recipe, default_of, register
from raymerge.workers import distributed_cart

CART = Paper("Revisiting weight averaging for model merging", "2412.12153")
RATIO = dict(ge=0.0, le=1.0)
Ratio = Annotated[float, Field(**RATIO)]
SVD = Literal["exact", "randomized"]
SVD_DOC = "exact (torch.linalg.svd, as released) or randomized (torch.svd_lowrank, seeded)"
QKV = Literal["fused", "split"]
QKV_DOC = "attention's q, k, v as one 3d×d matrix (open_clip) or three d×d matrices (Hugging Face, several papers)"


class CartParams(Params):
    rank_ratio: float = Field(default_of(cart_math.cart, "rank_ratio"), **RATIO,
                              description="ρ: rank k = max(1, ⌊ρ·min(m, n)⌋) kept per matrix (paper 0.08; released ViT-B/32 8 tasks 0.12)")
    lam: float = Field(default_of(cart_math.cart, "lam"), description="λ scaling the low-rank centered task vectors (paper 1.0; released 2.0)")
    svd: SVD = Field(default_of(cart_math.cart, "svd"), description=SVD_DOC)
    qkv: QKV = Field(default_of(cart_math.cart, "qkv"), description=QKV_DOC)


def _randomized(p: CartParams | RankSweepParams, setting: str) -> bool:
    return p.svd == "randomized"


@register("cart", params=CartParams, settings=MERGES, paper=CART, random=_randomized, task_cpus=1.0, min_models=2)
def cart(pool: Pool, p: CartParams) -> Iterator[Candidate]:
    """θavg + λ Σt SVDk(θt − θavg) per weight matrix; the SVDs run as Ray tasks."""
    yield Candidate(p.record(), recipe=Recipe(distributed_cart, (
        Model("base"), [Model(n) for n in pool.names], p.rank_ratio, p.lam, p.svd, pool.seed),
        {"names": pool.names, "qkv": p.qkv}, where="task"))


class RankSweepParams(Params):
    rank_ratios: list[Ratio] = Field([0.0, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.32, 0.5, 0.75, 1.0],
                                     min_length=1, description="the grid of ρ, each evaluated for both curves")
    cart_lam: float = Field(default_of(cart_math.cart, "lam"), description="λ of the CART curve")
    task_arithmetic_lam: float = Field(default_of(merge.task_arithmetic, "lam"),
                                       description="λ of the low-rank task arithmetic curve")
    svd: SVD = Field(default_of(cart_math.cart, "svd"), description=SVD_DOC)
    qkv: QKV = Field(default_of(cart_math.cart, "qkv"), description=QKV_DOC)


@register("rank_sweep", params=RankSweepParams, settings={MULTITASK}, paper=CART, random=_randomized, task_cpus=1.0,
          min_models=2)
def rank_sweep(pool: Pool, p: RankSweepParams) -> Iterator[Candidate]:
    """Accuracy versus rank ratio (CART Fig. 1/5): CART and task arithmetic with rank-k task vectors per ρ."""
    for rho in p.rank_ratios:
        models = (Model("base"), [Model(n) for n in pool.names])
        yield Candidate(p.record(exclude=["rank_ratios"], curve="cart", rank_ratio=rho), recipe=Recipe(
            distributed_cart, (*models, rho, p.cart_lam, p.svd, pool.seed), {"names": pool.names, "qkv": p.qkv},
            where="task"))
        yield Candidate(p.record(exclude=["rank_ratios"], curve="task_arithmetic", rank_ratio=rho), recipe=Recipe(
            merge.task_arithmetic, (*models, p.task_arithmetic_lam),
            {"rank_ratio": rho, "svd": p.svd, "seed": pool.seed, "qkv": p.qkv, "names": pool.names}))
