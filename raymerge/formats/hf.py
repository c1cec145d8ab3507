"""Hugging Face CLIP directories (``CLIPModel``, ``CLIPVisionModel``) read without transformers, into open_clip names.

The layouts differ in three ways (transformers' ``convert_clip_original_pytorch_to_hf.py`` goes the other way):
attention keeps q, k and v as three projections where open_clip fuses them into ``in_proj`` (concatenated along
dim 0, in that order); Linear projections are stored as weights, open_clip's ``proj`` / ``text_projection`` as
their transpose; and names differ (``pre_layrnorm`` is transformers' spelling).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from raymerge import models
from raymerge.models import CheckpointError
from raymerge.statedict import StateDict

# Single files and sharded indexes, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# transformers' CLIPVisionConfig / CLIPTextConfig defaults: config.json files written with ``use_diff`` leave
# out every value equal to them.
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                    "num_channels": 3}
_TEXT_DEFAULTS = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                  "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_PROJECTION_DIM_DEFAULT = 512
# open_clip's LayerNorm uses torch's default eps
_OPEN_CLIP_LN_EPS = 1e-5


@dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face CLIP directory: its ``config.json`` and weight files, read but not yet loaded."""

    path: Path
    config: dict

    @property
    def is_clip_model(self) -> bool:
        """A whole ``CLIPModel`` (both towers, both projections); otherwise a vision model alone."""
        return self.config.get("model_type") == "clip"

    @property
    def kind(self) -> str:
        return "CLIPModel" if self.is_clip_model else "/".join(self.config.get("architectures") or ["CLIPVisionModel"])

    def tower_config(self, tower: str) -> dict:
        """The effective ``vision`` or ``text`` config, transformers' defaults filled in."""
        defaults = _VISION_DEFAULTS if tower == "vision" else _TEXT_DEFAULTS
        own = (self.config.get(f"{tower}_config") or {}) if self.is_clip_model else self.config
        return {**defaults, **{k: own[k] for k in defaults if k in own}}

    @property
    def projection_dim(self) -> int:
        return int(self.config.get("projection_dim", _PROJECTION_DIM_DEFAULT))

    def weight_files(self) -> list[Path]:
        for name in WEIGHT_FILES:
            path = self.path / name
            if not path.is_file():
                continue
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                return [self.path / shard for shard in shards]
            return [path]
        raise CheckpointError(f"Hugging Face directory {self.path} has none of {', '.join(WEIGHT_FILES)}")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read ``config.json`` of a CLIP directory; :class:`CheckpointError` for any other model type."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Hugging Face directory {path}: config.json cannot be read: {err}") from None
    model_type = config.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise CheckpointError(
            f"Hugging Face directory {path} holds model_type {model_type!r}: raymerge reads CLIP models "
            "('clip' for CLIPModel, 'clip_vision_model' for CLIPVisionModel)"
        )
    return HFCheckpoint(path, config)


def _mismatch(ckpt: HFCheckpoint, field: str, found, architecture: str, expected) -> CheckpointError:
    return CheckpointError(
        f"Hugging Face directory {ckpt.path} is not a {architecture} checkpoint: its {field} is {found!r}, "
        f"{architecture} has {expected!r}"
    )


def _check_fields(ckpt: HFCheckpoint, tower: str, architecture: str, expected: dict) -> None:
    found = ckpt.tower_config(tower)
    for field, want in expected.items():
        have = found[field]
        same = math.isclose(have, want, rel_tol=1e-6) if isinstance(want, float) else have == want
        if not same:
            where = f"{tower}_config.{field}" if ckpt.is_clip_model else field
            raise _mismatch(ckpt, where, have, architecture, want)


def _side(size) -> int | tuple:
    """open_clip allows (H, W) sizes; Hugging Face CLIP has square ones."""
    if isinstance(size, (tuple, list)):
        return int(size[0]) if len(set(size)) == 1 else tuple(size)
    return int(size)


def check_vision_config(ckpt: HFCheckpoint, architecture: str) -> None:
    """Refuse, naming the directory and field, a vision tower that is not ``architecture``'s (e.g. GELU vs QuickGELU,
    which the tensor shapes cannot reveal)."""
    cfg = models.encoder_config(architecture)
    vision = open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"])
    if vision.timm_model_name or not isinstance(vision.layers, int):
        raise CheckpointError(f"{architecture} is not an open_clip ViT: a Hugging Face CLIP ({ckpt.path}) cannot fill it")
    if vision.pool_type != "tok" or vision.attentional_pool or vision.no_ln_pre or vision.ls_init_value is not None:
        raise CheckpointError(
            f"{architecture}'s vision tower (pool_type={vision.pool_type!r}, attentional_pool={vision.attentional_pool}, "
            f"no_ln_pre={vision.no_ln_pre}, ls_init_value={vision.ls_init_value}) is not the CLIP ViT that "
            f"Hugging Face's CLIPVisionModel ({ckpt.path}) holds"
        )
    expected = {
        "hidden_size": vision.width,
        "num_hidden_layers": vision.layers,
        "num_attention_heads": vision.width // vision.head_width,
        "intermediate_size": int(vision.width * vision.mlp_ratio),
        "patch_size": _side(vision.patch_size),
        "image_size": _side(vision.image_size),
        "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": _OPEN_CLIP_LN_EPS,
    }
    _check_fields(ckpt, "vision", architecture, expected)
    if ckpt.is_clip_model and ckpt.projection_dim != cfg["embed_dim"]:
        raise _mismatch(ckpt, "projection_dim", ckpt.projection_dim, architecture, cfg["embed_dim"])


def check_text_config(ckpt: HFCheckpoint, architecture: str) -> None:
    """Like :func:`check_vision_config` for the text tower; a vision model alone has none."""
    if not ckpt.is_clip_model:
        raise CheckpointError(
            f"Hugging Face directory {ckpt.path} is a {ckpt.kind}: it has no text tower; zero-shot heads need the "
            "base CLIPModel"
        )
    cfg = models.encoder_config(architecture)
    text = open_clip.model.CLIPTextCfg(**cfg["text_cfg"])
    if text.hf_model_name:
        raise CheckpointError(f"{architecture}'s text tower is a Hugging Face {text.hf_model_name}, not CLIP's")
    expected = {
        "hidden_size": text.width,
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "intermediate_size": int(text.width * text.mlp_ratio),
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.context_length,
        "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": _OPEN_CLIP_LN_EPS,
    }
    _check_fields(ckpt, "text", architecture, expected)


def read_weights(ckpt: HFCheckpoint) -> StateDict:
    """Every tensor of the directory's weight file(s), read safely (safetensors, or ``weights_only=True``).

    A vision model's keys are returned under ``vision_model.``: transformers 4 saves a ``CLIPVisionModel`` that
    way (the published fine-tunes), transformers 5 without the prefix.
    """
    sd: StateDict = {}
    for path in ckpt.weight_files():
        sd.update(models.read_tensor_file(path))
    if ckpt.is_clip_model:
        return sd
    return {k if k.startswith("vision_model.") or k == "visual_projection.weight" else f"vision_model.{k}": v
            for k, v in sd.items()}


# One encoder layer: transformers' name → open_clip's, for everything but q/k/v (fused below).
_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

_VISION_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_TEXT_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Index buffers some transformers versions save; open_clip computes positions itself.
_IGNORED = ("embeddings.position_ids",)


def _tower_to_open_clip(sd: StateDict, hf_prefix: str, top: dict[str, str], source: str) -> StateDict:
    """Map one tower (``vision_model.`` or ``text_model.``) to open_clip names; an unknown key is an error."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if not key.startswith(hf_prefix):
            continue
        rest = key[len(hf_prefix) :]
        if rest in _IGNORED:
            continue
        if rest in top:
            out[top[rest]] = tensor
            continue
        match = _LAYER_KEY.match(rest)
        if match is None or (match.group(2) not in _LAYER and match.group(2) not in _QKV):
            raise CheckpointError(f"{source} has key {key!r}, which is not part of a CLIP {hf_prefix[:-1]}")
        layer, name, kind = int(match.group(1)), match.group(2), match.group(3)
        if name in _QKV:
            qkv.setdefault((layer, kind), {})[name] = tensor
        else:
            out[f"transformer.resblocks.{layer}.{_LAYER[name]}.{kind}"] = tensor
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise CheckpointError(f"{source} is missing key {hf_prefix}encoder.layers.{layer}.{missing[0]}.{kind}")
        # Eq.: in_proj = [W_q; W_k; W_v] (rows), as nn.MultiheadAttention splits it
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def to_open_clip(sd: StateDict, source: str) -> StateDict:
    """A transformers CLIP state dict → open_clip CLIP names (``visual.*`` for the image tower).

    Returns the towers that are present: a ``CLIPVisionModel`` gives ``visual.*`` without ``visual.proj``.
    """
    known_top = {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    stray = [k for k in sd if not k.startswith(("vision_model.", "text_model.")) and k not in known_top]
    if stray:
        raise CheckpointError(f"{source} has key {stray[0]!r}, which is not part of a Hugging Face CLIP model")
    out = {f"visual.{k}": v for k, v in _tower_to_open_clip(sd, "vision_model.", _VISION_TOP, source).items()}
    out.update(_tower_to_open_clip(sd, "text_model.", _TEXT_TOP, source))
    if "visual_projection.weight" in sd:
        out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out
