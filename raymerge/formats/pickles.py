"""Read pickled task_vectors modules (``torch.save(image_encoder)``) without running anything from the file.

task_vectors, TALL-masks heads, AdaMerging and CART ship whole pickled modules: ``src.modeling.ImageEncoder``
holding an open_clip ``CLIP`` (and the torchvision transforms it was built with), and
``src.modeling.ClassificationHead(torch.nn.Linear)``. Unpickling them normally imports that code and an open_clip
old enough to have the pickled class names, and lets the file call any function it names.

Here torch's own ``weights_only`` unpickler does the reading (zip format, storages, byte order), with every class
these files name mapped to an inert :class:`StandIn` that only records the state it is given. The names are an
explicit allowlist; any other global is refused, by name, before a single object is built.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raymerge import models
from raymerge.models import CheckpointError

# What task_vectors-style checkpoints reference, read from real pickles' opcodes (pickletools) and from the class
# lists of open_clip 1.x-3.x (classes moved from open_clip.model to open_clip.transformer in 2.5; the old names
# are what the published checkpoints hold). torch's tensor/storage rebuild functions, OrderedDict and set are on
# torch's own weights_only allowlist already.
_ALLOWED: dict[str, tuple[str, ...]] = {
    # task_vectors / AdaMerging / CART (src/modeling.py) and TALL-masks / TSV / Iso (src/models/modeling.py)
    "src.modeling": ("ImageEncoder", "ClassificationHead", "ImageClassifier", "MultiHeadImageClassifier"),
    "src.models.modeling": ("ImageEncoder", "ClassificationHead", "ImageClassifier", "MultiHeadImageClassifier"),
    "open_clip.model": (
        "CLIP", "CustomTextCLIP",
        # open_clip < 2.5
        "VisualTransformer", "Transformer", "ResidualAttentionBlock", "Attention", "LayerNorm", "QuickGELU",
        "ModifiedResNet", "Bottleneck", "AttentionPool2d",
    ),
    "open_clip.transformer": (
        "LayerNormFp32", "LayerNorm", "QuickGELU", "LayerScale", "PatchDropout", "Attention", "AttentionalPooler",
        "ResidualAttentionBlock", "CustomResidualAttentionBlock", "CustomTransformer", "Transformer",
        "VisionTransformer", "TextTransformer",
    ),
    "open_clip.modified_resnet": ("ModifiedResNet", "Bottleneck", "AttentionPool2d"),
    # the train/val preprocessing an ImageEncoder keeps as attributes
    "open_clip.transform": (
        "_convert_to_rgb", "ResizeMaxSize", "ResizeKeepRatio", "CenterCropOrPad", "MaybeConvertMode", "MaybeToTensor",
    ),
    "torchvision.transforms.transforms": ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "RandomResizedCrop"),
    "torchvision.transforms.functional": ("InterpolationMode",),
    "torch.nn.modules.linear": ("Linear", "NonDynamicallyQuantizableLinear", "Identity"),
    "torch.nn.modules.activation": ("MultiheadAttention", "GELU", "ReLU"),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.container": ("Sequential", "ModuleList", "ModuleDict"),
    "torch.nn.modules.sparse": ("Embedding",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.pooling": ("AvgPool2d", "AdaptiveAvgPool2d"),
}
ALLOWED_GLOBALS: frozenset[str] = frozenset(f"{module}.{name}" for module, names in _ALLOWED.items() for name in names)


class UnsafePickleError(CheckpointError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing from it was built or run."""


class StandIn:
    """Inert replacement for a pickled class: records constructor arguments and pickled state, runs nothing.

    A pickled ``nn.Module`` arrives as ``NEWOBJ`` then ``BUILD`` with its ``__dict__`` (``_parameters``,
    ``_buffers``, ``_modules``, plain attributes), which lands in the stand-in's ``__dict__`` unchanged.
    """

    pickled_name = "?"

    def __init__(self, *args, **kwargs) -> None:
        self.pickled_args = args

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


def _stand_in(full_name: str) -> type[StandIn]:
    return type(full_name.rsplit(".", 1)[1], (StandIn,), {"pickled_name": full_name})


# One class per allowed name, so that the loaded tree still says what each object was.
_STAND_INS = [(_stand_in(name), name) for name in sorted(ALLOWED_GLOBALS)]


def _refuse(path: Path, names: list[str]) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path} is a pickle that names global(s) {', '.join(repr(n) for n in names)}, which raymerge's restricted "
        "unpickler does not allow (it reads task_vectors / TALL-masks modules only, and never runs code from a "
        "file); nothing was loaded"
    )


_TORCH_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_pickled_modules(path: str | Path) -> object:
    """Unpickle a ``torch.save(module)`` file into a tree of :class:`StandIn` objects and tensors.

    Raises :class:`UnsafePickleError` naming every global outside the allowlist (for zip files, found by a
    static scan before anything is built), :class:`CheckpointError` for any other failure.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # e.g. pickle protocol >= 4, which the restricted reader does not handle
            raise CheckpointError(f"{path} cannot be scanned by raymerge's restricted unpickler: "
                                  f"{models.torch_load_reason(err)}; nothing was loaded") from None
        unknown = sorted(set(found) - ALLOWED_GLOBALS)
        if unknown:
            raise _refuse(path, unknown)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's text advises weights_only=False: never pass that on
        text = str(err)
        match = _TORCH_GLOBAL.search(text)
        if match:
            raise _refuse(path, [match.group(1)]) from None
        reason = models.torch_load_reason(err)
        if not zipfile.is_zipfile(path):
            reason += " (pickled modules are read from the zip format torch >= 1.6 writes, not the legacy one)"
        raise CheckpointError(f"{path} cannot be read by raymerge's restricted unpickler: {reason}") from None


MAX_DEPTH = 64  # far deeper than any real module tree: a crafted pickle may nest modules in a cycle


def _named_tensors(obj: StandIn, prefix: str, path: Path, seen: frozenset[int] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """``obj.state_dict()`` of the module ``obj`` stood in for: parameters, persistent buffers, then children."""
    if id(obj) in seen or len(seen) > MAX_DEPTH:
        raise CheckpointError(f"{path}: the pickled modules nest in a cycle or deeper than {MAX_DEPTH} levels at "
                              f"{prefix.rstrip('.') or 'the top level'}: not a checkpoint")
    seen = seen | {id(obj)}
    state = vars(obj) if isinstance(obj, StandIn) else {}
    if not isinstance(state.get("_parameters"), dict):
        where = prefix.rstrip(".") or "the top level"
        raise CheckpointError(f"{path}: {pickled_class(obj)} at {where} is not a pickled torch module")
    skip = state.get("_non_persistent_buffers_set") or set()
    buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in skip}
    for name, value in [*state["_parameters"].items(), *buffers.items()]:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {prefix}{name} of {obj.pickled_name} is a {type(value).__name__}, not a tensor")
        yield prefix + name, value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from _named_tensors(child, f"{prefix}{name}.", path, seen)


def module_state_dict(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict the pickled module would return, e.g. ``model.visual.conv1.weight`` for an ImageEncoder."""
    return dict(_named_tensors(obj, "", Path(path)))


def pickled_class(obj: object) -> str:
    """The pickled class name of a loaded object (``src.modeling.ImageEncoder``), or its Python type name."""
    return obj.pickled_name if isinstance(obj, StandIn) else type(obj).__name__


def pickled_attribute(obj: StandIn, name: str, default: Any = None) -> Any:
    """A plain attribute the pickled object carried (``normalize`` of a ClassificationHead)."""
    return vars(obj).get(name, default)


_ACTIVATIONS = {
    "open_clip.transformer.QuickGELU": "quick_gelu",
    "open_clip.model.QuickGELU": "quick_gelu",
    "torch.nn.modules.activation.GELU": "gelu",
}


def submodule(obj: object, dotted: str) -> object | None:
    """The pickled child module at ``dotted`` (``model.visual``), or None."""
    for name in dotted.split("."):
        modules = vars(obj).get("_modules") if isinstance(obj, StandIn) else None
        obj = modules.get(name) if isinstance(modules, dict) else None
    return obj


def activation(obj: object, seen: frozenset[int] = frozenset()) -> str | None:
    """``quick_gelu`` or ``gelu``: the activation the pickled tower's MLPs use (shapes cannot tell them apart)."""
    if not isinstance(obj, StandIn) or id(obj) in seen or len(seen) > MAX_DEPTH:
        return None
    if obj.pickled_name in _ACTIVATIONS:
        return _ACTIVATIONS[obj.pickled_name]
    for child in (vars(obj).get("_modules") or {}).values():
        found = activation(child, seen | {id(obj)})
        if found is not None:
            return found
    return None
