"""DaWin: per-sample interpolation coefficients from the candidates' prediction entropies, and its logit-only
variants (dynamic classifier selection, dynamic output ensemble) and the output ensemble they are compared with."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raymerge import dawin as dawin_math
from raymerge import diagnostics
from raymerge.dawin_pipeline import CENTRAL_CPUS, DawinRunner, Outcome, phase1
from raymerge.methods.base import (
    MERGES,
    MULTITASK,
    ROBUST,
    Candidate,
    Model,
    Paper,
    Params,
    Pool,
    Prediction,
    Reads,
    Recipe,
    register,
)
from raymerge.methods import task_arithmetic, wise_ft
from raymerge.methods.wise_ft import theta1
from raymerge.statedict import StateDict


DAWIN = Paper("Adapting foundation models via training-free dynamic weight interpolation (DaWin)", "2410.03782")
MODEL_DOC = "robust setting: θ1, a model of model_pool.finetuned (default: the first)"
OFFSET_DOC = "Eq. 2's domain offset (two models only); default: on for entropies in the robust setting, else off"


log = logging.getLogger("raymerge")


class DawinParams(Params):
    k: int = Field(3, ge=1, description="mixture components, i.e. merged models per test set (mixture beta or dirichlet)")
    mixture: Literal["auto", "beta", "dirichlet", "mean", "none"] = Field(
        "auto", description="beta (two models), dirichlet (many), mean (one merge per test set with the mean "
                            "coefficients, as released), none (one merge per distinct coefficient: the sample-wise "
                            "reference); auto: beta for two models, mean for many (the released code)")
    offset: bool | None = Field(None, description=OFFSET_DOC)
    lam0: float = Field(0.3, description="multi-task: θ0 + λ0·T·Σt λt(x)·τt (uniform coefficients give task arithmetic at λ0)")
    scores: Literal["entropy", "oracle"] = Field(
        "entropy", description="oracle: cross-entropy with the true label instead of entropy (an upper bound; mixture none)")
    model: str | None = Field(None, description=MODEL_DOC)


def _resolved(p: DawinParams, setting: str) -> dict[str, Any]:
    """What the parameters mean in ``setting``; ``k`` is None where no mixture is fitted (it changes nothing)."""
    robust = setting == ROBUST
    mixture = p.mixture if p.mixture != "auto" else dawin_math.default_mixture(robust)
    return {"mixture": mixture, "k": p.k if mixture in ("beta", "dirichlet") else None,
            "offset": p.offset if p.offset is not None else robust and p.scores == "entropy"}


def _check(p: DawinParams, setting: str) -> list[str]:
    r, problems = _resolved(p, setting), []
    if setting != ROBUST and r["offset"]:
        problems.append("offset: Eq. 2's offset is defined for two models (the robust setting) only")
    if setting != ROBUST and r["mixture"] == "beta":
        problems.append("mixture: beta models two candidates; a multi-task pool needs dirichlet or mean")
    if p.scores == "oracle" and r["mixture"] != "none":
        problems.append("scores: the oracle is a per-sample upper bound; use it with mixture: none")
    return problems


def _random(p: DawinParams, setting: str) -> bool:
    # the fitted mixtures' K-means initialisation is seeded; mean and none are deterministic
    return _resolved(p, setting)["mixture"] in ("beta", "dirichlet")


def candidate_names(pool: Pool, model: str | None) -> list[str]:
    """DaWin's candidate models: θ0 and θ1 (robust), or the pool's fine-tuned models (multi-task)."""
    return ["base", theta1(pool, model)] if pool.setting == ROBUST else pool.names


def runner(pool: Pool, names: list[str], lam0: float, pairs: list[tuple[str, str]]) -> DawinRunner:
    """Phase 1 done (temperatures fitted on each task's validation logits; the candidates' scores at those
    temperatures from the actors, cached), ready to run a variant."""
    validation = {t: (t, "validation") if pool.validation[t] else None for t, _ in pairs}
    p1 = phase1(pool.evaluator, [Recipe.model(n) for n in names], pairs, validation)
    robust = pool.setting == ROBUST
    fts = names[1:] if robust else names

    def merge(c: np.ndarray) -> Recipe:
        # exact floats (not numpy's shortened repr) identify the merge
        return Recipe(dawin_math.merge_for, (Model("base"), [Model(n) for n in fts], tuple(float(x) for x in c)),
                      {"robust": robust, "lam0": lam0, "names": fts})

    # uniform coefficients, built as the static method builds it: a run that evaluates that method too (a sweep's
    # task arithmetic at λ0, WiSE-FT's λ = 0.5) has its scores cached, and the reference costs no pass
    reference = wise_ft.recipe(fts[0], 0.5) if robust else task_arithmetic.recipe(fts, lam0)
    return DawinRunner(pool.evaluator, p1, merge, pool.seed, max_in_flight=pool.max_in_flight, names=names,
                       reference=reference)


def _prediction(outcome: Outcome) -> Prediction:
    return Prediction(outcome.predictions, outcome.extras, outcome.merges)


@register("dawin", params=DawinParams, settings=MERGES, paper=DAWIN, random=_random, check=_check,
          reads=Reads(own=("validation",)), task_cpus=CENTRAL_CPUS)
def dawin(pool: Pool, p: DawinParams) -> Iterator[Candidate]:
    """Per-sample coefficients from entropies (Eq. 1/2), reduced to K merges per test set by a mixture."""
    names, r = candidate_names(pool, p.model), _resolved(p, pool.setting)
    ready: dict[tuple[tuple[str, str], ...], DawinRunner] = {}  # phase 1 done by ahead, until predict takes it

    def phase1_for(pairs: list[tuple[str, str]]) -> DawinRunner:
        if tuple(pairs) not in ready:
            ready[tuple(pairs)] = runner(pool, names, p.lam0, pairs)
        return ready[tuple(pairs)]

    def ahead(pairs: list[tuple[str, str]]) -> list[Recipe | StateDict]:
        # every variant has one, so that a sweep counts its phase 2's merges; the oracle's come from label losses
        return [] if p.scores == "oracle" else phase1_for(pairs).ahead(pairs, r["offset"], r["mixture"])

    def predict(pairs: list[tuple[str, str]]) -> Prediction:
        run = phase1_for(pairs)
        ready.clear()  # phase 1's scores are not kept past the evaluation
        if p.scores == "oracle":
            return _prediction(run.oracle(pairs, r["offset"]))
        outcome = run.mixture(pairs, p.k, r["offset"], r["mixture"])
        diagnostics.warn_if_weak(outcome.diagnostics, log)
        return _prediction(outcome)

    yield Candidate(p.record(**r, models=names), predict=predict, models=["base", *(n for n in names if n != "base")],
                    ahead=ahead)


class SelectionParams(Params):
    offset: bool = Field(True, description="Eq. 2's domain offset on the coefficients")
    model: str | None = Field(None, description=MODEL_DOC)


def _selection(pool: Pool, p: SelectionParams, variant: str) -> Candidate:
    names = candidate_names(pool, p.model)

    def predict(pairs: list[tuple[str, str]]) -> Prediction:
        return _prediction(runner(pool, names, 0.0, pairs).selection(pairs, p.offset, variant))

    return Candidate(p.record(models=names), predict=predict, models=names, merges=0)


@register("dawin_dcs", params=SelectionParams, settings={ROBUST}, paper=DAWIN, reads=Reads(own=("validation",)))
def dawin_dcs(pool: Pool, p: SelectionParams) -> Iterator[Candidate]:
    """Dynamic classifier selection (DaWin Table 6): each sample takes its lower-entropy model's prediction."""
    yield _selection(pool, p, "dcs")


@register("dawin_doe", params=SelectionParams, settings={ROBUST}, paper=DAWIN, reads=Reads(own=("validation",)))
def dawin_doe(pool: Pool, p: SelectionParams) -> Iterator[Candidate]:
    """Dynamic output ensemble (DaWin Table 6): softmax outputs averaged with the per-sample coefficients."""
    yield _selection(pool, p, "doe")


class EnsembleParams(Params):
    model: str | None = Field(None, description=MODEL_DOC)


@register("output_ensemble", params=EnsembleParams, settings={ROBUST, MULTITASK})
def output_ensemble(pool: Pool, p: EnsembleParams) -> Iterator[Candidate]:
    """The plain average of the softmax outputs of θ0 and θ1 (robust) or of every fine-tuned model (multi-task)."""
    names = candidate_names(pool, p.model)

    def predict(pairs: list[tuple[str, str]]) -> Prediction:
        per_model = [pool.evaluator.logits(Recipe.model(n), pairs) for n in names]
        return Prediction({q: dawin_math.output_ensemble([lg[q] for lg in per_model]) for q in pairs})

    yield Candidate(p.record(models=names), predict=predict, models=names, merges=0)
