"""The embedded zoo: tiny open_clip ViTs trained on scikit-learn's handwritten digits, built offline.

No CLIP weights or benchmark datasets can be downloaded where raymerge is developed and tested, so raymerge
builds a miniature of the two settings its methods are published on, from the 1797 real 8×8 digits that
scikit-learn ships, upsampled to 16×16 uint8 grayscale. It is NOT ImageNet/CLIP scale: it exists so that every
method can be run end to end, and so that the qualitative effects (fine-tuning forgets robustness; merging
many tasks interferes) are really there to be measured.

Images are split once, stratified by digit (fractions of the 1797 images):

- pre-training pool, 15%: θ0 ("zero-shot") and a 10-class head are trained jointly from scratch on 40 randomly
  corrupted copies of each of these images (one or two corruptions of every type, 5% left clean) — broad but
  shallow, like CLIP's pre-training;
- fine-tuning train split, 45% (clean); ID validation, 10% (clean); ID test, 30% (clean).

Robust fine-tuning setting (task ``digits``, classes ``"0".."9"``): θ0's head is the task's fixed head;
``ft`` (θ1) and the other fine-tuned models start from θ0 and train the encoder on the clean fine-tuning split
with the head frozen (AdamW, 200 steps of 64 images, learning rate 3e-4; ``ft_lr1e-3`` uses 1e-3). Fine-tuning
on clean data only gains accuracy in distribution and forgets some of θ0's robustness. Test sets: the ID test
images clean, and the same images under each corruption of :data:`CORRUPTIONS` (one dataset per shift).

Multi-task setting: the 8 tasks of :data:`TASKS`, each a label space over digits with its own corruption.
A task's images are the 85% outside the pre-training pool, split 60/15/25% into train/validation/test per task
(stratified, per-task seeded, corrupted with a per-task seeded generator). A task's fixed head is a linear probe
on θ0's L2-normalized features of its training split (the stand-in for a CLIP zero-shot text head), and its
fine-tuned model θt is θ0's encoder trained on that split with the head frozen (150 steps of 64, learning rate
3e-4).

Everything is a deterministic function of the seed: numpy Generators and torch seeds derived from
``(seed, purpose)``, a fixed torch thread count, safetensors headers with fixed, sorted metadata, and Parquet
(whose writer is deterministic for a given pyarrow version), so two builds with the same seed on the same
machine give byte-identical files. Training data are not written out (the build regenerates them from the seed);
validation and test sets are.

Layout under the zoo root (paths in ``manifest.yaml`` are relative to it)::

    checkpoints/zeroshot.safetensors            θ0 encoder
    checkpoints/robust/<name>.safetensors       fine-tuned encoders of the robust setting
    checkpoints/multitask/<task>.safetensors    fine-tuned encoders of the multi-task setting
    heads/digits.safetensors, heads/<task>.safetensors
    data/robust/{validation,test,<shift>}/      Parquet shards (see raymerge.data)
    data/multitask/<task>/{validation,test}/
    manifest.yaml                               settings, sha256 of every file, reference accuracies

Command line: ``python -m raymerge.zoo build [--cache-dir DIR] [--seed N] [--force]`` and
``python -m raymerge.zoo verify [--cache-dir DIR] [--seed N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import yaml
from filelock import FileLock
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from raymerge.errors import InputError
from raymerge import merge
from raymerge._io import atomic_dir, default_cache_dir, remove_stale_siblings
from raymerge.data import ImageDataset, write_parquet
from raymerge.models import (
    Head,
    build_encoder,
    embed_dim,
    image_size,
    predict_logits,
    preprocess,
    save_head,
    save_state_dict_file,
)

logger = logging.getLogger(__name__)

ARCHITECTURE = "raymerge-tiny-vit"
ZOO_NAME = "raymerge-embedded-zoo"
ZOO_VERSION = 1
MANIFEST = "manifest.yaml"
ZEROSHOT_CHECKPOINT = "checkpoints/zeroshot.safetensors"
DESCRIPTION = "tiny open_clip ViTs trained on scikit-learn digits; NOT ImageNet/CLIP scale"

# One fixed intra-op thread count: CPU kernels split their reductions by thread, so the count is part of what
# makes the weights bit-for-bit reproducible. One thread also keeps the build from collapsing when the cores are
# shared: multi-threaded kernels spin at barriers while a sibling thread waits to be scheduled.
BUILD_THREADS = 1
EVAL_BATCH = 256
# Temperature of θ0's cosine classifier (CLIP's is 100 over 512-d text embeddings): without it, logits over
# unit-norm features start near zero and the jointly trained head learns slowly.
LOGIT_SCALE = 10.0

DIGIT_CLASSES = tuple(str(d) for d in range(10))
SPLIT_FRACTIONS = {"pretrain": 0.15, "train": 0.45, "validation": 0.10, "test": 0.30}
TASK_SPLIT_FRACTIONS = {"train": 0.60, "validation": 0.15, "test": 0.25}


class ZooError(InputError):
    """A zoo is missing, incomplete or corrupted; the message names the file."""


# ----------------------------------------------------------------------------------------------------------
# Corruptions, in the spirit of MNIST-C: each maps a float (16, 16) image in 0–255 (ink bright on black) and a
# numpy Generator to a float image, drawing its parameters (angle, sigma, ...) from the generator.


def _affine_about_center(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resample ``img`` at ``matrix @ (p - c) + c`` for every output pixel p (c the image center)."""
    center = (np.asarray(img.shape, dtype=np.float64) - 1) / 2
    return ndimage.affine_transform(img, matrix, offset=center - matrix @ center, order=1, mode="constant")


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = np.deg2rad(rng.uniform(25, 50) * rng.choice([-1, 1]))
    c, s = np.cos(angle), np.sin(angle)
    return _affine_about_center(img, np.array([[c, -s], [s, c]]))


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0.0, rng.uniform(50, 80), img.shape)


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - img


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma=rng.uniform(1.2, 1.8), mode="constant")


def _scale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # zoom out: the digit shrinks to 45–60% of its size around a slightly jittered center
    zoom = rng.uniform(0.45, 0.6)
    center = (np.asarray(img.shape, dtype=np.float64) - 1) / 2
    shift = rng.uniform(-2, 2, size=2)
    matrix = np.eye(2) / zoom
    return ndimage.affine_transform(img, matrix, offset=center - matrix @ (center + shift), order=1, mode="constant")


def _shear(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = rng.uniform(0.5, 0.8) * rng.choice([-1, 1])
    return _affine_about_center(img, np.array([[1.0, 0.0], [s, 1.0]]))


def _contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # squeeze the range to 12–25% of itself around a mid-gray background
    c = rng.uniform(0.12, 0.25)
    return 128.0 + (img - 128.0) * c


def _impulse(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    hit = rng.random(img.shape) < rng.uniform(0.12, 0.2)
    out[hit] = np.where(rng.random(img.shape) < 0.5, 0.0, 255.0)[hit]
    return out


def _elastic(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # smooth random displacement field, up to a few pixels
    alpha = rng.uniform(8, 12)
    dy, dx = (alpha * ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape), sigma=2.0, mode="constant") for _ in "yx")
    rows, cols = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    return ndimage.map_coordinates(img, [rows + dy, cols + dx], order=1, mode="constant")


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "rotate": _rotate,
    "noise": _noise,
    "invert": _invert,
    "blur": _blur,
    "scale": _scale,
    "shear": _shear,
    "contrast": _contrast,
    "impulse": _impulse,
    "elastic": _elastic,
}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def corrupt(images: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption ``name`` to uint8 images (N, 16, 16), drawing each image's parameters from ``rng`` in order."""
    fn = CORRUPTIONS[name]
    return np.stack([_to_uint8(fn(img.astype(np.float64), rng)) for img in images]) if len(images) else images.copy()


def _augment(images: np.ndarray, rng: np.random.Generator, clean_fraction: float) -> np.ndarray:
    """θ0's broad pre-training distribution: per image, clean with probability ``clean_fraction``, else one or two
    distinct corruptions (of every type) in random order."""
    names = list(CORRUPTIONS)
    out = []
    for img in images:
        x = img.astype(np.float64)
        if rng.random() >= clean_fraction:
            for i in rng.choice(len(names), size=rng.choice([1, 2], p=[0.7, 0.3]), replace=False):
                # clipped between steps: every corruption expects a valid 0–255 image
                x = np.clip(CORRUPTIONS[names[i]](x, rng), 0, 255)
        out.append(_to_uint8(x))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Tasks and data


@dataclass(frozen=True)
class Task:
    """A multi-task task: a labeling of digits (``digit_to_class[d]`` indexes ``class_names``) under one corruption."""

    name: str
    corruption: str
    class_names: tuple[str, ...]
    digit_to_class: tuple[int, ...]


def _digit_task(name: str, corruption: str, class_names: Sequence[str], of_digit: Callable[[int], int]) -> Task:
    return Task(name, corruption, tuple(class_names), tuple(of_digit(d) for d in range(10)))


# Contrast is left to the robust shifts: ln_pre normalizes every patch token, which makes the ViT nearly
# invariant to contrast, so θ0 is at ceiling on a contrast task and fine-tuning has nothing to add.
TASKS: tuple[Task, ...] = (
    _digit_task("digit-rotate", "rotate", DIGIT_CLASSES, lambda d: d),
    _digit_task("parity-noise", "noise", ("even", "odd"), lambda d: d % 2),
    _digit_task("geq5-invert", "invert", ("less than 5", "5 or more"), lambda d: int(d >= 5)),
    _digit_task("mod3-blur", "blur", ("0 mod 3", "1 mod 3", "2 mod 3"), lambda d: d % 3),
    _digit_task("digit-scale", "scale", DIGIT_CLASSES, lambda d: d),
    _digit_task("prime-elastic", "elastic", ("not prime", "prime"), lambda d: int(d in (2, 3, 5, 7))),
    _digit_task("loop-shear", "shear", ("no closed loop", "closed loop"), lambda d: int(d in (0, 4, 6, 8, 9))),
    _digit_task("mod4-impulse", "impulse", ("0 mod 4", "1 mod 4", "2 mod 4", "3 mod 4"), lambda d: d % 4),
)


def _subseed(seed: int, *purpose: str) -> list[int]:
    """Entropy for a Generator or torch seed, a stable function of ``seed`` and a purpose path (no ``hash()``,
    which Python randomizes per process)."""
    return [seed, *(int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little") for p in purpose)]


def _rng(seed: int, *purpose: str) -> np.random.Generator:
    return np.random.default_rng(_subseed(seed, *purpose))


def _torch_seed(seed: int, *purpose: str) -> int:
    return int(_rng(seed, *purpose, "torch").integers(2**62))


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (1797, 16, 16) in 0–255 (the 8×8 originals, 0–16, upsampled
    bilinearly ×2) and int64 digit labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([ndimage.zoom(img * (255.0 / 16.0), 2, order=1, mode="nearest") for img in digits.images])
    return _to_uint8(images), digits.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Disjoint index arrays (sorted) per split, each holding about ``fractions[split]`` of every label's indices."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    bounds = np.cumsum([0.0, *fractions.values()])
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.rint(bounds * len(idx) / bounds[-1]).astype(int)
        for name, lo, hi in zip(fractions, cuts[:-1], cuts[1:]):
            parts[name].append(idx[lo:hi])
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


@dataclass(frozen=True)
class _Scale:
    """How much data and training a build uses; ``tiny`` keeps the structure and takes seconds (for tests)."""

    images_per_digit: int | None  # None: all 1797 images
    pretrain_copies: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    multitask_steps: int
    multitask_batch: int


SCALES = {
    "full": _Scale(images_per_digit=None, pretrain_copies=40, pretrain_steps=700, pretrain_batch=128,
                   finetune_steps=200, finetune_batch=64, multitask_steps=150, multitask_batch=64),
    "tiny": _Scale(images_per_digit=12, pretrain_copies=2, pretrain_steps=6, pretrain_batch=32,
                   finetune_steps=3, finetune_batch=16, multitask_steps=2, multitask_batch=16),
}
PRETRAIN_LR = 1e-3
PRETRAIN_CLEAN_FRACTION = 0.05
MULTITASK_LR = 3e-4
# L2 penalty of the multi-task linear probes: keeps their logits in a calibrated range (row norms around 5)
PROBE_WEIGHT_DECAY = 1e-3

# Robust fine-tuned models (name, purpose of the data-order seed, learning rate); the first is θ1. The lr of 3e-4
# trades ID gains against forgetting the way CLIP fine-tuning does; 1e-3 forgets much more.
ROBUST_FINETUNES: tuple[tuple[str, str, float], ...] = (
    ("ft", "ft", 3e-4),
    ("ft_seed1", "ft_seed1", 3e-4),
    ("ft_lr1e-3", "ft", 1e-3),
)


# ----------------------------------------------------------------------------------------------------------
# Training


class _CosineHead(nn.Module):
    """A trainable linear head over L2-normalized features: the form every zoo :class:`Head` has."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * self.linear(nn.functional.normalize(features, dim=-1))

    def to_head(self, class_names: Sequence[str]) -> Head:
        w, b = self.linear.weight.detach(), self.linear.bias.detach()
        return Head((LOGIT_SCALE * w).clone(), (LOGIT_SCALE * b).clone(), tuple(class_names), normalize=True)


def _train(
    encoder: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: list[int],
    desc: str,
) -> None:
    """AdamW on cross-entropy of ``head(encoder(x))`` over uint8 ``images`` (N, 16, 16), epochs of seeded shuffles,
    linear warm-up over the first 10% of ``steps`` then cosine decay to 0."""
    rng = np.random.default_rng(seed)
    size = image_size(ARCHITECTURE)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    order = np.zeros(0, dtype=np.int64)
    encoder.train()
    bar = tqdm(range(steps), desc=desc, file=sys.stderr, mininterval=1.0, leave=False)
    loss_sum = correct = seen = 0.0
    for step in bar:
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(labels))])
        idx, order = order[:batch_size], order[batch_size:]
        x = preprocess(images[idx], size)
        y = torch.from_numpy(labels[idx])
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        logits = head(encoder(x))
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # running statistics over the last ~10% of steps, so the final line reports the trained model
        if step >= steps - max(1, steps // 10):
            loss_sum += loss.item() * len(idx)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(idx)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    encoder.eval()
    logger.info("%s: %d steps, final loss %.3f, train accuracy %.3f", desc, steps, loss_sum / seen, correct / seen)


@torch.no_grad()
def _features(encoder: nn.Module, images: np.ndarray) -> torch.Tensor:
    """L2-normalized encoder features (N, D) of uint8 images (N, 16, 16)."""
    x = preprocess(images, image_size(ARCHITECTURE))
    features = torch.cat([encoder(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    return nn.functional.normalize(features, dim=-1)


def _linear_probe(features: torch.Tensor, labels: np.ndarray, class_names: Sequence[str], weight_decay: float) -> Head:
    """Multinomial logistic regression (L2 penalty ``weight_decay``·|W|²) on normalized features (N, D), fit to
    convergence with full-batch L-BFGS, as a :class:`Head` with ``normalize=True``."""
    num_classes, dim = len(class_names), features.shape[1]
    weight = torch.zeros(num_classes, dim, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    y = torch.from_numpy(labels)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(features @ weight.T + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Head(weight.detach().clone(), bias.detach().clone(), tuple(class_names), normalize=True)


def _accuracy(encoder: nn.Module, head: Head, dataset: ImageDataset) -> float:
    logits = predict_logits(encoder, head, preprocess(dataset.images, image_size(ARCHITECTURE)), EVAL_BATCH)
    return round(float((logits.argmax(1) == dataset.labels).mean()), 4)


def _encoder_with(weights: dict[str, torch.Tensor]) -> nn.Module:
    encoder = build_encoder(ARCHITECTURE)
    encoder.load_state_dict(weights)
    return encoder


def _snapshot(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Building


def zoo_dir(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Where the zoo of ``seed`` lives: ``<cache_dir>/zoo-seed<seed>``, ``cache_dir`` defaulting to
    :func:`default_cache_dir`."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"zoo-seed{seed}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lock(root: Path) -> FileLock:
    """An exclusive lock on ``<root>.lock``: serializes builds of one zoo across processes."""
    root.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(root.with_name(root.name + ".lock"))


def _write_dataset(root: Path, rel: str, name: str, images: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str], split: str) -> str:
    write_parquet(ImageDataset(name, images, labels, tuple(class_names), split), root / rel)
    return rel


def _write_encoder(root: Path, rel: str, weights: dict[str, torch.Tensor], seed: int, role: str) -> str:
    meta = {"raymerge.architecture": ARCHITECTURE, "raymerge.model": role, "raymerge.zoo_seed": str(seed)}
    save_state_dict_file(weights, root / rel, metadata=meta)
    return rel


def _write_head(root: Path, rel: str, head: Head) -> str:
    save_head(head, root / rel)
    return rel


def _build_robust(root: Path, seed: int, scale: _Scale, images: np.ndarray, labels: np.ndarray,
                  splits: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Train θ0 and the robust fine-tuned models; write their files and the robust data.

    Returns θ0's weights, the robust ``settings`` entry and the robust ``reference_accuracy`` entry.
    """
    logger.info("robust data: ID validation %d, ID test %d images; shifts %s",
                len(splits["validation"]), len(splits["test"]), ", ".join(CORRUPTIONS))
    test_images, test_labels = images[splits["test"]], labels[splits["test"]]
    eval_sets = {"id": ImageDataset("test", test_images, test_labels, DIGIT_CLASSES)}
    task_entry = {
        "head": "heads/digits.safetensors",
        "validation": _write_dataset(root, "data/robust/validation", "validation", images[splits["validation"]],
                                     labels[splits["validation"]], DIGIT_CLASSES, "validation"),
        "test": _write_dataset(root, "data/robust/test", "test", test_images, test_labels, DIGIT_CLASSES, "test"),
        "shifts": {},
    }
    for shift in CORRUPTIONS:
        shifted = corrupt(test_images, shift, _rng(seed, "robust", "shift", shift))
        task_entry["shifts"][shift] = _write_dataset(root, f"data/robust/{shift}", shift, shifted, test_labels,
                                                     DIGIT_CLASSES, "test")
        eval_sets[shift] = ImageDataset(shift, shifted, test_labels, DIGIT_CLASSES)

    pool = np.repeat(splits["pretrain"], scale.pretrain_copies)
    logger.info("pre-training data: %d images × %d corrupted copies", len(splits["pretrain"]), scale.pretrain_copies)
    pretrain_images = _augment(images[pool], _rng(seed, "pretrain", "augment"), PRETRAIN_CLEAN_FRACTION)
    torch.manual_seed(_torch_seed(seed, "pretrain", "init"))
    encoder = build_encoder(ARCHITECTURE)
    head_module = _CosineHead(embed_dim(ARCHITECTURE), len(DIGIT_CLASSES))
    _train(encoder, head_module, [*encoder.parameters(), *head_module.parameters()], pretrain_images, labels[pool],
           steps=scale.pretrain_steps, batch_size=scale.pretrain_batch, lr=PRETRAIN_LR, weight_decay=0.05,
           seed=_subseed(seed, "pretrain", "order"), desc="zeroshot (θ0) pre-training")
    theta0 = _snapshot(encoder)
    head = head_module.to_head(DIGIT_CLASSES)
    _write_encoder(root, ZEROSHOT_CHECKPOINT, theta0, seed, "zeroshot")
    _write_head(root, task_entry["head"], head)

    finetuned, tuned = {}, {}
    accuracy = {"zeroshot": {name: _accuracy(encoder, head, ds) for name, ds in eval_sets.items()}}
    train_images, train_labels = images[splits["train"]], labels[splits["train"]]
    for name, order_purpose, lr in ROBUST_FINETUNES:
        encoder = _encoder_with(theta0)
        _train(encoder, head.logits, list(encoder.parameters()), train_images, train_labels,
               steps=scale.finetune_steps, batch_size=scale.finetune_batch, lr=lr, weight_decay=0.1,
               seed=_subseed(seed, "robust", order_purpose), desc=f"robust {name}")
        tuned[name] = _snapshot(encoder)
        finetuned[name] = _write_encoder(root, f"checkpoints/robust/{name}.safetensors", tuned[name], seed, name)
        accuracy[name] = {split: _accuracy(encoder, head, ds) for split, ds in eval_sets.items()}
    # WiSE-FT halfway between θ0 and θ1: a sanity check that interpolation recovers robustness
    theta1 = tuned[ROBUST_FINETUNES[0][0]]
    wise = _encoder_with(merge.interpolate(theta0, theta1, 0.5))
    accuracy["wise_ft_0.5"] = {split: _accuracy(wise, head, ds) for split, ds in eval_sets.items()}
    for row in accuracy.values():
        row["ood_mean"] = round(float(np.mean([row[s] for s in CORRUPTIONS])), 4)

    settings = {
        "model_pool": {"architecture": ARCHITECTURE, "base": ZEROSHOT_CHECKPOINT, "finetuned": finetuned},
        "task_pool": {"digits": task_entry},
    }
    return theta0, settings, accuracy


def _build_multitask(root: Path, seed: int, scale: _Scale, images: np.ndarray, labels: np.ndarray,
                     pool: np.ndarray, theta0: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Probe heads and fine-tune θ0 per task; write their files and the task data.

    ``pool`` indexes the images outside the pre-training pool. Returns the multitask ``settings`` entry and its
    ``reference_accuracy`` entry.
    """
    logger.info("multi-task: %d tasks over %d images (%s)", len(TASKS), len(pool),
                ", ".join(f"{t.name}: {len(t.class_names)} classes" for t in TASKS))
    zeroshot = _encoder_with(theta0)
    finetuned, task_pool, heads, tests, weights = {}, {}, {}, {}, {}
    for task in TASKS:
        digit_to_class = np.asarray(task.digit_to_class, dtype=np.int64)
        parts = stratified_split(labels[pool], TASK_SPLIT_FRACTIONS, _rng(seed, "multitask", task.name, "split"))
        data = {}
        for split, idx in parts.items():
            x = corrupt(images[pool[idx]], task.corruption, _rng(seed, "multitask", task.name, "corrupt", split))
            data[split] = (x, digit_to_class[labels[pool[idx]]])
        entry = {"head": f"heads/{task.name}.safetensors", "finetuned": task.name}
        for split in ("validation", "test"):
            entry[split] = _write_dataset(root, f"data/multitask/{task.name}/{split}", f"{task.name}-{split}",
                                          *data[split], task.class_names, split)
        features = _features(zeroshot, data["train"][0])
        head = _linear_probe(features, data["train"][1], task.class_names, PROBE_WEIGHT_DECAY)
        _write_head(root, entry["head"], head)

        encoder = _encoder_with(theta0)
        _train(encoder, head.logits, list(encoder.parameters()), *data["train"],
               steps=scale.multitask_steps, batch_size=scale.multitask_batch, lr=MULTITASK_LR, weight_decay=0.1,
               seed=_subseed(seed, "multitask", task.name, "order"), desc=f"multitask {task.name}")
        weights[task.name] = _snapshot(encoder)
        finetuned[task.name] = _write_encoder(root, f"checkpoints/multitask/{task.name}.safetensors",
                                              weights[task.name], seed, task.name)
        task_pool[task.name] = entry
        heads[task.name] = head
        tests[task.name] = ImageDataset(task.name, *data["test"], task.class_names)

    names = [t.name for t in TASKS]
    average = _encoder_with(merge.weight_average([weights[n] for n in names], names))
    arithmetic = _encoder_with(merge.task_arithmetic(theta0, [weights[n] for n in names], 0.3, names=names))
    accuracy = {
        "zeroshot": {n: _accuracy(zeroshot, heads[n], tests[n]) for n in names},
        "finetuned": {n: _accuracy(_encoder_with(weights[n]), heads[n], tests[n]) for n in names},
        "weight_average": {n: _accuracy(average, heads[n], tests[n]) for n in names},
        "task_arithmetic_0.3": {n: _accuracy(arithmetic, heads[n], tests[n]) for n in names},
    }
    for row in accuracy.values():
        row["mean"] = round(float(np.mean([row[n] for n in names])), 4)
    settings = {
        "model_pool": {"architecture": ARCHITECTURE, "base": ZEROSHOT_CHECKPOINT, "finetuned": finetuned},
        "task_pool": task_pool,
    }
    return settings, accuracy


def _build_into(root: Path, seed: int, scale_name: str) -> dict:
    """Build every file of the zoo under the empty directory ``root``; return the manifest (not yet written)."""
    start = time.perf_counter()
    scale = SCALES[scale_name]
    logger.info("building the embedded zoo (seed %d, scale %s) in %s", seed, scale_name, root)
    images, labels = load_digit_images()
    if scale.images_per_digit is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == d)[: scale.images_per_digit] for d in range(10)]))
        images, labels = images[keep], labels[keep]
    splits = stratified_split(labels, SPLIT_FRACTIONS, _rng(seed, "splits"))
    logger.info("digits: %d images, split %s", len(labels), {k: len(v) for k, v in splits.items()})
    theta0, robust_settings, robust_accuracy = _build_robust(root, seed, scale, images, labels, splits)
    pool = np.sort(np.concatenate([splits["train"], splits["validation"], splits["test"]]))
    multitask_settings, multitask_accuracy = _build_multitask(root, seed, scale, images, labels, pool, theta0)
    logger.info(
        "test accuracy: robust ID/OOD-mean %s; multi-task mean %s",
        ", ".join(f"{name} {row['id']:.3f}/{row['ood_mean']:.3f}" for name, row in robust_accuracy.items()),
        ", ".join(f"{name} {row['mean']:.3f}" for name, row in multitask_accuracy.items()),
    )
    files = {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return {
        "name": ZOO_NAME,
        "version": ZOO_VERSION,
        "seed": seed,
        "description": DESCRIPTION,
        "settings": {"robust": robust_settings, "multitask": multitask_settings},
        "files": files,
        "reference_accuracy": {"robust": robust_accuracy, "multitask": multitask_accuracy},
        "build": {
            "seconds": round(time.perf_counter() - start, 1),
            "threads": BUILD_THREADS,
            "torch": str(torch.__version__),
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
            "scale": scale_name,
        },
    }


def _build_locked(root: Path, seed: int, scale: str) -> Path:
    """Build in a temporary directory, write the manifest last, then swap it in at ``root`` (caller holds the lock)."""
    if scale not in SCALES:
        raise ValueError(f"unknown zoo scale {scale!r}; expected one of {sorted(SCALES)}")
    if root.exists() and not (root / MANIFEST).is_file() and any(root.iterdir()):
        raise ZooError(f"{root} exists and is not a zoo (no {MANIFEST}); refusing to replace it")
    remove_stale_siblings(root)  # left by a killed build; nobody else can be using them under the lock
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        # built aside and swapped in whole (a Ctrl-C leaves no half-built zoo), the manifest written last
        with atomic_dir(root) as tmp, torch.random.fork_rng(devices=[]):
            manifest = _build_into(tmp, seed, scale)
            (tmp / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
    finally:
        torch.set_num_threads(threads)
    logger.info("zoo written to %s in %.1f s", root, manifest["build"]["seconds"])
    return root / MANIFEST


def build_zoo(root: str | Path, seed: int = 0, scale: str = "full") -> Path:
    """Build the zoo of ``seed`` at ``root`` (replacing any zoo there) and return its manifest path.

    ``scale="full"`` takes about 2 minutes (one CPU thread); ``"tiny"`` has the same structure with a handful of
    images and training steps and takes seconds, for tests. Safe against concurrent builds of the same ``root``
    (a lock file) and against interruption (nothing appears at ``root`` until the manifest is written).
    """
    root = Path(root)
    with _lock(root):
        return _build_locked(root, seed, scale)


def ensure_zoo(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The manifest path of the full-scale zoo of ``seed`` under ``cache_dir``, building it on first use.

    A zoo directory only appears, by rename, once complete, so a manifest there means a finished build;
    concurrent callers wait on the lock and the second one finds the first one's zoo.
    """
    root = zoo_dir(cache_dir, seed)
    if (root / MANIFEST).is_file():
        return root / MANIFEST
    with _lock(root):
        if (root / MANIFEST).is_file():
            return root / MANIFEST
        return _build_locked(root, seed, "full")


def verify_zoo(manifest_path: str | Path) -> dict:
    """Rehash every file listed in the manifest; return the manifest, or raise :class:`ZooError` naming the first
    file that is missing or whose sha256 differs."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise ZooError(f"zoo manifest {manifest_path} does not exist (build it with: python -m raymerge.zoo build)")
    manifest = yaml.safe_load(manifest_path.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ZooError(f"zoo manifest {manifest_path} has no 'files' mapping")
    root = manifest_path.parent
    for rel, expected in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise ZooError(f"zoo file {path} listed in {manifest_path} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ZooError(f"zoo file {path} is corrupted: sha256 {actual}, manifest {manifest_path} says {expected}")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Command line


def format_reference_accuracy(manifest: dict) -> str:
    """The manifest's ``reference_accuracy`` as two plain-text tables (percent)."""
    acc = manifest["reference_accuracy"]
    lines = []
    for setting, label in (("robust", "robust setting (test accuracy %, ID and shifts)"),
                           ("multitask", "multi-task setting (test accuracy % per task)")):
        rows = acc[setting]
        columns = list(next(iter(rows.values())))
        width = max(len(c) for c in columns) + 1
        lines.append(label)
        lines.append(f"{'':<20}" + "".join(f"{c:>{width}}" for c in columns))
        for name, row in rows.items():
            lines.append(f"{name:<20}" + "".join(f"{100 * row[c]:>{width}.1f}" for c in columns))
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``build`` (or rebuild with ``--force``) or ``verify`` the zoo of a seed; prints a summary on stdout."""
    parser = argparse.ArgumentParser(prog="python -m raymerge.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"build": "build the zoo (no-op if it exists, unless --force)", "verify": "rehash the zoo's files"}
    for name, text in commands.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache-dir", type=Path, default=None, help="default: $RAYMERGE_CACHE or ~/.cache/raymerge")
        cmd.add_argument("--seed", type=int, default=0)
        if name == "build":
            cmd.add_argument("--force", action="store_true", help="rebuild even if the zoo exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = zoo_dir(args.cache_dir, args.seed)
    if args.command == "verify":
        try:
            verify_zoo(root / MANIFEST)
        except ZooError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"zoo {root / MANIFEST}: all files match their sha256")
        return 0
    existed = (root / MANIFEST).is_file()
    manifest_path = build_zoo(root, args.seed) if args.force else ensure_zoo(args.cache_dir, args.seed)
    manifest = yaml.safe_load(manifest_path.read_text())
    status = "already built" if existed and not args.force else f"built in {manifest['build']['seconds']:.0f} s"
    print(f"zoo {manifest_path}: {status}\n")
    print(format_reference_accuracy(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
