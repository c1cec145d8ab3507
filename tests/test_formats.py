"""Checkpoint formats: every format of the same weights imports to the same state dict, features match transformers,
and bad input (unsafe pickles, other architectures, misfit tensors, NaN) is refused by name before any work."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from clip_fixtures import ARCH, TASKS
from raymerge import cli, formats, models
from raymerge.data import decode, load_dataset
from raymerge.formats import UnsafePickleError

# never the user's cache: conversions and heads of these fixtures go to a test-only RAYMERGE_CACHE
pytestmark = pytest.mark.usefixtures("raymerge_cache")


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.slow  # the ViT-B-32 pool
@pytest.mark.parametrize("fmt", ["task_vectors", "tall_masks", "hf", "open_clip", "raymerge"])
def test_every_format_imports_the_same_state_dict(clip_pool, raymerge_cache, tmp_path, fmt):
    base_hf = clip_pool.files["hf"]["base"]
    for name, path in clip_pool.files[fmt].items():
        assert formats.detect_format(path) == fmt
        expected = clip_pool.encoder(name)
        # the load path an experiment file goes through (converted and cached where needed)...
        assert_same(models.load_encoder_weights(ARCH, path, projection_from=base_hf), expected)
        assert "src.modeling" not in sys.modules and "src" not in sys.modules  # no task_vectors code was needed
    # ...and `raymerge import` with the format named
    name, path = list(clip_pool.files[fmt].items())[-1]
    out = tmp_path / f"{fmt}.safetensors"
    assert cli.main(["import", str(path), "--out", str(out), "--model", ARCH, "--format", fmt,
                     "--projection-from", str(base_hf)]) == 0
    assert_same(models.load_state_dict_file(out), clip_pool.encoder(name))


@pytest.mark.slow  # the ViT-B-32 pool
def test_conversions_are_cached_by_source_bytes(clip_pool, fresh_raymerge_cache, tmp_path, monkeypatch):
    cache = fresh_raymerge_cache
    src = clip_pool.files["task_vectors"][TASKS[1]]
    first = models.load_encoder_weights(ARCH, src)
    cached = list((cache / "imports").glob("*.safetensors"))
    assert len(cached) == 1
    # the same bytes elsewhere are read from the cache: the converter is not called again
    copy = tmp_path / "finetuned.pt"
    shutil.copy(src, copy)
    with monkeypatch.context() as m:
        m.setattr(formats, "_read_pickle", lambda path: pytest.fail(f"{path} was converted again"))
        assert_same(models.load_encoder_weights(ARCH, copy), first)
    assert list((cache / "imports").glob("*.safetensors")) == cached
    # an HF vision model's key includes where its projection came from
    ft = clip_pool.files["hf"][TASKS[0]]
    models.load_encoder_weights(ARCH, ft, projection_from=clip_pool.files["hf"]["base"])
    models.load_encoder_weights(ARCH, ft, projection_from=clip_pool.files["raymerge"]["base"])
    assert len(list((cache / "imports").glob("*.safetensors"))) == 3


@pytest.mark.slow  # the ViT-B-32 pool
def test_task_vectors_heads(clip_pool, tmp_path):
    for task, (weight, bias, normalize) in clip_pool.heads.items():
        path = clip_pool.root / "task_vectors" / f"head_{task}.pt"
        head = models.load_head(path)
        assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias) and head.normalize is normalize
        assert head.class_names == tuple(str(i) for i in range(10))
        out = tmp_path / f"{task}.safetensors"
        assert cli.main(["import", str(path), "--out", str(out), "--classes", task]) == 0
        saved = models.load_head(out)
        assert saved.class_names == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
        assert torch.equal(saved.weight, weight) and saved.normalize is normalize


def _images(tmp_path, size: tuple[int, int], n: int = 4) -> list:
    """Real JPEG files (smooth gradients plus noise, so that resizing matters), decoded back with PIL."""
    rng = np.random.default_rng(size[0])
    paths = []
    for i in range(n):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200 + rng.normal(0, 25, (h, w, 3))
        folder = tmp_path / f"{w}x{h}" / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
        paths.append(folder / f"{i}.jpg")
    return sorted(paths)


@pytest.mark.slow  # the ViT-B-32 pool
@torch.no_grad()
def test_image_features_match_transformers(clip_pool, raymerge_cache, tmp_path):
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()
    # TASKS[0] is in transformers 4's layout, as the published CLIPVisionModel fine-tunes are
    base_dir, ft_dir = clip_pool.files["hf"]["base"], clip_pool.files["hf"][TASKS[0]]
    reference = {"base": CLIPVisionModelWithProjection.from_pretrained(base_dir).eval()}
    ft_ref, info = CLIPVisionModelWithProjection.from_pretrained(ft_dir, output_loading_info=True)
    assert set(info["missing_keys"]) == {"visual_projection.weight"} and not info["unexpected_keys"]
    ft_ref.visual_projection.weight.copy_(reference["base"].visual_projection.weight)  # a CLIPVisionModel has none
    reference[TASKS[0]] = ft_ref.eval()

    square, other = _images(tmp_path, (224, 224)), _images(tmp_path, (320, 256))
    transform = models.image_transform(ARCH)
    for name, path in (("base", base_dir), (TASKS[0], ft_dir)):
        encoder = models.build_encoder(ARCH)
        encoder.load_state_dict(models.load_encoder_weights(ARCH, path, projection_from=base_dir))
        for files in (square, other):
            pil = [Image.open(f).convert("RGB") for f in files]
            expected = reference[name](pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]).image_embeds
            ours = encoder(torch.stack([transform(im) for im in pil]))
            assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (name, files[0].parent, (ours - expected).abs().max())
        # the images as raymerge reads an image folder and its actors preprocess it (any size)
        for folder in ("224x224", "320x256"):
            data = load_dataset(tmp_path / folder)
            ours = encoder(models.prepare_images(data, ARCH))
            pil = [decode(blob, name) for blob, name in zip(data.encoded, data.names)]
            expected = reference[name](pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"]).image_embeds
            assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (name, folder)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_pickle_that_would_run_a_command_is_refused(tmp_path, raymerge_cache):
    marker = tmp_path / "pwned"
    zip_file, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": _RunsACommand(marker)}, zip_file)
    torch.save({"weight": torch.zeros(2, 2), "payload": _RunsACommand(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    system = f"{os.system.__module__}.system"  # posix.system here
    for path in (zip_file, legacy):
        with pytest.raises(UnsafePickleError, match=rf"{path.name} is a pickle that names global\(s\) '{system}'"):
            models.load_encoder_weights(ARCH, path)
        with pytest.raises(UnsafePickleError, match=system):
            models.load_head(path)
        assert cli.main(["import", str(path), "--out", str(tmp_path / "x.safetensors"), "--model", ARCH]) == 2
    with pytest.raises(models.CheckpointError, match=r"evil.pt cannot be read safely as a state dict.*raymerge import") as err:
        models.load_state_dict_file(zip_file)
    assert "weights_only" not in str(err.value)
    # pickle protocol 4 (STACK_GLOBAL) cannot even be scanned: refused all the same
    protocol4 = tmp_path / "evil4.pt"
    torch.save({"payload": _RunsACommand(marker)}, protocol4, pickle_protocol=4)
    for load in (models.load_state_dict_file, lambda p: models.load_encoder_weights(ARCH, p), models.load_head):
        with pytest.raises(models.CheckpointError, match="evil4.pt cannot be read safely") as err:
            load(protocol4)
        assert "weights_only" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow  # the ViT-B-32 pool
def test_pickle_with_an_unexpected_global_names_it(clip_pool, tmp_path, capsys):
    # a real encoder pickle with one extra class that is not on the allowlist
    src = clip_pool.files["task_vectors"]["base"]
    bad = tmp_path / "zeroshot.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"ctorch.nn.modules.sparse\nEmbedding\n" in data
                data = data.replace(b"ctorch.nn.modules.sparse\nEmbedding\n", b"cnumpy.lib.npyio\nNpzFile\n")
            zout.writestr(item, data)
    with pytest.raises(UnsafePickleError, match=r"names global\(s\) 'numpy.lib.npyio.NpzFile'"):
        formats.read_encoder(bad, ARCH)
    assert cli.main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "raymerge import" in err and "weights_only" not in err


@pytest.mark.slow  # the ViT-B-32 pool
def test_hf_directory_of_another_architecture(clip_pool, tmp_path):
    base = clip_pool.files["hf"]["base"]
    # OpenAI CLIP's QuickGELU read as open_clip's GELU ViT-B-32: shapes agree, the activation does not
    with pytest.raises(models.CheckpointError, match=rf"{base.name} is not a ViT-B-32 checkpoint: its "
                                                     r"vision_config.hidden_act is 'quick_gelu', ViT-B-32 has 'gelu'"):
        models.load_encoder_weights("ViT-B-32", base)
    # a ViT-B/16 directory (config only: the error comes before any weights are read)
    b16 = tmp_path / "clip-vit-base-patch16"
    b16.mkdir()
    config = json.loads((clip_pool.files["hf"][TASKS[0]] / "config.json").read_text())
    (b16 / "config.json").write_text(json.dumps(config | {"patch_size": 16}))
    with pytest.raises(models.CheckpointError, match=r"clip-vit-base-patch16 is not a ViT-B-32-quickgelu checkpoint: "
                                                     r"its patch_size is 16, ViT-B-32-quickgelu has 32"):
        formats.read_encoder(b16, ARCH, projection_from=base)
    (b16 / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(models.CheckpointError, match="model_type 'siglip'"):
        formats.read_encoder(b16, ARCH)
    # a vision model without its projection, and none named
    with pytest.raises(models.CheckpointError, match="has no visual projection: name the CLIPModel .* --projection-from"):
        formats.read_encoder(clip_pool.files["hf"][TASKS[0]], ARCH)


@pytest.mark.slow  # the ViT-B-32 pool
def test_checkpoint_that_does_not_fit_the_model(clip_pool, tmp_path):
    # OpenAI CLIP pickles hold QuickGELU modules: open_clip's plain ViT-B-32 has the same shapes but GELU
    with pytest.raises(models.CheckpointError, match=r"zeroshot.pt was pickled with quick_gelu activations in its "
                                                     r"image tower, but ViT-B-32 uses gelu: name ViT-B-32-quickgelu"):
        models.load_encoder_weights("ViT-B-32", clip_pool.files["task_vectors"]["base"])
    with pytest.raises(models.CheckpointError, match=r"MNIST/finetuned.pt was pickled with quick_gelu"):  # legacy names
        models.load_encoder_weights("ViT-B-32", clip_pool.files["task_vectors"][TASKS[0]])
    with pytest.raises(models.CheckpointError, match=r"zeroshot.pt \(model ViT-B-16-quickgelu\): key 'positional_embedding' "
                                                     r"has shape \(50, 768\)"):
        models.load_encoder_weights("ViT-B-16-quickgelu", clip_pool.files["task_vectors"]["base"])
    with pytest.raises(models.CheckpointError, match=r"nonlinear_zeroshot.pt is an ImageEncoder state dict .*not format hf"):
        formats.read_encoder(clip_pool.files["tall_masks"]["base"], ARCH, fmt="hf")
    with pytest.raises(models.CheckpointError, match="head_MNIST.pt is a classification head"):
        formats.read_encoder(clip_pool.root / "task_vectors" / "head_MNIST.pt", ARCH)
    with pytest.raises(models.CheckpointError, match="is an image encoder .*name its architecture with --model"):
        formats.import_checkpoint(clip_pool.files["raymerge"]["base"], tmp_path / "x.safetensors")
    assert cli.main(["import", str(clip_pool.files["raymerge"]["base"]), "--out", str(tmp_path / "x.safetensors"),
                     "--model", "ViT-Q-99"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow  # the ViT-B-32 pool
def test_nan_and_inf_weights_are_named(clip_pool, tmp_path):
    sd = clip_pool.encoder("base")
    bad = dict(sd, **{"transformer.resblocks.3.mlp.c_fc.weight": sd["transformer.resblocks.3.mlp.c_fc.weight"].clone()})
    bad["transformer.resblocks.3.mlp.c_fc.weight"][5, 7] = float("nan")
    models.save_state_dict_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(models.CheckpointError, match=r"key 'transformer.resblocks.3.mlp.c_fc.weight' of checkpoint "
                                                     r".*nan.safetensors contains NaN"):
        models.load_encoder_weights(ARCH, tmp_path / "nan.safetensors")
    bad["transformer.resblocks.3.mlp.c_fc.weight"][5, 7] = float("inf")
    torch.save({f"model.visual.{k}": v for k, v in bad.items()} | {"model_name": "ViT-B-32"}, tmp_path / "inf.pt")
    with pytest.raises(models.CheckpointError, match=r"c_fc.weight' of checkpoint .*inf.pt contains Inf"):
        models.load_encoder_weights(ARCH, tmp_path / "inf.pt")


@pytest.mark.slow  # the ViT-B-32 pool
def test_open_clip_pretrained_file_and_tag(clip_pool, tmp_path, monkeypatch):
    out = tmp_path / "b32.safetensors"
    oc = str(clip_pool.files["open_clip"]["base"])
    assert cli.main(["import", "--format", "open_clip", "--model", ARCH, "--pretrained", oc, "--out", str(out)]) == 0
    assert_same(models.load_state_dict_file(out), clip_pool.encoder("base"))
    # a tag is looked up in open_clip's (Hugging Face) cache only; absent, the message says what to put where
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.CheckpointError, match=r"not in open_clip's local cache and nothing is downloaded here: "
                                                     r"fetch https://huggingface.co/timm/vit_base_patch32_clip_224.openai/"
                                                     r"resolve/main/open_clip_pytorch_model.bin .*--pretrained FILE"):
        formats.resolve_pretrained(ARCH, "openai", cache_dir=hub)
    # once it is there (as huggingface_hub lays out its cache), the tag resolves to it without a network
    repo = hub / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(oc, repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    resolved = formats.resolve_pretrained(ARCH, "openai", cache_dir=hub)
    assert resolved.name == "open_clip_model.safetensors"
    assert_same(formats.read_encoder(resolved, ARCH, fmt="open_clip"), clip_pool.encoder("base"))
    with pytest.raises(models.CheckpointError, match="neither a file nor a pretrained tag of ViT-B-32-quickgelu"):
        formats.resolve_pretrained(ARCH, "no-such-tag", cache_dir=hub)
