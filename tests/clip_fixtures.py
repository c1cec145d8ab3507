"""A real-sized CLIP pool written in every checkpoint format users arrive with (built once per test session).

θ0 is an open_clip ViT-B-32 (QuickGELU, as OpenAI's CLIP) with seeded random weights, every tensor perturbed so
that no two layer norms look alike; three fine-tunes add small seeded noise to the image tower only. Each model
is written as a task_vectors pickle (stand-in classes under the real module and class names: a temporary
``src/modeling.py``, real open_clip modules inside), a TALL-masks state dict, a Hugging Face directory written by
``transformers`` (mapped here, independently of raymerge's importer), an open_clip state dict and raymerge's form.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import pytest
import torch

from raymerge import models

ARCH = "ViT-B-32-quickgelu"
TASKS = ("MNIST", "SVHN", "EuroSAT")  # the three fine-tunes

# task_vectors' src/modeling.py, reduced to what shapes a pickle: class names, attributes, keep_lang's delattr
_MODELING = '''
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, model, train_preprocess, val_preprocess, keep_lang=False):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
        self.cache_dir = None
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))
'''


@dataclass
class ClipPool:
    root: Path
    clips: dict[str, dict[str, torch.Tensor]]  # name ("base", task...) -> whole open_clip CLIP state dict
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # format -> name -> path
    heads: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict)

    def encoder(self, name: str) -> dict[str, torch.Tensor]:
        """The expected import: the vision tower in raymerge's (open_clip's) keys."""
        return {k[len("visual.") :]: v for k, v in self.clips[name].items() if k.startswith("visual.")}


def hf_state_dict(clip: dict[str, torch.Tensor], vision_only: bool) -> dict[str, torch.Tensor]:
    """open_clip CLIP → transformers CLIP names (FORMATS.md): in_proj split into q, k, v; projections transposed."""
    out = {}

    def tower(oc_prefix: str, hf_prefix: str, top: dict[str, str]) -> None:
        for oc, hf in top.items():
            out[hf_prefix + hf] = clip[oc_prefix + oc]
        layer = 0
        while f"{oc_prefix}transformer.resblocks.{layer}.ln_1.weight" in clip:
            src, dst = f"{oc_prefix}transformer.resblocks.{layer}.", f"{hf_prefix}encoder.layers.{layer}."
            for kind in ("weight", "bias"):
                q, k, v = clip[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
                out[f"{dst}self_attn.q_proj.{kind}"], out[f"{dst}self_attn.k_proj.{kind}"] = q.clone(), k.clone()
                out[f"{dst}self_attn.v_proj.{kind}"] = v.clone()
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{dst}{b}.{kind}"] = clip[f"{src}{a}.{kind}"]
            layer += 1

    tower("visual.", "vision_model.", {
        "class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
        "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
    })
    if vision_only:
        return out
    tower("", "text_model.", {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
    })
    out["visual_projection.weight"] = clip["visual.proj"].T.contiguous()
    out["text_projection.weight"] = clip["text_projection"].T.contiguous()
    out["logit_scale"] = clip["logit_scale"]
    return out


def hf_config(vision_act: str = "quick_gelu"):
    from transformers import CLIPConfig

    cfg = models.encoder_config(ARCH)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return CLIPConfig(
        vision_config=dict(hidden_size=vision["width"], intermediate_size=4 * vision["width"], num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // 64, image_size=vision["image_size"],
                           patch_size=vision["patch_size"], hidden_act=vision_act),
        text_config=dict(hidden_size=text["width"], intermediate_size=4 * text["width"], num_hidden_layers=text["layers"],
                         num_attention_heads=text["heads"], vocab_size=text["vocab_size"],
                         max_position_embeddings=text["context_length"], hidden_act="quick_gelu"),
        projection_dim=cfg["embed_dim"],
    )


def _write_hf(clip: dict[str, torch.Tensor], directory: Path, vision_only: bool, layout: str = "v5") -> None:
    """A Hugging Face directory as transformers writes it (``v5``: ``save_pretrained``, a vision model's keys without
    the ``vision_model.`` prefix), as transformers 4 wrote the published fine-tunes (``v4``: prefixed keys), or with
    ``pytorch_model.bin`` (``bin``)."""
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPVisionModel

    config = hf_config()
    weights = hf_state_dict(clip, vision_only)
    if layout == "v4":
        directory.mkdir(parents=True)
        vision = config.vision_config.to_dict() | {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"}
        (directory / "config.json").write_text(json.dumps(vision, indent=2))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
        return
    with torch.device("meta"):
        model = CLIPVisionModel(config.vision_config) if vision_only else CLIPModel(config)
    if vision_only:  # transformers 5's CLIPVisionModel holds the tower's modules directly
        weights = {k[len("vision_model.") :]: v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    if layout == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory)


class _FakeTaskVectors:
    """``src.modeling`` importable from a temporary directory while pickling, and gone afterwards."""

    def __init__(self, root: Path):
        (root / "src").mkdir(parents=True)
        (root / "src" / "__init__.py").write_text("")
        (root / "src" / "modeling.py").write_text(textwrap.dedent(_MODELING))
        self.root = root

    def __enter__(self):
        sys.path.insert(0, str(self.root))
        import src.modeling

        return src.modeling

    def __exit__(self, *exc):
        sys.path.remove(str(self.root))
        for name in ("src.modeling", "src"):
            sys.modules.pop(name, None)


def _save_legacy_named(encoder, path: Path) -> None:
    """Pickle ``encoder`` with its vision tower under open_clip < 2.5's name ``open_clip.model.VisualTransformer``."""
    legacy = type("VisualTransformer", (open_clip.transformer.VisionTransformer,), {"__module__": "open_clip.model"})
    open_clip.model.VisualTransformer = legacy
    try:
        encoder.model.visual.__class__ = legacy
        torch.save(encoder, path)
    finally:
        encoder.model.visual.__class__ = open_clip.transformer.VisionTransformer
        del open_clip.model.VisualTransformer


def build_clip_pool(root: Path) -> ClipPool:
    torch.manual_seed(0)
    model, train_preprocess, val_preprocess = open_clip.create_model_and_transforms(ARCH)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clips = {"base": base}
    for i, task in enumerate(TASKS, start=1):
        gen = torch.Generator().manual_seed(100 + i)
        # the image tower moves; the projection stays θ0's, as in FusionBench's CLIPVisionModel fine-tunes
        clips[task] = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if k.startswith("visual.") and k != "visual.proj"
                       else v for k, v in base.items()}
    pool = ClipPool(root, clips)
    files = pool.files

    with _FakeTaskVectors(root / "task_vectors_code") as modeling:
        tv = root / "task_vectors"
        files["task_vectors"] = {}
        for name, clip in clips.items():
            path = tv / ("zeroshot.pt" if name == "base" else f"{name}/finetuned.pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            copy_ = copy.deepcopy(model)
            copy_.load_state_dict(clip)
            encoder = modeling.ImageEncoder(copy_, train_preprocess, val_preprocess)
            if name == TASKS[0]:
                _save_legacy_named(encoder, path)
            else:
                torch.save(encoder, path)
            files["task_vectors"][name] = path
            # TALL-masks: the same ImageEncoder's state dict, with the model name it records
            tall = root / "tall_masks" / ("nonlinear_zeroshot.pt" if name == "base" else f"{name}Val/nonlinear_finetuned.pt")
            tall.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**encoder.state_dict(), "model_name": "ViT-B-32"}, tall)
            files.setdefault("tall_masks", {})[name] = tall
        for i, task in enumerate(TASKS[:2]):
            gen = torch.Generator().manual_seed(200 + i)
            weight, bias = torch.randn(10, 512, generator=gen), torch.randn(10, generator=gen) if i else None
            torch.save(modeling.ClassificationHead(normalize=not i, weights=weight, biases=bias), tv / f"head_{task}.pt")
            pool.heads[task] = (weight, torch.zeros(10) if bias is None else bias, not i)

    hf = root / "hf"
    files["hf"] = {"base": hf / "clip-vit-base-patch32"}
    _write_hf(base, files["hf"]["base"], vision_only=False)
    for i, task in enumerate(TASKS):
        files["hf"][task] = hf / f"clip-vit-base-patch32_{task.lower()}"
        _write_hf(clips[task], files["hf"][task], vision_only=True, layout=("v4", "v5", "bin")[i])

    files["open_clip"], files["raymerge"] = {}, {}
    for name, clip in clips.items():
        if name == TASKS[-1]:  # an open_clip training checkpoint: {"epoch", "state_dict"} with DDP's module. prefix
            files["open_clip"][name] = root / "open_clip" / f"{name}_epoch_10.pt"
            files["open_clip"][name].parent.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in clip.items()}}, files["open_clip"][name])
        else:
            files["open_clip"][name] = root / "open_clip" / f"{name}.safetensors"
            models.save_state_dict_file(clip, files["open_clip"][name])
    files["raymerge"]["base"] = root / "raymerge" / "base.safetensors"
    models.save_state_dict_file(pool.encoder("base"), files["raymerge"]["base"])
    return pool


@pytest.fixture(scope="session")
def clip_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_pool")
    yield build_clip_pool(root)
    shutil.rmtree(root)  # about 8 GB: pytest would keep it with its last three runs' temporary directories


@pytest.fixture(scope="session")
def _session_raymerge_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raymerge_cache")


@pytest.fixture
def raymerge_cache(_session_raymerge_cache, monkeypatch) -> Path:
    """A RAYMERGE_CACHE for these tests alone (never the user's), shared by them: conversions are deterministic."""
    monkeypatch.setenv("RAYMERGE_CACHE", str(_session_raymerge_cache))
    return _session_raymerge_cache


@pytest.fixture
def fresh_raymerge_cache(tmp_path, monkeypatch) -> Path:
    """An empty RAYMERGE_CACHE, for tests that count what gets cached."""
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
