"""Coefficients learned at test time: AdaMerging (task vectors from θ0) and CART++ (CART's rank-reduced centered task
vectors). The adaptation runs on one evaluation actor (its GPU when it has one), up to
``resources.adaptations_in_flight`` of them at once on different actors; the learned merge is then evaluated like any
other candidate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from raymerge import adamerging, cart
from raymerge.adamerging import AdaptSettings, LowRankMerge, TaskVectorMerge
from raymerge.methods.base import MULTITASK, SWEEP, Candidate, Paper, Params, Pool, Reads, default_of, register
from raymerge.methods.cart import CART, QKV, QKV_DOC, SVD, SVD_DOC
from raymerge.statedict import StateDict
from raymerge.workers import run_svd_jobs

ADAMERGING = Paper("AdaMerging: Adaptive model merging for multi-task learning", "2310.02575")


class AdaptParams(Params):
    granularity: Literal["layer", "task"] = Field(
        "layer", description="one coefficient per task and parameter tensor (layer), or per task (task)")
    steps: int = Field(default_of(AdaptSettings, "steps"), ge=1, le=100_000, description="Adam steps")
    lr: float = Field(default_of(AdaptSettings, "lr"), gt=0.0, le=1.0, description="Adam's learning rate")
    batch_size: int = Field(default_of(AdaptSettings, "batch_size"), ge=1, le=4096,
                            description="unlabeled test images per batch")
    batches_per_step: int = Field(default_of(AdaptSettings, "batches_per_step"), ge=1, le=64,
                                  description="batches of every task per step")


class AdaMergingParams(AdaptParams):
    init: float = Field(default_of(AdaptSettings, "init"), ge=0.0, le=1.0,
                        description="starting coefficient; coefficients are clamped to [0, 1] as released")


class CartPPParams(AdaptParams):
    rank_ratio: float = Field(default_of(cart.cart, "rank_ratio"), gt=0.0, le=1.0,
                              description="CART's ρ (> 0: CART++ learns coefficients of the rank-k vectors)")
    lam: float = Field(default_of(cart.cart, "lam"), description="CART's λ, where every coefficient starts (no clamp)")
    svd: SVD = Field(default_of(cart.cart, "svd"), description=SVD_DOC)
    qkv: QKV = Field(default_of(cart.cart, "qkv"), description=QKV_DOC)


def _common(p: AdaptParams) -> dict[str, int | float]:
    return {"steps": p.steps, "lr": p.lr, "batch_size": p.batch_size, "batches_per_step": p.batches_per_step}


def _learned(pool: Pool, cand: Candidate, merge: adamerging.DifferentiableMerge, settings: AdaptSettings) -> StateDict:
    """Adapt ``merge`` on the pool's unlabeled test sets, record what was learned, return the learned merge."""
    result = pool.evaluator.adapt(merge, pool.tasks, settings, pool.seed)
    cand.details.update(tasks=pool.names, layers=list(result.layers), coefficients=result.coefficients.tolist(),
                        losses=result.losses)
    return merge.state_dict(result.coefficients)


# every task's test set is read (unlabeled) to learn the coefficients, so a row depends on all of them
ADAPTS_ON_TESTS = Reads(every_task=("test",))


@register("adamerging", params=AdaMergingParams, settings={MULTITASK, SWEEP}, paper=ADAMERGING, random=True,
          reads=ADAPTS_ON_TESTS)
def adamerging_unit(pool: Pool, p: AdaMergingParams) -> Iterator[Candidate]:
    """θ0 + Σt λt,l τt,l with λ learned by minimizing the prediction entropy on the tasks' unlabeled test sets."""
    def build() -> StateDict:
        merge = TaskVectorMerge(pool.base, pool.models, granularity=p.granularity, names=pool.names)
        return _learned(pool, cand, merge, AdaptSettings(init=p.init, **_common(p)))

    cand = Candidate(p.record(), build=build, adapts=True)
    yield cand


@register("cart_pp", params=CartPPParams, settings={MULTITASK, SWEEP}, paper=CART, random=True, reads=ADAPTS_ON_TESTS,
          task_cpus=1.0, min_models=2)
def cart_pp(pool: Pool, p: CartPPParams) -> Iterator[Candidate]:
    """CART++ (Eq. 6): θavg + Σt λt,l SVDk(θt − θavg) with λ learned as AdaMerging's, starting at CART's λ."""
    def build() -> StateDict:
        plan = cart.plan_cart(pool.base, pool.models, p.rank_ratio, p.svd, pool.seed, qkv=p.qkv, names=pool.names)
        merge = LowRankMerge(plan, run_svd_jobs(plan), granularity=p.granularity)
        return _learned(pool, cand, merge, AdaptSettings.for_cart_pp(p.lam, **_common(p)))

    cand = Candidate(p.record(), build=build, models=pool.names, adapts=True)
    yield cand
