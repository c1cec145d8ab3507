"""The models themselves: θ0 and each fine-tuned θt, the endpoints every merge is compared with."""

from __future__ import annotations

from collections.abc import Iterator

from raymerge.methods.base import MULTITASK, ROBUST, Candidate, Params, Pool, register


class NoParams(Params):
    pass


@register("zeroshot", params=NoParams, settings={ROBUST, MULTITASK})
def zeroshot(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """The pre-trained model θ0 with each task's head."""
    yield Candidate(p.record(), build=lambda: pool.base, models=["base"], merges=0)


@register("finetuned", params=NoParams, settings={ROBUST, MULTITASK})
def finetuned(pool: Pool, p: NoParams) -> Iterator[Candidate]:
    """Each fine-tuned model: robust, every θt on every set; multi-task, each θt on its own task (the upper bound)."""
    if pool.setting == MULTITASK:
        for task in pool.tasks:
            name = pool.task_models[task]
            if name:
                yield Candidate(p.record(model=name, own_task=True), build=lambda sd=pool.finetuned[name]: sd,
                                models=[name], tasks=[task], merges=0)
    else:
        for name, sd in pool.finetuned.items():
            yield Candidate(p.record(model=name), build=lambda sd=sd: sd, models=[name], merges=0)
