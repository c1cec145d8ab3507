"""The experiment files in examples/ validate: the digits ones against the embedded zoo (its tiny scale here, so
the test takes seconds), the ViT-B/32 template once its placeholder paths are filled with stand-in files."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

import raymerge.zoo
from raymerge import config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PACKAGED = Path(config.__file__).parent / "experiments"
TEMPLATE = EXAMPLES / "clip-vit-b32-8tasks.yaml"
DIGITS = {"robust-digits.yaml": "robust.yaml", "multitask-digits.yaml": "multitask.yaml"}
STAND_IN_ARCH = "raymerge-tiny-vit"


@pytest.fixture()
def embedded_is_tiny(monkeypatch, tiny_zoo):
    """``zoo: embedded`` resolves to the tiny zoo instead of building the full one under the user's cache."""
    monkeypatch.setattr(raymerge.zoo, "ensure_zoo", lambda *args, **kwargs: tiny_zoo)
    return tiny_zoo


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_example_validates_as_written(name, embedded_is_tiny):
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    assert raw["zoo"] == config.EMBEDDED
    exp = config.load(EXAMPLES / name)
    assert exp.setting == raw["setting"]
    assert exp.base.is_relative_to(embedded_is_tiny.parent)
    assert set(exp.methods) == set(raw["methods"])


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_digits_example_validates_with_zoo_override(name, tiny_zoo):
    exp = config.load(EXAMPLES / name, [f"zoo={tiny_zoo}"])
    assert exp.tasks and exp.finetuned
    assert all(t.test.is_relative_to(tiny_zoo.parent) for t in exp.tasks.values())


@pytest.mark.parametrize("name, packaged", sorted(DIGITS.items()))
def test_digits_example_matches_packaged_default(name, packaged):
    """The examples are commented copies of the packaged defaults: same pools, methods and resources."""
    example = yaml.safe_load((EXAMPLES / name).read_text())
    default = yaml.safe_load((PACKAGED / packaged).read_text())
    for key in ("seed", "zoo", "setting", "methods", "resources"):
        assert example.get(key) == default.get(key), f"{name}: {key} differs from raymerge/experiments/{packaged}"


# --- the ViT-B/32 template ------------------------------------------------------------------------------------


def _strings(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, (*path, i))
    elif isinstance(node, str):
        yield path, node


def _placeholders(raw: dict) -> set[str]:
    """The /data/... paths a user fills in (output_dir is a place to write to, not an input)."""
    return {v for path, v in _strings(raw) if v.startswith("/data/") and path != ("output_dir",)}


def _fill(raw: dict, manifest: Path, setting: str) -> dict:
    """The template with the stand-in architecture and every input path replaced by a file of the tiny zoo."""
    raw = copy.deepcopy(raw)
    zoo = yaml.safe_load(manifest.read_text())["settings"][setting]
    root = manifest.parent
    mp, zoo_tasks = raw["model_pool"], list(zoo["task_pool"])
    mp["architecture"] = STAND_IN_ARCH
    mp["base"] = str(root / zoo["model_pool"]["base"])
    zoo_models = list(zoo["model_pool"]["finetuned"].values())
    for i, name in enumerate(mp["finetuned"]):
        mp["finetuned"][name] = str(root / zoo_models[i % len(zoo_models)])
    for i, task in enumerate(raw["task_pool"].values()):
        ztask = zoo["task_pool"][zoo_tasks[i % len(zoo_tasks)]]
        for key in ("head", "validation", "test"):
            if key in task:
                task[key] = str(root / ztask[key])
        zoo_shifts = list(ztask.get("shifts", {}).values())
        for j, shift in enumerate(task.get("shifts", {})):
            task["shifts"][shift] = str(root / zoo_shifts[j % len(zoo_shifts)])
    assert not _placeholders(raw), "a placeholder was left unfilled"
    return raw


def _uncomment_block(text: str, first: str, prefix: str) -> str:
    """Uncomment the commented YAML block that starts at the line ``first`` and goes on while lines start with
    ``prefix`` (its commented children), keeping everything else as it is."""
    lines = text.splitlines()
    start = lines.index(first)
    end = start + 1
    while end < len(lines) and lines[end].startswith(prefix):
        end += 1
    assert end > start + 1, f"no commented lines under {first!r}"
    block = [re.sub(r"^(\s*)# ?", r"\1", line) for line in lines[start:end]]
    return "\n".join(lines[:start] + block + lines[end:])


def test_template_unfilled_lists_every_missing_path():
    raw = yaml.safe_load(TEMPLATE.read_text())
    expected = _placeholders(raw)
    assert len(expected) == 1 + 8 + 8 * 3  # θ0, 8 fine-tuned models, 8 × (head, validation, test)
    with pytest.raises(config.ConfigError) as info:
        config.load(TEMPLATE)
    problems = info.value.problems
    assert len(problems) == len(expected), problems
    assert all(p.endswith("does not exist") for p in problems), problems  # nothing wrong but the paths
    assert {p.split(": ", 1)[1].removesuffix(" does not exist") for p in problems} == expected
    assert f"{len(expected)} problem(s)" in str(info.value)


def test_template_filled_with_stand_ins_validates(tiny_zoo):
    raw = yaml.safe_load(TEMPLATE.read_text())
    assert raw["model_pool"]["architecture"] == "ViT-B-32-quickgelu"  # OpenAI CLIP, as the task_vectors checkpoints
    exp = config.validate(_fill(raw, tiny_zoo, "multitask"), str(TEMPLATE), TEMPLATE.parent)
    assert exp.setting == "multitask"
    assert list(exp.tasks) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert {"weight_average", "task_arithmetic", "ties", "cart"} <= set(exp.methods)
    assert [(c.rank_ratio, c.lam, c.svd) for c in exp.methods["cart"]] == [(0.12, 2.0, "exact")]
    assert exp.resources.num_gpus_per_actor == 1


def test_template_commented_dawin_block_validates(tiny_zoo):
    text = _uncomment_block(TEMPLATE.read_text(), "  # dawin:", "  #  ")
    raw = yaml.safe_load(text)
    exp = config.validate(_fill(raw, tiny_zoo, "multitask"), str(TEMPLATE), TEMPLATE.parent)
    [dawin] = exp.methods["dawin"]
    assert dawin.mixture == "mean" and dawin.lam0 == 0.3


def test_template_commented_robust_block_validates(tiny_zoo):
    text = TEMPLATE.read_text()
    block = text[text.index("# name: clip-vit-b32-imagenet"):]
    raw = yaml.safe_load("\n".join(re.sub(r"^# ?", "", line) for line in block.splitlines()))
    assert raw["model_pool"]["architecture"] == "ViT-B-32-quickgelu"  # OpenAI CLIP, as the task_vectors checkpoints
    assert set(raw["task_pool"]["imagenet"]["shifts"]) == {"imagenet-v2", "imagenet-r", "imagenet-a",
                                                           "imagenet-sketch", "objectnet"}
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.validate(raw, str(TEMPLATE), TEMPLATE.parent)
    exp = config.validate(_fill(raw, tiny_zoo, "robust"), str(TEMPLATE), TEMPLATE.parent)
    assert exp.setting == "robust"
    assert list(exp.tasks["imagenet"].eval_sets()) == ["test", "imagenet-v2", "imagenet-r", "imagenet-a",
                                                       "imagenet-sketch", "objectnet"]
    assert {"wise_ft", "dawin"} <= set(exp.methods)
