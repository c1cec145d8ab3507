"""The models themselves: θ0 and each fine-tuned θt, the endpoints every merge is compared with."""

from __future__ import annotations

from collections.abc import Iterator

from raymerge.methods.base import MULTITASK, ROBUST, Candidate, NoParams, Pool, Recipe, register


@register("zeroshot", params=NoParams, settings={ROBUST, MULTITASK})
def zeroshot(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """The pre-trained model θ0 with each task's head."""
    yield Candidate(p.record(), recipe=Recipe.model("base"), merges=0)


@register("finetuned", params=NoParams, settings={ROBUST, MULTITASK})
def finetuned(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """Each fine-tuned model: robust, every θt on every set; multi-task, each θt on its own task (the upper bound)."""
    if pool.setting == MULTITASK:
        for task in pool.tasks:
            name = pool.task_models[task]
            if name:
                yield Candidate(p.record(model=name, own_task=True), recipe=Recipe.model(name), tasks=[task], merges=0)
    else:
        for name in pool.names:
            yield Candidate(p.record(model=name), recipe=Recipe.model(name), merges=0)
