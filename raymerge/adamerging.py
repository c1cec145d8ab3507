"""Merge coefficients learned at test time by entropy minimization: AdaMerging (Yang et al., ICLR 2024) and CART++
(cart-2025.md §4.3, Eq. 6, Algorithm 2); docs/METHODS.md "AdaMerging", "CART++".

A :class:`DifferentiableMerge` is a merged state dict as a differentiable function of a (T, L) coefficient matrix
λ (T fine-tuned models, L coefficient groups: one per parameter tensor layer-wise, one in all task-wise):

- :class:`TaskVectorMerge` (AdaMerging):  θl = θ0,l + Σt λt,l τt,l over every floating tensor;
- :class:`LowRankMerge` (CART++):         θl = θavg,l + Σt λt,l SVDk(τ̄t,l) over the matrices CART rank-reduces,
  from CART's own plan and job results (the rank-k factors), every other tensor θavg.

:func:`adapt` minimizes the mean prediction entropy of unlabeled test batches of every task, each task through its
own head, with Adam over λ. The encoder is one resident module evaluated with ``torch.func.functional_call`` on the
merged tensors (no module is rebuilt; they are swapped in once per step), and the loss is computed task by task
(:func:`entropy_step`): each task's batches go through the encoder in one forward, whose graph is freed by its own
``backward`` into the merged tensors, then one ``backward`` carries their gradients to λ,
so peak memory does not grow with the number of tasks (the released code keeps every task's graph until one
``backward``, about 5.7 GB more per ViT-B/32 task, AdaMerging issue #3).

Defaults (:class:`AdaptSettings`) from the released AdaMerging code (EnnengYang/AdaMerging,
``src/main_layer_wise_adamerging.py``): λ initialized to 0.3, Adam (lr 1e-3, betas (0.9, 0.999)), 500 steps, each
step 2 batches of 16 shuffled test samples per task, λ clamped to [0, 1] in the forward pass. The released code sums
the batches' mean entropies over tasks and batches; the loss here is their mean, which scales the gradient by a
constant that Adam's update ignores (up to its ε = 1e-8). CART++ (never released) starts at CART's λ and is not
clamped (:meth:`AdaptSettings.for_cart_pp`). Sampling is seeded; on one device and thread count a seed gives
bit-identical coefficients.

Pure: no Ray, no files. Shapes: images (N, 3, S, S) preprocessed; coefficients (T, L); losses in nats.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from raymerge._arith import cast_to, check_real, dtypes_of, per_key, validate_with_base
from raymerge.lowrank import Factors, LowRankPlan
from raymerge.models import Head
from raymerge.statedict import StateDict

GRANULARITIES = ("layer", "task")
ALL_TENSORS = "all tensors"  # the one coefficient group of a task-wise merge


def _positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


@dataclass(frozen=True)
class AdaptSettings:
    """How :func:`adapt` learns the coefficients; defaults are the released AdaMerging code's.

    ``steps`` Adam steps (≥ 1); ``lr`` > 0 and ``betas`` in [0, 1) Adam's; ``batch_size`` test images per batch and
    ``batches_per_step`` batches per task per step (shuffled without replacement within a step); ``init`` the starting
    value of every coefficient; ``clamp`` (low, high) the range coefficients are clamped to in the forward pass, or
    ``None`` for none. ``init`` must lie in ``clamp``: outside it the gradient would be zero from the start.
    """

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 16
    batches_per_step: int = 2
    betas: tuple[float, float] = (0.9, 0.999)
    init: float = 0.3
    clamp: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("batches_per_step", self.batches_per_step)
        check_real("lr", self.lr)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_real("init", self.init)
        if self.clamp is not None:
            if len(self.clamp) != 2:
                raise ValueError(f"clamp must be (low, high) or None, got {self.clamp!r}")
            low, high = self.clamp
            check_real("clamp low", low)
            check_real("clamp high", high)
            if not low < high:
                raise ValueError(f"clamp must have low < high, got {self.clamp!r}")
            if not low <= self.init <= high:
                raise ValueError(f"init {self.init!r} lies outside clamp {self.clamp!r}: its gradient would be zero")

    @classmethod
    def for_cart_pp(cls, lam: float, **changes) -> AdaptSettings:
        """CART++'s settings: start at CART's ``lam``, no clamp (CART's λ = 2 lies outside [0, 1]); the rest as
        AdaMerging's unless ``changes`` says otherwise."""
        return cls(**{"init": lam, "clamp": None, **changes})

    def effective(self, raw: torch.Tensor) -> torch.Tensor:
        """The coefficients the merge uses: ``raw`` clamped (AdaMerging's forward pass), or as it is."""
        # ADA-3: clamp(λ) in the forward pass
        return raw if self.clamp is None else raw.clamp(*self.clamp)


class DifferentiableMerge:
    """A merged state dict as a differentiable function of a coefficient matrix λ of :attr:`coefficient_shape`.

    ``tasks`` T; ``layers`` the names of the L coefficient groups (parameter keys layer-wise, one group task-wise);
    ``dtype`` the compute precision; ``device`` where its tensors live. Subclasses define :meth:`parameters` and
    :meth:`_moved_to`.
    """

    tasks: int
    layers: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    out_dtypes: dict[str, torch.dtype]

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        return (self.tasks, len(self.layers))

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every state-dict key's merged tensor at ``coefficients`` (T, L), differentiable in them; non-floating
        tensors and tensors without a coefficient are constants."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> DifferentiableMerge:
        """A copy with every tensor on ``device``."""
        moved = copy.copy(self)
        moved.device = torch.device(device)
        moved._moved_to(moved.device)
        return moved

    def _moved_to(self, device: torch.device) -> None:
        """Replace this (fresh, shallow) copy's tensors by copies on ``device``."""
        raise NotImplementedError

    def state_dict(self, coefficients: torch.Tensor) -> StateDict:
        """The merged state dict at ``coefficients`` (no gradient), on the CPU in the checkpoints' dtypes."""
        self._check(coefficients)
        with torch.no_grad():
            merged = self.parameters(coefficients.to(self.device, self.dtype))
        return cast_to({key: value.cpu() for key, value in merged.items()}, self.out_dtypes)

    def _check(self, coefficients: torch.Tensor) -> None:
        if tuple(coefficients.shape) != self.coefficient_shape:
            raise ValueError(f"coefficients have shape {tuple(coefficients.shape)}; this merge takes "
                             f"{self.coefficient_shape} (tasks × coefficient groups)")

    def _set_groups(self, keys: Sequence[str], granularity: str) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}: expected one of {', '.join(map(repr, GRANULARITIES))}")
        self._layerwise = granularity == "layer"
        self.layers = tuple(keys) if self._layerwise else (ALL_TENSORS,)

    def _column(self, coefficients: torch.Tensor, index: int) -> torch.Tensor:
        """The T coefficients of the ``index``-th tensor: its own column layer-wise, the only one task-wise."""
        return coefficients[:, index if self._layerwise else 0]


def _moved(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in tensors.items()}


class TaskVectorMerge(DifferentiableMerge):
    """AdaMerging's merge θl = θ0,l + Σt λt,l τt,l over every floating tensor of the state dicts.

    ``granularity="layer"``: one λ per task and parameter tensor (L = number of floating tensors, in state-dict
    order, as the released layer-wise code); ``"task"``: one λ per task (L = 1). Holds θ0 and the T task vectors in
    ``precision`` (float32 or float64); ``names`` label the fine-tuned models in error messages.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        finetuned: Sequence[Mapping[str, torch.Tensor]],
        granularity: str = "layer",
        *,
        names: Sequence[str] | None = None,
        precision: torch.dtype = torch.float32,
    ) -> None:
        validate_with_base("adamerging", base, finetuned, names, min_finetuned=1)
        keys = [key for key, value in base.items() if value.is_floating_point()]
        self._set_groups(keys, granularity)
        self.tasks = len(finetuned)
        self.out_dtypes = dtypes_of(base)
        self._theta0 = per_key([base], lambda key, tensors: tensors[0], precision)
        # METHODS notation: task vectors τt = θt − θ0, stacked (T, *shape) per tensor
        self._taus = per_key([base, *finetuned], lambda key, ts: torch.stack([t - ts[0] for t in ts[1:]]), precision)
        self._keys = keys
        self.dtype = precision
        self.device = torch.device("cpu")

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(coefficients)
        merged = dict(self._theta0)
        for index, key in enumerate(self._keys):
            # ADA-1: θl = θ0,l + Σt λt,l τt,l
            merged[key] = self._theta0[key] + torch.tensordot(self._column(coefficients, index), self._taus[key], 1)
        return merged

    def _moved_to(self, device: torch.device) -> None:
        self._theta0 = _moved(self._theta0, device)
        self._taus = _moved(self._taus, device)


class LowRankMerge(DifferentiableMerge):
    """CART++'s merge θl = θavg,l + Σt λt,l SVDk(τ̄t,l) (cart-2025.md Eq. 6) on the matrices CART rank-reduces.

    Built from CART's plan and the results of its jobs (:func:`raymerge.cart.plan_cart`, then
    :func:`raymerge.lowrank.run_jobs` or :func:`raymerge.workers.run_svd_jobs`): θavg and the rank-k factors of
    every (block, task), so the SVDs are not repeated and the merge at λt,l = CART's λ is CART's merge (up to
    rounding). Every other tensor stays θavg. ``granularity`` as :class:`TaskVectorMerge` (L = the low-ranked
    matrices layer-wise); a matrix split into q, k, v (``qkv="split"``) has one coefficient per task.
    """

    def __init__(self, plan: LowRankPlan, results: Mapping, granularity: str = "layer") -> None:
        if not plan.blocks:
            raise ValueError("CART++ needs low-rank factors, but the CART plan has none (rank_ratio 0, or no matrix "
                             "selected)")
        self._set_groups(list(plan.blocks), granularity)
        self.tasks = len(next(iter(plan.outputs.values())))
        self.out_dtypes = dict(plan.out_dtypes)
        self._origin = dict(plan.origin)
        self._keys = list(plan.blocks)
        self._lefts: dict[str, list[list[torch.Tensor]]] = {}
        self._rights: dict[str, list[torch.Tensor]] = {}
        for key, blocks in plan.blocks.items():
            factors = [[results[name] for name in plan.outputs[block]] for block in blocks]
            if not all(isinstance(f, Factors) for per_block in factors for f in per_block):
                raise ValueError(f"CART++ needs CART's rank-k factors; the results for {key!r} are not Factors")
            self._lefts[key] = [[f.left for f in per_block] for per_block in factors]
            self._rights[key] = [torch.cat([f.right for f in per_block]) for per_block in factors]
        self.dtype = next(iter(self._rights.values()))[0].dtype
        self.device = torch.device("cpu")

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(coefficients)
        merged = dict(self._origin)
        for index, key in enumerate(self._keys):
            lam = self._column(coefficients, index)
            # CART++ (cart-2025.md Eq. 6): Σt λt,l SVDk(τ̄t,l) = [λ1 L1 … λT LT] [R1; …; RT] per block
            parts = [torch.cat([left * lam[t] for t, left in enumerate(lefts)], dim=1) @ right
                     for lefts, right in zip(self._lefts[key], self._rights[key])]
            merged[key] = self._origin[key] + (parts[0] if len(parts) == 1 else torch.cat(parts))
        return merged

    def _moved_to(self, device: torch.device) -> None:
        self._origin = _moved(self._origin, device)
        self._lefts = {key: [[t.to(device) for t in lefts] for lefts in blocks] for key, blocks in self._lefts.items()}
        self._rights = {key: [t.to(device) for t in rights] for key, rights in self._rights.items()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row: (N, C) → (N,)."""
    log_p = logits.log_softmax(dim=-1)
    # ADA-2: H(p) = −Σc pc log pc
    return -(log_p.exp() * log_p).sum(dim=-1)


class _Scope(nn.Module):
    """``forward(fn)`` is ``fn(encoder)``: one :func:`functional_call` of it swaps the merged tensors into the encoder
    once for a whole step, where one call per forward swapped them for every batch (for a small encoder the swap cost
    more than the forward)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, fn: Callable[[nn.Module], float]) -> float:
        return fn(self.encoder)


def entropy_step(
    encoder: nn.Module,
    merge: DifferentiableMerge,
    heads: Mapping[str, Head],
    batches: Mapping[str, Sequence[torch.Tensor]],
    coefficients: torch.Tensor,
) -> float:
    """The adaptation loss at ``coefficients`` (T, L), and its gradient when they require one.

    Loss: the mean over every batch of ``batches`` (task → list of (B, 3, S, S) image batches) of the batch's mean
    prediction entropy, each task's batches through ``heads[task]`` on ``encoder`` with the merged tensors
    (``functional_call``). If ``coefficients`` requires grad, d loss / d λ is accumulated into the leaves it depends
    on: each task's batches run as one forward whose graph ends in its own ``backward`` into detached copies of the
    merged tensors (freed at once: memory holds one task's batches, whatever the number of tasks), and one final
    ``backward`` carries their summed gradients through the merge. Returns the loss (a float).
    """
    track = coefficients.requires_grad
    with torch.set_grad_enabled(track):
        merged = merge.parameters(coefficients)
    trainable = [key for key, value in merged.items() if value.requires_grad]
    leaves = {key: merged[key].detach().requires_grad_() for key in trainable}
    params = {**{key: value.detach() for key, value in merged.items()}, **leaves}
    count = sum(len(task_batches) for task_batches in batches.values())

    def task_by_task(merged_encoder: nn.Module) -> float:
        total = 0.0
        for task, task_batches in batches.items():
            if not task_batches:
                continue
            with torch.set_grad_enabled(track):
                logits = heads[task].logits(merged_encoder(torch.cat(list(task_batches))))
                # ADA-2: the mean over batches of each batch's mean prediction entropy
                loss = sum(entropy(part).mean() for part in logits.split([len(b) for b in task_batches])) / count
            if track:
                loss.backward()
            total += loss.item()
        return total

    total = functional_call(_Scope(encoder), {f"encoder.{key}": value for key, value in params.items()},
                            (task_by_task,))
    if track and trainable:
        grads = [leaves[key].grad if leaves[key].grad is not None else torch.zeros_like(leaves[key])
                 for key in trainable]
        torch.autograd.backward([merged[key] for key in trainable], grads)
    return total


@dataclass(frozen=True)
class AdaptResult:
    """``coefficients`` (T, L) the learned coefficients as the merge uses them (clamped), on the CPU, for
    :meth:`DifferentiableMerge.state_dict`; ``losses`` the loss of every step at its coefficients before the update;
    ``layers`` the names of the L coefficient groups."""

    coefficients: torch.Tensor
    losses: list[float]
    layers: tuple[str, ...]


def _check_inputs(heads: Mapping[str, Head], images: Mapping[str, torch.Tensor]) -> None:
    if not images:
        raise ValueError("no test images to adapt on: give at least one task's unlabeled test images")
    for task, task_images in images.items():
        if task not in heads:
            raise ValueError(f"task {task!r} has test images but no head")
        if task_images.ndim != 4 or task_images.shape[0] == 0:
            raise ValueError(f"task {task!r} has no test images to adapt on (images of shape "
                             f"{tuple(task_images.shape)}; expected (N ≥ 1, 3, S, S))")


def _head_on(head: Head, device: torch.device, dtype: torch.dtype) -> Head:
    bias = None if head.bias is None else head.bias.to(device, dtype)
    return dataclasses.replace(head, weight=head.weight.to(device, dtype), bias=bias)


def sample_batches(
    images: Mapping[str, torch.Tensor], settings: AdaptSettings, generator: torch.Generator
) -> dict[str, list[torch.Tensor]]:
    """One step's batches: per task in order, ``batches_per_step`` batches of ``batch_size`` images drawn without
    replacement (fewer when the task has fewer images), from ``generator`` (CPU)."""
    batches = {}
    for task, task_images in images.items():
        take = min(task_images.shape[0], settings.batch_size * settings.batches_per_step)
        order = torch.randperm(task_images.shape[0], generator=generator)[:take]
        batches[task] = [task_images[rows] for rows in order.split(settings.batch_size)]
    return batches


def adapt(
    encoder: nn.Module,
    merge: DifferentiableMerge,
    heads: Mapping[str, Head],
    images: Mapping[str, torch.Tensor],
    settings: AdaptSettings = AdaptSettings(),
    seed: int = 0,
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
) -> AdaptResult:
    """Learn ``merge``'s coefficients by entropy minimization on unlabeled test images (module docstring).

    ``encoder``: a module of the merged models' architecture (its own weights are not used; it is moved to
    ``device`` and put in eval mode). ``heads[task]`` maps features to that task's logits; ``images[task]`` (N, 3, S, S)
    preprocessed test images of every task in the loss, N ≥ 1. ``seed`` drives the batch sampling only.
    ``on_step(step, loss, coefficients)`` after every step, with the loss before the update and the (clamped)
    coefficients after it. ``device``: where to run (default: the merge's device); the merge and heads are copied
    there, batches moved there one by one. ``ValueError`` before any work for a task without images or head.
    """
    _check_inputs(heads, images)
    device = merge.device if device is None else torch.device(device)
    merge = merge.to(device)
    encoder.to(device).eval()
    on_device = {task: _head_on(heads[task], device, merge.dtype) for task in images}
    generator = torch.Generator().manual_seed(seed)
    raw = torch.full(merge.coefficient_shape, float(settings.init), dtype=merge.dtype, device=device,
                     requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=settings.lr, betas=settings.betas)
    losses = []
    with torch.enable_grad():
        for step in range(settings.steps):
            batches = {task: [b.to(device, merge.dtype) for b in task_batches]
                       for task, task_batches in sample_batches(images, settings, generator).items()}
            optimizer.zero_grad()
            losses.append(entropy_step(encoder, merge, on_device, batches, settings.effective(raw)))
            optimizer.step()
            if on_step is not None:
                on_step(step, losses[-1], settings.effective(raw).detach().cpu())
    return AdaptResult(settings.effective(raw).detach().cpu(), losses, merge.layers)
