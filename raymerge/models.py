"""open_clip image encoders, linear task heads, and safe checkpoint I/O.

A *model* in raymerge is an open_clip image encoder (a ``VisionTransformer``, say) whose weights come from a
state dict file, followed by a fixed linear head per task. Merges touch encoder weights only; heads stay fixed,
as with CLIP's zero-shot text heads (task vectors, CART and DaWin all merge the encoder and keep each task's head).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from raymerge import statedict
from raymerge._io import atomic_file
from raymerge.data import DatasetError, ImageDataset, decode
from raymerge.errors import InputError
from raymerge.statedict import StateDict

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

# Prefixes under which an image encoder's weights appear in common checkpoints: a whole open_clip CLIP
# (``visual.``) and the task_vectors / CART ``ImageEncoder`` wrapper (``model.visual.``).
ENCODER_PREFIXES = ("model.visual.", "visual.")

# OpenAI CLIP's normalization, which open_clip ViTs (and our tiny one) are trained with.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointError(InputError):
    """A checkpoint file cannot be read, or does not fit the architecture; the message names the file."""


class ModelError(InputError):
    """An unknown model name or an inconsistent model/head pair."""


def model_names() -> list[str]:
    """Names accepted by :func:`build_encoder`: open_clip's registry plus raymerge's own configs."""
    return open_clip.list_models()


def encoder_config(model_name: str) -> dict:
    """The open_clip config of ``model_name``; :class:`ModelError` listing close names if it is unknown."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        known = model_names()
        close = [n for n in known if model_name.lower()[:5] in n.lower()][:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown model name {model_name!r} (not an open_clip config{hint})")
    return cfg


def build_encoder(model_name: str) -> nn.Module:
    """Build the image tower of open_clip model ``model_name`` with random weights, in eval mode.

    Only the vision tower is built (no text tower), since merges and evaluation need image features only.
    """
    cfg = encoder_config(model_name)
    encoder = open_clip.model._build_vision_tower(
        cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
    )
    return encoder.eval()


def image_size(model_name: str) -> int:
    """Square input side in pixels expected by ``model_name``."""
    size = encoder_config(model_name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def embed_dim(model_name: str) -> int:
    """Dimension of the image features ``model_name`` outputs."""
    return int(encoder_config(model_name)["embed_dim"])


def _strip_prefix(sd: StateDict) -> StateDict:
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def torch_load_reason(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to retry with ``weights_only=False``."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()) or type(err).__name__


def _pickled_globals(path: Path) -> list[str]:
    """Globals a torch zip file pickles beyond plain tensors (a static scan: nothing is built)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a torch zip file: the caller reports the original read error
        return []


def read_tensor_file(path: str | Path) -> StateDict:
    """Every tensor of a ``.safetensors`` file or, read with ``weights_only=True``, of a torch file, keys unchanged.

    A ``{"state_dict": ...}`` wrapper is opened and a TALL-masks ``model_name`` string entry dropped. Every
    floating tensor is checked for NaN and Inf. Pickled modules (task_vectors' ``torch.save(image_encoder)``)
    are refused here; :mod:`raymerge.formats` reads them with a restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not safetensors, or pickled objects: never pass on torch's advice
        pickled = _pickled_globals(path)
        if pickled:
            shown = ", ".join(pickled[:3]) + (", ..." if len(pickled) > 3 else "")
            raise CheckpointError(
                f"checkpoint {path} cannot be read safely as a state dict: it pickles Python objects ({shown}). "
                f"For task_vectors / TALL-masks modules run `raymerge import {path} --model ARCH --out "
                f"{path.stem}.safetensors` (a restricted unpickler that runs nothing from the file), or name the "
                "file in the experiment as it is"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely: {type(err).__name__}: {torch_load_reason(err)}"
        ) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if isinstance(sd, Mapping) and isinstance(sd.get("model_name"), str):
        sd = {k: v for k, v in sd.items() if k != "model_name"}
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors (got {type(sd).__name__})")
    if not sd:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    check_finite(sd, f"checkpoint {path}")
    return dict(sd)


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming ``source`` and the first key with a NaN or an Inf."""
    try:
        statedict.check_finite([sd], [source])
    except statedict.StateDictError as err:
        raise CheckpointError(str(err)) from None


def load_state_dict_file(path: str | Path) -> StateDict:
    """Read an encoder state dict from ``.safetensors`` or, with ``weights_only=True``, a torch file.

    Encoder weights under ``visual.`` (a whole open_clip CLIP) or ``model.visual.`` (a task_vectors
    ``ImageEncoder``) are taken from there. Pickled modules are refused; :func:`load_encoder_weights` reads them.
    """
    return _strip_prefix(read_tensor_file(path))


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place and at the same length.

    safetensors keeps metadata in a hash map whose order changes from one write to the next, so identical
    weights would give files with different bytes (and hashes); tensor offsets are untouched, and only the
    header is read and written.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise CheckpointError(f"cannot canonicalize the safetensors header of {path}: it would grow")
        f.seek(8)
        f.write(text.ljust(size, b" "))


def save_state_dict_file(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``sd`` as safetensors, byte-for-byte reproducibly, atomically (:func:`raymerge._io.atomic_file`)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
        _sort_safetensors_metadata(tmp)


def check_architecture(reference: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` has exactly ``reference``'s keys and shapes."""
    for key, tensor in reference.items():
        if key not in sd:
            raise CheckpointError(f"{source} is missing key {key!r}: it is not a checkpoint of this architecture")
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(sd[key].shape)}, the architecture expects "
                f"{tuple(tensor.shape)}: it is not a checkpoint of this architecture"
            )
    extra = [k for k in sd if k not in reference]
    if extra:
        raise CheckpointError(f"{source} has key {extra[0]!r} that the architecture does not have")


def load_encoder_weights(model_name: str, path: str | Path, projection_from: str | Path | None = None) -> StateDict:
    """Load the encoder weights at ``path``, in any format :mod:`raymerge.formats` reads, checked against ``model_name``.

    raymerge / open_clip / TALL-masks state dicts are read as they are; task_vectors pickles and Hugging Face
    directories are converted once and cached under ``$RAYMERGE_CACHE/imports``. ``projection_from`` names the
    checkpoint that supplies ``proj`` when ``path`` has none (a Hugging Face ``CLIPVisionModel``).
    """
    from raymerge import formats

    return formats.load_encoder(path, model_name, projection_from=projection_from)


@dataclass(frozen=True)
class Head:
    """A fixed linear classifier over image features.

    ``weight`` is (C, D), ``bias`` (C,) or None. With ``normalize`` the features are L2-normalized first,
    as CLIP zero-shot heads (text embeddings times the logit scale) expect.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    class_names: tuple[str, ...]
    normalize: bool = True

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features → (N, C) logits."""
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return nn.functional.linear(features, self.weight, self.bias)

    def subset(self, classes: Sequence[str | int], source: str) -> Head:
        """The head restricted to ``classes`` (names or row indices, in that order): its rows of ``weight`` and
        ``bias``, so logits, entropies and accuracy use that label space only (ImageNet-R's 200 classes of 1000).
        :class:`ModelError` naming each class not in the head (``source`` names it)."""
        rows, missing, ambiguous = [], [], []
        for c in classes:
            if isinstance(c, int) and not isinstance(c, bool):
                (rows if 0 <= c < self.num_classes else missing).append(c)
            elif self.class_names.count(c) == 1:
                rows.append(self.class_names.index(c))
            else:
                (ambiguous if c in self.class_names else missing).append(c)

        def shown(items: list) -> str:
            return ", ".join(map(repr, items[:10])) + (f" and {len(items) - 10} more" if len(items) > 10 else "")

        if missing:
            raise ModelError(f"classes {shown(missing)} are not classes of head {source} ({self.num_classes} classes)")
        if ambiguous:  # OpenAI's ImageNet names two classes 'missile' and two 'sunglasses'
            raise ModelError(f"classes {shown(ambiguous)} name several rows of head {source}: give their row indices")
        if len(set(rows)) < len(rows):
            raise ModelError(f"the classes given for head {source} repeat a class: each may appear once")
        index = torch.tensor(rows, dtype=torch.long)
        return Head(self.weight[index], None if self.bias is None else self.bias[index],
                    tuple(self.class_names[i] for i in rows), self.normalize)

    @property
    def hash(self) -> str:
        """SHA-256 of everything that determines the logits and what they mean: weight, bias, the normalize flag and
        the class names (part of every row key and logit-cache key that reads this head)."""
        meta = np.frombuffer(json.dumps([self.normalize, list(self.class_names)]).encode(), np.uint8)
        return statedict.state_dict_hash({**self.to_arrays(), "__meta__": meta})

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"weight": self.weight.numpy()}
        if self.bias is not None:
            arrays["bias"] = self.bias.numpy()
        return arrays


def save_head(head: Head, path: str | Path) -> None:
    """Write a head as safetensors; class names and the normalize flag go in the metadata."""
    tensors = {"weight": head.weight}
    if head.bias is not None:
        tensors["bias"] = head.bias
    meta = {"class_names": json.dumps(list(head.class_names)), "normalize": json.dumps(head.normalize)}
    save_state_dict_file(tensors, path, metadata=meta)


def load_head(path: str | Path) -> Head:
    """Read a head written by :func:`save_head` (or any safetensors file with a (C, D) ``weight``), or a task_vectors
    ``ClassificationHead`` pickle / torch state dict with ``weight`` and ``bias`` (via :func:`raymerge.formats.read_head`).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        from raymerge import formats

        return formats.read_head(path)
    sd = read_tensor_file(path)
    if "weight" not in sd or sd["weight"].ndim != 2:
        raise CheckpointError(f"head {path} needs a 2-D 'weight' tensor of shape (classes, features)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    num_classes = sd["weight"].shape[0]
    names = tuple(json.loads(meta["class_names"])) if "class_names" in meta else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise CheckpointError(f"head {path} lists {len(names)} class names for {num_classes} rows of 'weight'")
    normalize = json.loads(meta.get("normalize", "true"))
    bias = sd.get("bias")
    return Head(sd["weight"].float(), None if bias is None else bias.float(), names, bool(normalize))


def check_head(head: Head, model_name: str, source: str) -> None:
    """The head's feature dimension must match the encoder's output."""
    dim = embed_dim(model_name)
    if head.weight.shape[1] != dim:
        raise ModelError(f"head {source} expects {head.weight.shape[1]}-d features but {model_name} outputs {dim}-d")


def preprocess(images: np.ndarray, size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) → float32 (N, 3, size, size), resized and normalized.

    Grayscale is repeated to three channels; resizing is bilinear (antialiased) only when H, W != size.
    """
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def prepare_images(dataset: ImageDataset, model_name: str) -> torch.Tensor:
    """A dataset's images as the float32 (N, 3, S, S) batch ``model_name`` evaluates.

    Decoded pixels (the embedded zoo) go through :func:`preprocess`; encoded files (image folders, Parquet ``image``
    columns, any size) are decoded here, where they are evaluated, and preprocessed exactly as open_clip does
    (:func:`image_transform`: resize the shortest side, center crop, normalize). Every image that cannot be
    decoded is named in one :class:`~raymerge.data.DatasetError`.
    """
    if dataset.encoded is None:
        return preprocess(dataset.images, image_size(model_name))
    transform, out, bad = image_transform(model_name), [], []
    for blob, name in zip(dataset.encoded, dataset.names or [f"row {i}" for i in range(len(dataset))]):
        try:
            out.append(transform(decode(blob, name)))
        except DatasetError as err:
            bad.append(str(err))
    if bad:
        raise DatasetError(f"{dataset.source or dataset.name}: {len(bad)} image(s) cannot be decoded:\n"
                           + "\n".join(f"  - {b}" for b in bad))
    size = image_size(model_name)
    return torch.stack(out) if out else torch.zeros((0, 3, size, size))


class EncodedImages:
    """An encoded dataset as a lazily preprocessed (N, 3, S, S) batch: indexing decodes and preprocesses only the rows
    asked for (what test-time adaptation samples), so a whole test set never sits decoded in memory."""

    ndim = 4

    def __init__(self, dataset: ImageDataset, model_name: str) -> None:
        size = image_size(model_name)
        self.dataset, self.model_name, self.shape = dataset, model_name, (len(dataset), 3, size, size)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return prepare_images(self.dataset.subset(np.asarray(rows, dtype=np.int64)), self.model_name)


def adaptation_images(dataset: ImageDataset, model_name: str) -> torch.Tensor | EncodedImages:
    """Unlabeled test images for :func:`raymerge.adamerging.adapt`: decoded pixels preprocessed at once, encoded
    files decoded per sampled batch (:class:`EncodedImages`)."""
    return prepare_images(dataset, model_name) if dataset.encoded is None else EncodedImages(dataset, model_name)


def preprocess_config(model_name: str) -> dict:
    """open_clip's inference preprocessing for ``model_name``: size, mean, std, interpolation, resize mode.

    open_clip's defaults (OpenAI's mean and std, bicubic, shortest-side resize) overridden by the model config's
    ``preprocess_cfg``, with the size of its vision tower, as ``open_clip.create_model`` sets them.
    """
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = encoder_config(model_name)
    merged = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
    merged["size"] = image_size(model_name)
    return merged


def image_transform(model_name: str) -> Callable[[Any], torch.Tensor]:
    """PIL image → float32 (3, S, S) tensor, exactly as open_clip preprocesses ``model_name``'s inputs at evaluation
    (resize the shortest side, center crop, normalize)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_config(model_name)), is_train=False)


@torch.no_grad()
def load_weights_in_place(module: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy ``arrays`` into ``module``'s existing parameters and buffers (no new modules, no reallocation).

    Object-store arrays are read-only; on the CPU they are copied straight into the parameter's memory through
    a numpy view, on a GPU through one host-to-device copy.
    """
    params = module.state_dict(keep_vars=True)
    for key, value in arrays.items():
        target = params[key].detach()
        if isinstance(value, torch.Tensor):
            target.copy_(value)
        elif target.device.type == "cpu":
            target.numpy()[...] = value
        else:
            target.copy_(torch.from_numpy(np.array(value)))


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU and fp32 on a CPU; the others as they are."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


@torch.no_grad()
def predict_logits(encoder: nn.Module, head: Head, images: torch.Tensor, batch_size: int,
                   precision: str = "fp32") -> np.ndarray:
    """Preprocessed images (N, 3, S, S) → float32 logits (N, C), in batches of ``batch_size``.

    ``precision`` bf16 or fp16 runs the encoder and head under ``torch.autocast`` in that dtype (weights stay
    float32); fp32 runs them as they are. Every batch is zero-padded to exactly ``batch_size`` rows: BLAS kernels
    are chosen by matrix shape, so a fixed shape makes each sample's logits independent of which other samples
    share its batch. That is what lets a sharded run, or DaWin's per-component subsets, reproduce a
    single-process run bit for bit.
    """
    dtype = PRECISIONS[precision]
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        n = batch.shape[0]
        if n < batch_size:
            batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
        with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
            out.append(head.logits(encoder(batch))[:n].float())
    if not out:
        return np.zeros((0, head.num_classes), dtype=np.float32)
    return torch.cat(out).float().cpu().numpy()
