"""The SVD-based merges since CART: TSV-M and Iso-C / Iso-CTS, their per-layer SVDs run as Ray tasks."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from raymerge import iso, tsv
from raymerge.methods.base import MERGES, Candidate, Model, Paper, Params, Pool, Recipe, default_of, register
from raymerge.methods.cart import QKV, QKV_DOC
from raymerge.workers import distributed_low_rank

TSV = Paper("Task singular vectors: reducing task interference in model merging", "2412.00081")
ISO = Paper("No task left behind: isotropic model merging with common and task-specific subspaces", "2502.04959")


def _low_rank(method: str, pool: Pool, lam: float, **params: object) -> Recipe:
    """One of the SVD-based merges, its per-layer SVD jobs run as Ray tasks."""
    return Recipe(distributed_low_rank, (method, Model("base"), [Model(n) for n in pool.names], lam),
                  {**params, "names": pool.names}, where="task")


class TsvParams(Params):
    lam: float = Field(default_of(tsv.tsv_merge, "lam"), description="α scaling the merged task matrix")
    qkv: QKV = Field(default_of(tsv.tsv_merge, "qkv"), description=QKV_DOC)


@register("tsv_merge", params=TsvParams, settings=MERGES, paper=TSV, task_cpus=1.0)
def tsv_merge(pool: Pool, p: TsvParams) -> Iterator[Candidate]:
    """θ0 + α Σ of each task's top singular vectors, decorrelated by orthogonalizing the stacked bases, per layer."""
    yield Candidate(p.record(), recipe=_low_rank("tsv_merge", pool, p.lam, qkv=p.qkv))


class IsoCParams(Params):
    lam: float = Field(default_of(iso.iso_c, "lam"), description="α scaling the merged task matrix")
    qkv: QKV = Field(default_of(iso.iso_c, "qkv"), description=QKV_DOC)


@register("iso_c", params=IsoCParams, settings=MERGES, paper=ISO, task_cpus=1.0)
def iso_c(pool: Pool, p: IsoCParams) -> Iterator[Candidate]:
    """θ0 + α U σ̄ Vᵀ: the summed task matrix with its spectrum flattened to its mean, per layer."""
    yield Candidate(p.record(), recipe=_low_rank("iso_c", pool, p.lam, qkv=p.qkv))


class IsoCtsParams(Params):
    lam: float = Field(default_of(iso.iso_cts, "lam"), description="α scaling the merged task matrix")
    common_space_fraction: float = Field(default_of(iso.iso_cts, "common_space_fraction"), gt=0.0, le=1.0,
                                         description="share of each layer's rank given to the common subspace")
    qkv: QKV = Field(default_of(iso.iso_cts, "qkv"), description=QKV_DOC)


@register("iso_cts", params=IsoCtsParams, settings=MERGES, paper=ISO, task_cpus=1.0)
def iso_cts(pool: Pool, p: IsoCtsParams) -> Iterator[Candidate]:
    """Iso-C's common subspace plus each task's top directions outside it, orthogonalized, spectrum flattened."""
    yield Candidate(p.record(), recipe=_low_rank("iso_cts", pool, p.lam, qkv=p.qkv,
                                                 common_space_fraction=p.common_space_fraction))
