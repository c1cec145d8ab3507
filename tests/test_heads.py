"""Zero-shot heads: equal to open_clip's classifier and to CLIP's formula on transformers' text tower, cached by
(text weights, class names, templates), with the benchmarks' class names and templates shipped."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from clip_fixtures import ARCH, TASKS
from raymerge import cli, heads, models

CLASSES = ("cat", "dog", "airplane")
TEMPLATES = ("a photo of a {}.", "a blurry drawing of the {}.")

# never the user's cache: conversions and heads of these fixtures go to a test-only RAYMERGE_CACHE
pytestmark = pytest.mark.usefixtures("raymerge_cache")


@pytest.mark.slow  # the ViT-B-32 pool
@torch.no_grad()
def test_head_equals_open_clip_zero_shot_classifier(clip_pool, raymerge_cache):
    path = clip_pool.files["open_clip"]["base"]
    head = heads.zero_shot_head(ARCH, path, "MNIST", "EuroSAT", device="cpu")
    # open_clip alone: its own checkpoint loader, tokenizer and classifier builder, times the logit scale
    model = open_clip.create_model(ARCH, pretrained=str(path)).eval()
    names, templates = heads.class_names("MNIST"), heads.templates("EuroSAT")
    classifier = build_zero_shot_classifier(model, open_clip.get_tokenizer(ARCH), names, templates, num_classes_per_batch=None)
    expected = classifier.T * model.logit_scale.exp()
    assert head.class_names == names == tuple(str(d) for d in range(10)) and head.normalize and head.bias is None
    assert head.weight.shape == (10, 512)
    assert torch.allclose(head.weight, expected, atol=1e-5, rtol=0)


@pytest.mark.slow  # the ViT-B-32 pool
@torch.no_grad()
def test_hugging_face_text_tower_gives_the_same_head(clip_pool, raymerge_cache):
    from transformers import CLIPModel

    hf_dir = clip_pool.files["hf"]["base"]
    from_hf = heads.zero_shot_head(ARCH, hf_dir, list(CLASSES), list(TEMPLATES), device="cpu")
    from_open_clip = heads.zero_shot_head(ARCH, clip_pool.files["open_clip"]["base"], list(CLASSES), list(TEMPLATES),
                                          device="cpu")
    assert torch.allclose(from_hf.weight, from_open_clip.weight, atol=1e-5, rtol=0)
    # CLIP's formula in float64 over transformers' own text tower (token ids from open_clip's tokenizer)
    model = CLIPModel.from_pretrained(hf_dir).eval()
    tokenizer = open_clip.get_tokenizer(ARCH)
    rows = []
    for name in CLASSES:
        text = model.get_text_features(input_ids=tokenizer([t.format(name) for t in TEMPLATES])).pooler_output.double()
        mean = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
        rows.append(mean / mean.norm())
    expected = torch.stack(rows) * model.logit_scale.double().exp()
    assert torch.allclose(from_hf.weight.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # the ViT-B-32 pool
def test_heads_are_cached_by_text_weights_classes_and_templates(clip_pool, fresh_raymerge_cache, monkeypatch):
    cache = fresh_raymerge_cache
    first = heads.zero_shot_head(ARCH, clip_pool.files["open_clip"]["base"], list(CLASSES), list(TEMPLATES), device="cpu")
    with monkeypatch.context() as m:
        m.setattr(heads, "build_head", lambda *a, **k: pytest.fail("the head was built again"))
        # a fine-tune's file: another image tower, the same text tower, so the same head
        again = heads.zero_shot_head(ARCH, clip_pool.files["open_clip"][TASKS[0]], list(CLASSES), list(TEMPLATES))
    assert torch.equal(again.weight, first.weight) and again.class_names == CLASSES
    heads.zero_shot_head(ARCH, clip_pool.files["open_clip"]["base"], list(CLASSES), list(TEMPLATES[:1]), device="cpu")
    assert len(list((cache / "heads").glob("*.safetensors"))) == 2


@pytest.mark.slow  # the ViT-B-32 pool
def test_head_command(clip_pool, raymerge_cache, tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nairplane\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na blurry drawing of the {}.\n")
    out = tmp_path / "head.safetensors"
    args = ["head", "--model", ARCH, "--weights", str(clip_pool.files["hf"]["base"]), "--classes",
            str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"), "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 0
    head = models.load_head(out)
    expected = heads.zero_shot_head(ARCH, clip_pool.files["open_clip"]["base"], list(CLASSES), list(TEMPLATES), device="cpu")
    assert head.class_names == CLASSES and torch.allclose(head.weight, expected.weight, atol=1e-5, rtol=0)
    other = tmp_path / "other.safetensors"
    assert cli.main([*args[:7], "--templates", "Imagenet-R", "--out", str(other)]) == 2
    assert not other.exists()


# Classes per dataset, from the datasets' own definitions.
NUM_CLASSES = {
    "Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45, "SVHN": 10, "SUN397": 397,
    "STL10": 10, "OxfordIIITPet": 37, "Flowers102": 102, "CIFAR100": 100, "PCAM": 2, "FER2013": 7,
    "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10, "RenderedSST2": 2, "EMNIST": 26, "KMNIST": 10, "ImageNet": 1000,
}


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_benchmark_class_names_and_templates_ship(name):
    names = heads.class_names(name)
    assert len(names) == NUM_CLASSES[name] and all(names)
    assert heads.class_names(name.lower()) == names
    assert all(t.count("{}") == 1 for t in heads.templates(name))


def test_known_lists_against_their_sources():
    assert heads.class_names("CIFAR10") == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                            "ship", "truck")
    # task_vectors' src/datasets/templates.py, cars_template
    assert heads.templates("Cars") == ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                                       "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                                       "a photo of my old {}.")
    assert len(heads.templates("ImageNet")) == 80 and heads.templates("ImageNet")[0] == "a bad photo of a {}."
    assert heads.class_names("ImageNet")[0] == "tench"
    assert heads.templates("ImageNet-simple")[:2] == ("itap of a {}.", "a bad photo of the {}.")  # CLIP's 7-prompt ensemble


@pytest.mark.slow  # the ViT-B-32 pool
def test_bad_class_and_template_specs(clip_pool, tmp_path):
    absent = tmp_path / "no-weights.safetensors"  # names are checked before weights are read
    with pytest.raises(heads.HeadError, match=r"templates 'Imagenet-R' are neither a file nor a known set: .*Cars.*SUN397"):
        heads.zero_shot_head(ARCH, absent, "MNIST", "Imagenet-R")
    with pytest.raises(heads.HeadError, match=r"class names 'Birds' are neither a file nor a known list: .*ImageNet"):
        heads.zero_shot_head(ARCH, absent, "Birds", "MNIST")
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {}.\na photo of a thing.\n")
    with pytest.raises(heads.HeadError, match=r"'a photo of a thing.' \(line 2 of .*templates.txt\) has no \{\}"):
        heads.templates(bad)
    bad.write_text("a photo of a {c}.\n")
    with pytest.raises(heads.HeadError, match=r"line 1 of .*templates.txt\) is not a format string"):
        heads.templates(bad)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n\n")
    with pytest.raises(heads.HeadError, match="classes.txt is empty"):
        heads.class_names(classes)
    classes.write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(heads.HeadError, match="classes.txt cannot be read"):
        heads.class_names(classes)
    # weights without a text tower
    with pytest.raises(models.CheckpointError, match="has no text tower key 'positional_embedding'"):
        heads.text_weights(ARCH, clip_pool.files["raymerge"]["base"])
    with pytest.raises(models.CheckpointError, match="zeroshot.pt has no text tower key 'transformer.resblocks.0"):
        heads.text_weights(ARCH, clip_pool.files["task_vectors"]["base"])  # saved without keep_lang
    with pytest.raises(models.CheckpointError, match="is a CLIPVisionModel: it has no text tower"):
        heads.text_weights(ARCH, clip_pool.files["hf"][TASKS[1]])
    with pytest.raises(models.CheckpointError, match="its text_config.hidden_act is 'quick_gelu', ViT-B-32 has 'gelu'"):
        heads.text_weights("ViT-B-32", clip_pool.files["hf"]["base"])
