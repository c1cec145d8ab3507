"""Soups of fine-tuned models: the uniform average, Model Stock and the greedy soup."""

from __future__ import annotations

from collections.abc import Iterator

from raymerge import merge
from raymerge.methods.base import MERGES, ROBUST, Candidate, Model, NoParams, Paper, Pool, Reads, Recipe, register
from raymerge.statedict import StateDict, to_numpy

SOUPS = Paper("Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
              "inference time", "2203.05482")


@register("weight_average", params=NoParams, settings=MERGES, paper=SOUPS)
def weight_average(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """The uniform soup (1/T) Σt θt of the fine-tuned models."""
    yield Candidate(p.record(), recipe=Recipe(merge.weight_average, ([Model(n) for n in pool.names], pool.names)))


@register("model_stock", params=NoParams, settings={ROBUST}, min_models=2,
          paper=Paper("Model Stock: All we need is just a few fine-tuned models", "2403.19522"))
def model_stock(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """Per layer t·θ̄ft + (1−t)·θ0, t from the angle between the fine-tuned deltas (≥ 2 fine-tunes of one task)."""
    yield Candidate(p.record(), recipe=Recipe(merge.model_stock, (Model("base"), [Model(n) for n in pool.names]),
                                              {"names": pool.names}))


@register("greedy_soup", params=NoParams, settings={ROBUST}, paper=SOUPS, reads=Reads(every_task=("validation",)))
def greedy_soup(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """Fine-tuned models added in order of validation accuracy, each kept only if validation accuracy does not drop."""
    cand = Candidate(p.record(), build=lambda: _soup(pool, cand), models=pool.names)
    yield cand


def _soup(pool: Pool, cand: Candidate) -> StateDict:
    pairs = pool.validation_pairs()
    soup, kept = merge.greedy_soup(pool.finetuned, lambda sd: pool.accuracy(to_numpy(sd), pairs))
    cand.details["kept"] = kept
    return soup
