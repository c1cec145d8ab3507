"""Task arithmetic and TIES: task vectors τt = θt − θ0 added to θ0."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from raymerge import merge
from raymerge.methods.base import MERGES, Candidate, Model, Paper, Params, Pool, Reads, Recipe, default_of, register


class TaskArithmeticParams(Params):
    lambdas: list[float] = Field([round(0.1 * i, 1) for i in range(1, 11)], min_length=1,
                                 description="λ grid; the λ with the best validation accuracy is kept (one value: no selection)")


def _reads(p: TaskArithmeticParams) -> Reads:
    return Reads(every_task=("validation",)) if len(p.lambdas) > 1 else Reads()


@register("task_arithmetic", params=TaskArithmeticParams, settings=MERGES, reads=_reads,
          paper=Paper("Editing models with task arithmetic", "2212.04089"))
def task_arithmetic(pool: Pool, p: TaskArithmeticParams) -> Iterator[Candidate]:
    """θ0 + λ Σt τt, λ chosen on the validation splits of the pool's tasks when a grid is given."""
    if len(p.lambdas) == 1:
        yield Candidate(p.record(), recipe=recipe(pool.names, p.lambdas[0]), details={"lam": p.lambdas[0]})
        return
    cand = Candidate(p.record(), build=lambda: _select(pool, p.lambdas, cand), models=["base", *pool.names],
                     merges=len(p.lambdas))
    yield cand


def recipe(names: list[str], lam: float) -> Recipe:
    """θ0 + λ Σt τt over the fine-tuned models ``names``: DaWin's static reference builds it too, so equal merges
    share one key."""
    return Recipe(merge.task_arithmetic, (Model("base"), [Model(n) for n in names], lam), {"names": names})


def _select(pool: Pool, lambdas: list[float], cand: Candidate) -> Recipe:
    pairs = pool.validation_pairs()
    scores = {lam: pool.accuracy(recipe(pool.names, lam), pairs) for lam in lambdas}
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    cand.details.update(lam=best, validation_accuracy=scores)
    return recipe(pool.names, best)


class TiesParams(Params):
    lam: float = Field(default_of(merge.ties, "lam"), description="λ scaling the merged task vector")
    density: float = Field(default_of(merge.ties, "density"), gt=0, le=1,
                           description="fraction of each task vector kept (top by magnitude)")


@register("ties", params=TiesParams, settings=MERGES,
          paper=Paper("TIES-Merging: Resolving interference when merging models", "2306.01708"))
def ties(pool: Pool, p: TiesParams) -> Iterator[Candidate]:
    """Trim each τt to its top entries, elect a sign per entry, average the agreeing entries: θ0 + λ·merged."""
    yield Candidate(p.record(), recipe=Recipe(merge.ties, (Model("base"), [Model(n) for n in pool.names], p.lam, p.density),
                                              {"names": pool.names}))
