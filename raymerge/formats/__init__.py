"""Every checkpoint format users arrive with, read into raymerge's own: open_clip's vision-tower state dict.

Formats:

- ``task_vectors``: pickled ``src.modeling.ImageEncoder`` / ``ClassificationHead`` modules (task_vectors,
  AdaMerging, CART; TALL-masks heads), read by a restricted unpickler (:mod:`raymerge.formats.pickles`);
- ``tall_masks``: ``ImageEncoder`` state dicts (``model.visual.*``, a ``model_name`` entry) of TALL-masks/TSV/Iso;
- ``hf``: Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` directories (:mod:`raymerge.formats.hf`);
- ``open_clip``: a whole open_clip CLIP state dict (``visual.*``), a local file or a pretrained tag found in
  open_clip's cache (``open_clip:TAG`` where a path is expected);
- ``raymerge``: the vision tower's own keys (``conv1.weight``, ..., ``proj``), as safetensors or a torch file.

Everything is first brought to open_clip CLIP names (``visual.*`` plus the text tower's keys where present); the
encoder is the ``visual.`` part, zero-shot heads use the rest (:mod:`raymerge.heads`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open

from raymerge import models
from raymerge.formats import hf, pickles
from raymerge.formats.pickles import UnsafePickleError
from raymerge.models import CheckpointError, Head
from raymerge.statedict import StateDict

__all__ = [
    "FORMATS", "UnsafePickleError", "detect_format", "read_encoder", "read_clip", "read_head", "import_checkpoint",
    "load_encoder", "import_cache_path", "resolve_pretrained", "resolve_source", "source_digest", "cache_root",
]

FORMATS = ("task_vectors", "tall_masks", "hf", "open_clip", "raymerge")
# Part of every cache key: bump it when a conversion's output changes.
CONVERTER_VERSION = "1"
PRETRAINED_PREFIX = "open_clip:"

_DESCRIPTION = {
    "task_vectors": "pickled task_vectors modules",
    "tall_masks": "an ImageEncoder state dict (model.visual.*)",
    "hf": "a Hugging Face CLIP directory",
    "open_clip": "an open_clip CLIP state dict (visual.*)",
    "raymerge": "an open_clip vision-tower state dict",
}

logger = logging.getLogger(__name__)


def _state_dict_format(keys: Sequence[str]) -> str:
    if any(k.startswith("model.visual.") for k in keys) or "model_name" in keys:
        return "tall_masks"
    if any(k.startswith(("visual.", "module.visual.")) for k in keys):
        return "open_clip"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    return "raymerge"


def _is_pickle(path: Path) -> bool:
    """Whether a file pickles Python objects beyond tensors (a static scan of zip files: nothing is built)."""
    if path.suffix == ".safetensors":
        return False
    if zipfile.is_zipfile(path):
        try:
            return bool(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as err:  # e.g. pickle protocol >= 4, which torch.save never writes by default
            raise CheckpointError(
                f"checkpoint {path} cannot be read safely: its pickle cannot be scanned by torch's restricted reader "
                f"({type(err).__name__}: {models.torch_load_reason(err)}); nothing was loaded"
            ) from None
    # the legacy (pre-1.6) format cannot be scanned: torch's weights_only reader refusing it means pickled objects
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return True
    except Exception:  # not a torch file at all: reading it as a state dict gives the message
        return False
    return False


def _check_exists(path: Path) -> None:
    if path.is_dir() and not hf.is_hf_dir(path):
        raise CheckpointError(f"{path} is a directory without config.json: not a Hugging Face checkpoint")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS`, from the directory layout, the safetensors header or the pickle's globals."""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        return "hf"
    if _is_pickle(path):
        return "task_vectors"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return _state_dict_format(list(f.keys()))
        except Exception as err:
            raise CheckpointError(f"checkpoint {path} cannot be read safely: {type(err).__name__}: {err}") from None
    return _state_dict_format(list(models.read_tensor_file(path)))


@dataclass(frozen=True)
class _Read:
    """A checkpoint in open_clip CLIP names (encoders) or as ``weight``/``bias`` (heads)."""

    format: str
    tensors: StateDict
    is_head: bool = False
    normalize: bool = True
    kind: str = ""
    activation: str | None = None  # the image tower's MLP activation, where the file records it


def _head_like(keys) -> bool:
    return "weight" in keys and set(keys) <= {"weight", "bias"}


def _strip(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _read_pickle(path: Path) -> _Read:
    obj = pickles.load_pickled_modules(path)
    cls = pickles.pickled_class(obj)
    sd = pickles.module_state_dict(obj, path)
    models.check_finite(sd, f"checkpoint {path}")
    if cls.endswith(".ClassificationHead") or (cls.endswith(".Linear") and _head_like(sd)):
        return _Read("task_vectors", sd, is_head=True, normalize=bool(pickles.pickled_attribute(obj, "normalize", False)),
                     kind=cls)
    if cls.endswith(".ImageEncoder"):
        visual = pickles.activation(pickles.submodule(obj, "model.visual"))
        return _Read("task_vectors", _strip(sd, "model."), kind=cls, activation=visual)
    if cls in ("open_clip.model.CLIP", "open_clip.model.CustomTextCLIP"):
        return _Read("task_vectors", sd, kind=cls, activation=pickles.activation(pickles.submodule(obj, "visual")))
    raise CheckpointError(
        f"{path} pickles a {cls}: raymerge imports pickled ImageEncoder, ClassificationHead and open_clip CLIP modules"
    )


def _read(path: Path, fmt: str, hf_check: Callable[[hf.HFCheckpoint], None] | None = None) -> _Read:
    """Read ``path`` (after checking it is ``fmt`` unless ``auto``) into open_clip CLIP names or a head."""
    if fmt not in ("auto", *FORMATS):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    _check_exists(path)
    sd: StateDict = {}
    if path.is_dir():
        detected = "hf"
    elif _is_pickle(path):
        detected = "task_vectors"
    else:
        sd = models.read_tensor_file(path)
        detected = _state_dict_format(list(sd))
    if fmt != "auto" and fmt != detected:
        raise CheckpointError(f"{path} is {_DESCRIPTION[detected]} (format {detected}), not format {fmt}")
    if detected == "hf":
        if not path.is_dir():
            raise CheckpointError(f"{path} holds Hugging Face CLIP weights: name its directory (with config.json)")
        ckpt = hf.open_checkpoint(path)
        if hf_check is not None:
            hf_check(ckpt)
        return _Read("hf", hf.to_open_clip(hf.read_weights(ckpt), f"Hugging Face directory {path}"), kind=ckpt.kind)
    if detected == "task_vectors":
        return _read_pickle(path)
    if _head_like(sd):
        return _Read(detected, sd, is_head=True)
    if detected == "tall_masks":
        return _Read(detected, _strip(sd, "model."))
    if detected == "open_clip":
        return _Read(detected, _strip(sd, "module."))
    return _Read(detected, {f"visual.{k}": v for k, v in sd.items()})


def resolve_source(path: str | Path, architecture: str) -> Path:
    """A checkpoint path; ``open_clip:TAG`` is resolved to ``TAG``'s file in open_clip's local cache."""
    text = str(path)
    if text.startswith(PRETRAINED_PREFIX):
        return resolve_pretrained(architecture, text[len(PRETRAINED_PREFIX) :])
    return Path(path).expanduser()


@functools.lru_cache(maxsize=8)
def _reference(architecture: str) -> StateDict:
    """The vision tower's keys and shapes, built on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return models.build_encoder(architecture).state_dict()


def read_encoder(
    path: str | Path, architecture: str, fmt: str = "auto", projection_from: str | Path | None = None
) -> StateDict:
    """Convert any supported checkpoint to ``architecture``'s vision-tower state dict (keys and shapes checked).

    Half-precision weights are widened to float32, exactly. A checkpoint without ``proj`` (a Hugging Face
    ``CLIPVisionModel``) takes it from ``projection_from`` (any format holding one, typically the base
    ``CLIPModel``). Raises :class:`CheckpointError` naming the file and key.
    """
    path = resolve_source(path, architecture)
    got = _read(path, fmt, hf_check=lambda ckpt: hf.check_vision_config(ckpt, architecture))
    return _encoder(got, path, architecture, projection_from)


def _encoder(got: _Read, path: Path, architecture: str, projection_from: str | Path | None) -> StateDict:
    reference = _reference(architecture)
    if got.is_head:
        raise CheckpointError(f"{path} is a classification head ({got.kind or 'weight/bias'}), not an image encoder")
    encoder = {k[len("visual.") :]: v for k, v in got.tensors.items() if k.startswith("visual.")}
    if not encoder:
        raise CheckpointError(f"{path} holds no image encoder weights (no visual.* keys in open_clip's names)")
    _check_activation(got, path, architecture)
    if "proj" in reference and "proj" not in encoder:
        if projection_from is None:
            raise CheckpointError(
                f"{path} ({got.kind or got.format}) has no visual projection: name the CLIPModel it was fine-tuned "
                "from with --projection-from (in an experiment, model_pool.projection_from)"
            )
        encoder["proj"] = read_encoder(projection_from, architecture)["proj"]
    encoder = {k: v.float() if v.is_floating_point() else v for k, v in encoder.items()}
    models.check_architecture(reference, encoder, f"checkpoint {path} (model {architecture})")
    return encoder


def _check_activation(got: _Read, path: Path, architecture: str) -> None:
    """OpenAI's CLIP weights need QuickGELU (open_clip's ``-quickgelu`` names): the same shapes with GELU would load
    and silently compute something else."""
    expected = "quick_gelu" if models.encoder_config(architecture).get("quick_gelu", False) else "gelu"
    if got.activation is None or got.activation == expected:
        return
    other = architecture + "-quickgelu" if got.activation == "quick_gelu" else architecture.removesuffix("-quickgelu")
    hint = f": name {other}" if other in models.model_names() else ""
    raise CheckpointError(
        f"{path} was pickled with {got.activation} activations in its image tower, but {architecture} uses "
        f"{expected}{hint}"
    )


def read_clip(path: str | Path, architecture: str) -> StateDict:
    """A whole CLIP's weights in open_clip's names (``visual.*`` and the text tower), e.g. to build zero-shot heads.

    Accepts an open_clip file, a Hugging Face ``CLIPModel`` directory, or a task_vectors ``ImageEncoder`` saved
    with its language tower.
    """
    path = resolve_source(path, architecture)
    got = _read(path, "auto", hf_check=lambda ckpt: hf.check_text_config(ckpt, architecture))
    if got.is_head:
        raise CheckpointError(f"{path} is a classification head, not a CLIP model")
    return got.tensors


def read_head(path: str | Path, class_names: Sequence[str] | None = None) -> Head:
    """A task_vectors ``ClassificationHead`` pickle, or a state dict with a (C, D) ``weight`` and optional ``bias``.

    Those files carry no class names: ``class_names`` supplies them, else they are ``"0"`` .. ``"C-1"``.
    """
    path = Path(path)
    return _head(_read(path, "auto"), path, class_names)


def _head(got: _Read, path: Path, class_names: Sequence[str] | None) -> Head:
    if not got.is_head:
        raise CheckpointError(f"{path} is {_DESCRIPTION[got.format]}, not a classification head")
    weight, bias = got.tensors["weight"], got.tensors.get("bias")
    if weight.ndim != 2:
        raise CheckpointError(f"head {path}: 'weight' has shape {tuple(weight.shape)}, expected (classes, features)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"head {path}: 'bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(weight.shape[0]))
    if len(names) != weight.shape[0]:
        raise CheckpointError(f"head {path} has {weight.shape[0]} classes but {len(names)} class names were given")
    return Head(weight.float(), None if bias is None else bias.float(), names, got.normalize)


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    fmt: str = "auto",
    architecture: str | None = None,
    projection_from: str | Path | None = None,
    class_names: Sequence[str] | None = None,
) -> str:
    """Write ``src`` in raymerge's form at ``out``: an encoder as its vision-tower safetensors (``architecture``
    required), a head as :func:`raymerge.models.save_head` writes it. Returns a one-line summary.

    ``out`` is written through a temporary file: a failed import leaves any earlier file there intact.
    """
    if architecture is not None:
        models.encoder_config(architecture)  # an unknown name fails before anything is read
    path = resolve_source(src, architecture or "")
    check = (lambda ckpt: hf.check_vision_config(ckpt, architecture)) if architecture else None
    got = _read(path, fmt, hf_check=check)
    if class_names is not None and not got.is_head:
        raise CheckpointError(f"{path} is an image encoder: class names go with a classification head")
    if got.is_head:
        head = _head(got, path, class_names)
        models.save_head(head, out)
        return f"wrote head {out}: {head.num_classes} classes × {head.weight.shape[1]} features from {got.format} {path}"
    if architecture is None:
        raise CheckpointError(f"{path} is an image encoder ({got.format}): name its architecture with --model")
    encoder = _encoder(got, path, architecture, projection_from)
    models.save_state_dict_file(encoder, out, metadata={"source": str(path), "format": got.format,
                                                        "architecture": architecture})
    return f"wrote {out}: {architecture} image encoder ({len(encoder)} tensors) from {got.format} {path}"


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint's bytes (of ``config.json`` and the weight files, for a Hugging Face directory)."""
    path = Path(path)
    files = [path / "config.json", *hf.open_checkpoint(path).weight_files()] if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        stat = file.stat()
        h.update(file.name.encode() + b"\0" + _file_digest(file.resolve(), stat.st_size, stat.st_mtime_ns).encode())
    return h.hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$RAYMERGE_CACHE``, else ``~/.cache/raymerge``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("RAYMERGE_CACHE") or Path.home() / ".cache" / "raymerge").expanduser()


def import_cache_path(
    path: Path, fmt: str, architecture: str, projection_from: str | Path | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Where the converted encoder of ``path`` is cached: keyed by the source's bytes, format and options."""
    options = {"format": fmt, "architecture": architecture, "converter": CONVERTER_VERSION,
               "source": source_digest(path),
               "projection_from": None if projection_from is None else source_digest(
                   resolve_source(projection_from, architecture))}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    return cache_root(cache_dir) / "imports" / f"{key}.safetensors"


def load_encoder(
    path: str | Path, architecture: str, projection_from: str | Path | None = None, cache_dir: str | Path | None = None
) -> StateDict:
    """:func:`read_encoder` with the conversion of pickles and Hugging Face directories cached (see
    :func:`import_cache_path`); state-dict formats are read directly each time."""
    path = resolve_source(path, architecture)
    _check_exists(path)
    if not path.is_dir() and not _is_pickle(path):
        return read_encoder(path, architecture)
    fmt = "hf" if path.is_dir() else "task_vectors"
    target = import_cache_path(path, fmt, architecture, projection_from, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one process converts, the others wait and read its file
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return read_encoder(target, architecture, "raymerge")
        logger.info("importing %s (%s) for %s into %s", path, fmt, architecture, target)
        encoder = read_encoder(path, architecture, fmt, projection_from)
        models.save_state_dict_file(
            encoder, target, metadata={"source": str(path), "format": fmt, "architecture": architecture}
        )
    return encoder


def resolve_pretrained(architecture: str, pretrained: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local file, or the file of open_clip pretrained tag ``pretrained`` if it is already in open_clip's cache.

    Never downloads: when the file is absent the error says which file to fetch and where to put it.
    """
    local = Path(pretrained).expanduser()
    if local.exists():
        return local
    import open_clip
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    cfg = open_clip.get_pretrained_cfg(architecture, str(pretrained))
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise CheckpointError(
            f"--pretrained {str(pretrained)!r} is neither a file nor a pretrained tag of {architecture} "
            f"(its tags: {', '.join(tags) or 'none'})"
        )
    hint = ""
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            for name in (*_get_safe_alternatives(filename), filename):
                found = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
                if isinstance(found, str):
                    return Path(found)
            where = cache_dir or constants.HF_HUB_CACHE
            hint = (f"fetch https://huggingface.co/{model_id}/resolve/main/{filename} where there is internet and pass "
                    f"it with --pretrained FILE, or put it in open_clip's cache {where} "
                    f"(`huggingface-cli download {model_id} {filename} --cache-dir {where}`)")
    if cfg.get("url") and not hint:
        target = Path(cache_dir or Path.home() / ".cache" / "clip").expanduser() / os.path.basename(cfg["url"])
        if target.is_file():
            return target
        hint = f"fetch {cfg['url']} where there is internet and put it at {target}, or pass it with --pretrained FILE"
    raise CheckpointError(
        f"pretrained weights {architecture} / {pretrained} are not in open_clip's local cache and nothing is "
        f"downloaded here: {hint or 'pass a local file with --pretrained FILE'}"
    )
