"""Each bad input stops `jobs/eval.py` with one clear message naming the culprit, before any model runs."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import random_dataset
from raymerge import models, pipeline
from raymerge.data import ImageDataset, write_parquet

REPO = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("eval_job", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def pool_copy(mini_pool, tmp_path, monkeypatch):
    root = tmp_path / "pool"
    shutil.copytree(mini_pool, root, ignore=shutil.ignore_patterns("results"))
    raw = yaml.safe_load((root / "experiment.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "out")
    (root / "experiment.yaml").write_text(yaml.safe_dump(raw))

    def no_workers(*args, **kwargs):  # any attempt to start actors means the check came too late
        raise AssertionError("workers were started before the bad input was caught")

    monkeypatch.setattr(pipeline, "WorkerPool", no_workers)
    monkeypatch.setattr(pipeline, "connect", lambda *a, **k: None)
    return root


def _run(root: Path, capsys, *extra: str) -> str:
    code = _job().main(["--config", str(root / "experiment.yaml"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_missing_checkpoint(pool_copy, capsys):
    (pool_copy / "ft2.safetensors").unlink()
    err = _run(pool_copy, capsys)
    assert "model_pool.finetuned.ft2" in err and "ft2.safetensors does not exist" in err


def test_corrupt_checkpoint(pool_copy, capsys):
    path = pool_copy / "ft1.safetensors"
    path.write_bytes(path.read_bytes()[:500])
    assert "ft1.safetensors cannot be read safely" in _run(pool_copy, capsys)


def test_checkpoint_of_another_architecture(pool_copy, capsys):
    sd = models.load_state_dict_file(pool_copy / "ft1.safetensors")
    sd["transformer.resblocks.0.mlp.c_fc.weight"] = sd["transformer.resblocks.0.mlp.c_fc.weight"][:128]
    models.save_state_dict_file(sd, pool_copy / "ft1.safetensors")
    err = _run(pool_copy, capsys)
    assert "ft1.safetensors" in err and "transformer.resblocks.0.mlp.c_fc.weight" in err and "(128, 64)" in err


def test_empty_dataset(pool_copy, capsys):
    write_parquet(ImageDataset("e", np.zeros((0, 16, 16), np.uint8), np.zeros(0, np.int64), tuple("0123456789")), pool_copy / "rotate")
    assert "rotate is empty" in _run(pool_copy, capsys)


def test_labels_out_of_range(pool_copy, capsys):
    write_parquet(random_dataset(1, 40, 12), pool_copy / "noise")
    err = _run(pool_copy, capsys)
    assert "noise" in err and "classes ['10', '11'] are not among the 10 classes of head" in err and "head.safetensors" in err


def test_unknown_model_name(pool_copy, capsys):
    assert "model_pool.architecture: unknown model name 'ViT-Z-1'" in _run(pool_copy, capsys, "--set", "model_pool.architecture=ViT-Z-1")


def test_unknown_config_key(pool_copy, capsys):
    err = _run(pool_copy, capsys, "--set", "methods.wise_ft.lambda=[0.5]")
    assert "methods.wise_ft.lambda: unknown key" in err


def test_label_space_differs_from_the_head(pool_copy, capsys):
    ds = random_dataset(2, 40, 10)
    wider = ImageDataset("w", ds.images, ds.labels, tuple(str(i) for i in range(12)))  # labels fit, classes do not
    write_parquet(wider, pool_copy / "rotate")
    err = _run(pool_copy, capsys)
    assert "rotate: classes ['10', '11'] are not among the 10 classes of head" in err and "head.safetensors" in err
