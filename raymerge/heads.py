"""Zero-shot classification heads: a CLIP text tower, class names and prompt templates → a fixed linear head.

Eq.: w_c = s · normalize(mean_t normalize(f_text(template_t(c)))), with s = exp(logit_scale) — CLIP's zero-shot
classifier, as task_vectors' ``build_classification_head`` computes it. open_clip's tokenizer and
``build_zero_shot_classifier`` do the work; raymerge resolves the class names, templates and weights, scales by
the logit scale and caches the head.

The class names and templates of the 8-, 14- and 20-task benchmarks ship in ``zero_shot_data/`` (taken from
tanganke/fusion_bench, whose templates equal mlfoundations/task_vectors'); ImageNet's come from open_clip.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from filelock import FileLock
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from raymerge import formats, models, statedict
from raymerge.errors import InputError
from raymerge.models import Head
from raymerge.statedict import StateDict

DATA_DIR = Path(__file__).parent / "zero_shot_data"
HEAD_VERSION = "1"  # part of every cache key: bump it when the head computation changes

logger = logging.getLogger(__name__)


class HeadError(InputError):
    """Class names or templates that cannot be resolved: the message names the file, line or known names."""


def _imagenet() -> dict:
    from open_clip import zero_shot_metadata as meta

    return {"classnames": list(meta.IMAGENET_CLASSNAMES), "templates": [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]}


def _simple_imagenet_templates() -> list[str]:
    from open_clip import zero_shot_metadata as meta

    return [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]


def known_datasets() -> list[str]:
    """Names accepted as ``classes`` (and as ``templates``; ``ImageNet-simple`` is a template set only)."""
    return sorted([p.stem for p in DATA_DIR.glob("*.json")] + ["ImageNet"], key=str.lower)


def known_template_sets() -> list[str]:
    return sorted([*known_datasets(), "ImageNet-simple"], key=str.lower)


def _dataset(name: str) -> dict | None:
    lowered = name.lower()
    if lowered == "imagenet":
        return _imagenet()
    for path in DATA_DIR.glob("*.json"):
        if path.stem.lower() == lowered:
            return json.loads(path.read_text())
    return None


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise HeadError(f"{what} file {path} cannot be read: {err}") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise HeadError(f"{what} file {path} is empty")
    return lines


def class_names(spec: str | Path | Sequence[str]) -> tuple[str, ...]:
    """A known dataset name (:func:`known_datasets`), a file with one class name per line, or the names themselves."""
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if path.is_file():
            names = [line for _, line in _lines(path, "class names")]
        else:
            data = _dataset(str(spec))
            if data is None:
                raise HeadError(
                    f"class names {str(spec)!r} are neither a file nor a known list: {', '.join(known_datasets())}"
                )
            names = data["classnames"]
    else:
        names = [str(n) for n in spec]
    if not names:
        raise HeadError("the list of class names is empty")
    # repeated names are allowed: OpenAI's ImageNet list has two 'missile' and two 'sunglasses' classes
    return tuple(names)


def _check_template(template: str, where: str) -> None:
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as err:
        raise HeadError(f"template {template!r} ({where}) is not a format string with one {{}}: {err}") from None
    if "\0" not in filled:
        raise HeadError(f"template {template!r} ({where}) has no {{}} where the class name goes")


def templates(spec: str | Path | Sequence[str]) -> tuple[str, ...]:
    """A known template set (:func:`known_template_sets`), a file with one template per line, or the templates;
    each holds ``{}`` where the class name goes."""
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if path.is_file():
            found = _lines(path, "templates")
            for number, line in found:
                _check_template(line, f"line {number} of {path}")
            return tuple(line for _, line in found)
        if str(spec).lower() == "imagenet-simple":
            return tuple(_simple_imagenet_templates())
        data = _dataset(str(spec))
        if data is None:
            raise HeadError(
                f"templates {str(spec)!r} are neither a file nor a known set: {', '.join(known_template_sets())}"
            )
        return tuple(data["templates"])
    listed = tuple(str(t) for t in spec)
    if not listed:
        raise HeadError("the list of templates is empty")
    for i, template in enumerate(listed):
        _check_template(template, f"template {i}")
    return listed


def _clip_model(architecture: str) -> open_clip.model.CLIP:
    """An open_clip ``CLIP`` of ``architecture`` with random weights (built as ``open_clip.create_model`` does)."""
    cfg = dict(models.encoder_config(architecture))
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}) or "multimodal_cfg" in cfg:
        raise HeadError(f"{architecture} has a custom text tower: raymerge builds zero-shot heads with CLIP's own")
    cfg.pop("preprocess_cfg", None)
    return open_clip.model.CLIP(**cfg).eval()


def text_weights(architecture: str, weights: str | Path) -> StateDict:
    """The text tower of ``weights`` (open_clip names: ``token_embedding.weight``, ..., ``text_projection``,
    ``logit_scale``), from any checkpoint :func:`raymerge.formats.read_clip` reads; keys checked."""
    clip = formats.read_clip(weights, architecture)
    text = {k: v for k, v in clip.items() if not k.startswith("visual.")}
    with torch.device("meta"):
        reference = {k: v for k, v in _clip_model(architecture).state_dict().items() if not k.startswith("visual.")}
    missing = [k for k in reference if k not in text]
    if missing:
        raise models.CheckpointError(
            f"{weights} has no text tower key {missing[0]!r}: zero-shot heads need a whole CLIP (an open_clip file, "
            "a Hugging Face CLIPModel, or an ImageEncoder saved with keep_lang=True)"
        )
    text = {k: v.float() for k, v in text.items() if k in reference}
    models.check_architecture(reference, text, f"text tower of {weights} (model {architecture})")
    return text


@torch.no_grad()
def build_head(
    architecture: str, text: StateDict, classes: Sequence[str], prompt_templates: Sequence[str], device: str = "cpu"
) -> Head:
    """The zero-shot head of already-resolved class names and templates: weight (C, D), normalize=True, no bias."""
    model = _clip_model(architecture)
    model.load_state_dict(text, strict=False)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(architecture)
    # (D, C): each class's template embeddings normalized, averaged, normalized again
    classifier = build_zero_shot_classifier(
        model, tokenizer, list(classes), list(prompt_templates), num_classes_per_batch=10, device=device, use_tqdm=True
    )
    weight = (classifier.T * model.logit_scale.exp()).float().cpu().contiguous()
    return Head(weight, None, tuple(classes), normalize=True)


def zero_shot_head(
    architecture: str,
    weights: str | Path,
    classes: str | Path | Sequence[str],
    prompt_templates: str | Path | Sequence[str],
    cache_dir: str | Path | None = None,
    device: str | None = None,
) -> Head:
    """The zero-shot head of CLIP ``weights`` for ``classes`` and ``prompt_templates`` (each a known name, a file, or
    a list), cached under ``cache_dir`` (default ``$RAYMERGE_CACHE``) by (text weights, class names, templates).

    ``device`` defaults to CUDA when available: ImageNet's 80 templates × 1000 classes take hours on a CPU.
    """
    names, temps = class_names(classes), templates(prompt_templates)  # bad names fail before any weights are read
    text = text_weights(architecture, weights)
    key = hashlib.sha256(json.dumps({
        "architecture": architecture, "text": statedict.state_dict_hash(text), "classes": names,
        "templates": temps, "version": HEAD_VERSION,
    }).encode()).hexdigest()
    target = formats.cache_root(cache_dir) / "heads" / f"{key}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return models.load_head(target)
        logger.info("building a zero-shot head: %d classes × %d templates from %s", len(names), len(temps), weights)
        head = build_head(architecture, text, names, temps, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        models.save_head(head, target)
    return head
