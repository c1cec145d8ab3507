"""The embedded zoo: reproducible from its seed, complete, loadable, verifiable, built once.

``tiny_zoo`` (conftest) is the manifest path of a tiny-scale zoo of seed 0; tests copy it before modifying it.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from raymerge import models, zoo
from raymerge.data import load_dataset

ARCH = "raymerge-tiny-vit"


def _manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _checkpoints(manifest: dict) -> list[str]:
    return [p for p in manifest["files"] if p.startswith("checkpoints/")]


def test_same_seed_gives_identical_files_other_seed_other_weights(tiny_zoo, tmp_path):
    again = _manifest(zoo.build_zoo(tmp_path / "again", seed=0, scale="tiny"))
    first = _manifest(tiny_zoo)
    assert again["files"] == first["files"]
    assert again["reference_accuracy"] == first["reference_accuracy"]
    # built over the first copy: also exercises replacing an existing zoo
    other = _manifest(zoo.build_zoo(tmp_path / "again", seed=1, scale="tiny"))
    assert other["seed"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["again", "again.lock"]
    assert set(other["files"]) == set(first["files"])
    for path in _checkpoints(first):
        assert other["files"][path] != first["files"][path], path


def test_manifest_lists_exactly_the_files_on_disk(tiny_zoo):
    root = tiny_zoo.parent
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {zoo.MANIFEST}
    assert set(_manifest(tiny_zoo)["files"]) == on_disk
    assert not list(root.parent.glob("*.tmp")) and not list(root.parent.glob("*.old"))


def test_manifest_shape_and_every_file_loads(tiny_zoo):
    manifest = _manifest(tiny_zoo)
    root = tiny_zoo.parent
    assert manifest["name"] == zoo.ZOO_NAME and manifest["seed"] == 0
    assert set(manifest["settings"]) == {"robust", "multitask"}
    robust = manifest["settings"]["robust"]
    assert list(robust["model_pool"]["finetuned"])[0] == "ft"
    assert len(robust["model_pool"]["finetuned"]) >= 3
    assert len(robust["task_pool"]["digits"]["shifts"]) >= 5
    multitask = manifest["settings"]["multitask"]
    assert len(multitask["task_pool"]) == 8
    assert multitask["model_pool"]["base"] == robust["model_pool"]["base"]

    for setting in manifest["settings"].values():
        pool = setting["model_pool"]
        assert pool["architecture"] == ARCH
        reference = models.build_encoder(ARCH).state_dict()
        for rel in [pool["base"], *pool["finetuned"].values()]:
            assert set(models.load_encoder_weights(ARCH, root / rel)) == set(reference)
        for name, task in setting["task_pool"].items():
            head = models.load_head(root / task["head"])
            models.check_head(head, ARCH, task["head"])
            if "finetuned" in task:
                assert task["finetuned"] in pool["finetuned"]
            for rel in [task["validation"], task["test"], *task.get("shifts", {}).values()]:
                ds = load_dataset(root / rel)
                assert len(ds) > 0 and ds.images.shape[1:] == (16, 16) and ds.images.dtype == np.uint8
                assert ds.class_names == head.class_names, (name, rel)
                ds.check_labels(head.num_classes, task["head"])

    accuracy = manifest["reference_accuracy"]
    assert set(accuracy["robust"]) >= {"zeroshot", *robust["model_pool"]["finetuned"]}
    assert set(accuracy["multitask"]["finetuned"]) == set(multitask["task_pool"]) | {"mean"}


def test_verify_zoo_names_a_corrupted_or_missing_file(tiny_zoo, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_zoo.parent, root)
    assert zoo.verify_zoo(root / zoo.MANIFEST)["seed"] == 0

    victim = root / "checkpoints" / "robust" / "ft.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="checkpoints/robust/ft.safetensors.*corrupted"):
        zoo.verify_zoo(root / zoo.MANIFEST)

    victim.unlink()
    with pytest.raises(zoo.ZooError, match="checkpoints/robust/ft.safetensors.*missing"):
        zoo.verify_zoo(root / zoo.MANIFEST)


def test_ensure_zoo_reuses_an_existing_zoo(tiny_zoo, tmp_path, monkeypatch, capsys):
    root = zoo.zoo_dir(tmp_path, seed=0)
    shutil.copytree(tiny_zoo.parent, root)
    before = (root / zoo.MANIFEST).stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("ensure_zoo rebuilt an existing zoo")

    monkeypatch.setattr(zoo, "_build_locked", no_build)
    assert zoo.ensure_zoo(tmp_path, seed=0) == root / zoo.MANIFEST
    assert (root / zoo.MANIFEST).stat().st_mtime_ns == before

    assert zoo.main(["build", "--cache-dir", str(tmp_path), "--seed", "0"]) == 0
    assert zoo.main(["verify", "--cache-dir", str(tmp_path), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "already built" in out and "zeroshot" in out and "all files match" in out


def test_concurrent_ensure_zoo_builds_once(tmp_path, monkeypatch):
    builds = []

    def fake_build(root: Path, seed: int, scale: str) -> Path:
        builds.append(seed)
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        root.mkdir(parents=True)
        (root / zoo.MANIFEST).write_text("files: {}\n")
        return root / zoo.MANIFEST

    monkeypatch.setattr(zoo, "_build_locked", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(zoo.ensure_zoo(tmp_path, seed=3))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [3]
    assert results == [zoo.zoo_dir(tmp_path, 3) / zoo.MANIFEST] * 2


def test_interrupted_build_leaves_no_zoo(tmp_path, monkeypatch):
    def crash(root: Path, seed: int, scale_name: str) -> dict:
        (root / "checkpoints").mkdir()
        (root / "checkpoints" / "half.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_build_into", crash)
    root = tmp_path / "zoo-seed0"
    with pytest.raises(KeyboardInterrupt):
        zoo.build_zoo(root, seed=0, scale="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo-seed0.lock"]
    with pytest.raises(zoo.ZooError):
        zoo.verify_zoo(root / zoo.MANIFEST)


def test_build_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(zoo.ZooError, match="not a zoo"):
        zoo.build_zoo(root, seed=0, scale="tiny")
    assert (root / "notes.txt").read_text() == "keep me"


def test_cache_dir_defaults_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "cache"))
    assert zoo.default_cache_dir() == tmp_path / "cache"
    assert zoo.zoo_dir(seed=2) == tmp_path / "cache" / "zoo-seed2"
    assert zoo.zoo_dir(tmp_path / "flag", seed=2) == tmp_path / "flag" / "zoo-seed2"
    monkeypatch.delenv("RAYMERGE_CACHE")
    assert zoo.default_cache_dir() == Path.home() / ".cache" / "raymerge"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return zoo.load_digit_images()[0]


@pytest.mark.parametrize("name", sorted(zoo.CORRUPTIONS))
def test_corruptions_are_deterministic_uint8_and_change_the_image(name, digits):
    batch = digits[:20]
    a = zoo.corrupt(batch, name, np.random.default_rng(7))
    b = zoo.corrupt(batch, name, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == batch.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, batch)
