"""A method a user might add: one file, registered on import, touching no other module of raymerge."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from raymerge import merge
from raymerge.methods import MERGES, Candidate, Paper, Params, Pool, register


class ToyParams(Params):
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="weight of θ0 against the soup of the fine-tuned models")


@register("toy_blend", params=ToyParams, settings=MERGES, paper=Paper("A toy blend for tests"))
def toy_blend(pool: Pool, p: ToyParams) -> Iterator[Candidate]:
    """α·θ0 + (1−α)·(1/T) Σt θt."""
    yield Candidate(p.record(), build=lambda: merge.interpolate(pool.base, merge.weight_average(pool.models), 1 - p.alpha))
