"""WiSE-FT: the line between θ0 and one fine-tuned model θ1."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from raymerge import merge
from raymerge.methods.base import ROBUST, Candidate, Model, Paper, Params, Pool, Recipe, register

TENTHS = [round(0.1 * i, 1) for i in range(11)]


class WiseFtParams(Params):
    lambdas: list[float] = Field(TENTHS, min_length=1, description="the grid of λ: one candidate (1−λ)·θ0 + λ·θ1 each")
    model: str | None = Field(None, description="θ1, a model of model_pool.finetuned (default: the first)")


def theta1(pool: Pool, model: str | None) -> str:
    """The fine-tuned endpoint θ1 of the robust setting: ``model``, else the pool's first fine-tuned model."""
    return model or pool.names[0]


@register("wise_ft", params=WiseFtParams, settings={ROBUST},
          paper=Paper("Robust fine-tuning of zero-shot models", "2109.01903"))
def wise_ft(pool: Pool, p: WiseFtParams) -> Iterator[Candidate]:
    """Weight-space ensembles (1−λ)·θ0 + λ·θ1 along a grid of λ."""
    ft = theta1(pool, p.model)
    for lam in p.lambdas:
        yield Candidate(p.record(exclude=["lambdas"], lam=lam, model=ft), recipe=recipe(ft, lam))


def recipe(ft: str, lam: float) -> Recipe:
    """(1−λ)·θ0 + λ·θ1 with θ1 = ``ft``: DaWin's static reference builds it too, so equal merges share one key."""
    return Recipe(merge.interpolate, (Model("base"), Model(ft), lam))
