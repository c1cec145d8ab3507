"""Every bad input of issue #15, run as a user would (a fresh `python jobs/eval.py` or `raymerge` process): exit code
2, one message naming the file or key, no traceback, and, where it applies, no zoo built, no Ray started and no row
written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raymerge import models
from raymerge.results import ResultStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pool(mini_pool, tmp_path):
    root = tmp_path / "pool"
    shutil.copytree(mini_pool, root, ignore=shutil.ignore_patterns("results"))
    raw = yaml.safe_load((root / "experiment.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "out")
    (root / "experiment.yaml").write_text(yaml.safe_dump(raw))
    return root


def _run(tmp_path: Path, *args: str, command: tuple[str, ...] = ("jobs/eval.py",), ray_dir: Path | None = None
         ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env |= {"RAYMERGE_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(ray_dir or tmp_path / "ray"),
            "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(REPO / command[0])] if command[0].endswith(".py") else [sys.executable, "-m", *command]
    done = subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, f"{done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr + done.stdout
    return done


def _nothing_started(tmp_path: Path) -> None:
    assert not (tmp_path / "cache" / "zoo-seed0").exists(), "the embedded zoo was built"
    assert not (tmp_path / "ray").exists(), "Ray was started"
    assert not (tmp_path / "out" / "rows").exists() or not ResultStore(tmp_path / "out").rows(), "rows were written"


def test_config_errors_of_an_embedded_zoo_experiment(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "zoo": "embedded", "setting": "robust", "methods": {"wise_ft": {"lamdas": [1]}},
                                    "resources": {"batch_size": 0}}))
    err = _run(tmp_path, "--config", str(path)).stderr
    assert "methods.wise_ft.lamdas: unknown key" in err and "resources.batch_size: input should be greater than" in err
    _nothing_started(tmp_path)


def test_a_yaml_list_with_set(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n- seed: 1\n")
    err = _run(tmp_path, "--config", str(path), "--set", "seed=2").stderr
    assert f"{path}" in err and "an experiment must be a mapping of keys, got list" in err
    _nothing_started(tmp_path)


def test_nan_weights_name_the_file_and_key_before_any_row(pool, tmp_path):
    sd = models.load_state_dict_file(pool / "ft2.safetensors")
    sd["transformer.resblocks.1.mlp.c_fc.weight"][3, 4] = float("nan")
    models.save_state_dict_file(sd, pool / "ft2.safetensors")
    err = _run(tmp_path, "--config", str(pool / "experiment.yaml")).stderr
    assert "ft2.safetensors" in err and "transformer.resblocks.1.mlp.c_fc.weight" in err and "NaN" in err
    _nothing_started(tmp_path)


def test_several_bad_files_are_reported_together(pool, tmp_path):
    (pool / "ft1.safetensors").write_bytes(b"not a checkpoint")
    torch.manual_seed(0)
    models.save_head(models.Head(torch.randn(10, 32), None, tuple("0123456789")), pool / "head.safetensors")
    (pool / "rotate" / "part-00000.parquet").write_bytes(b"PAR1 truncated")
    err = _run(tmp_path, "--config", str(pool / "experiment.yaml")).stderr
    assert "3 problem(s) with the experiment's inputs" in err
    assert "ft1.safetensors" in err and "head.safetensors" in err and "rotate" in err
    _nothing_started(tmp_path)


def test_unreadable_images_are_named_by_path(pool, tmp_path):
    from PIL import Image

    folder = pool / "jpegs"
    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / str(c) / "a.jpg")
    whole = (folder / "3" / "a.jpg").read_bytes()
    (folder / "3" / "a.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "7" / "b.png").write_bytes(b"\x89PNG not really")
    err = _run(tmp_path, "--config", str(pool / "experiment.yaml"), "--set", f"task_pool.digits.shifts.rotate={folder}").stderr
    assert str(folder / "3" / "a.jpg") in err and str(folder / "7" / "b.png") in err and "2 of 11 images" in err
    _nothing_started(tmp_path)


def test_a_corrupt_results_part_is_reported_before_any_work(pool, tmp_path):
    rows = tmp_path / "out" / "rows"
    rows.mkdir(parents=True)
    (rows / "part-1.parquet").write_bytes(b"garbage")
    err = _run(tmp_path, "--config", str(pool / "experiment.yaml")).stderr
    assert str(rows / "part-1.parquet") in err and "python -m raymerge.results repair" in err
    assert not (tmp_path / "ray").exists()


def test_an_unwritable_output_dir_is_reported_with_the_other_problems(pool, tmp_path):
    (tmp_path / "a-file").write_text("")
    (pool / "ft1.safetensors").write_bytes(b"not a checkpoint")
    out = tmp_path / "a-file" / "out"
    err = _run(tmp_path, "--config", str(pool / "experiment.yaml"), "--set", f"output_dir={out}").stderr
    assert f"output_dir {out} cannot be written" in err and "ft1.safetensors" in err
    _nothing_started(tmp_path)


def test_a_bad_input_leaves_no_output_dir_behind(pool, tmp_path):
    (pool / "ft1.safetensors").write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "out"
    _run(tmp_path, "--config", str(pool / "experiment.yaml"), "--set", f"output_dir={out}")
    assert not (tmp_path / "new").exists()


def test_an_infeasible_resource_request_fails_fast(pool, tmp_path):
    ray_dir = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # Ray's socket paths must stay under 108 characters
    try:
        err = _run(tmp_path, "--config", str(pool / "experiment.yaml"), "--address", "local", "--num-cpus", "2",
                   "--set", "resources.num_cpus_per_actor=100", ray_dir=ray_dir).stderr
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert "100" in err and "resources.num_cpus_per_actor" in err and "can never run" in err
    assert not (tmp_path / "out" / "rows").exists() or not ResultStore(tmp_path / "out").rows()


def test_a_pickle_without_trust_points_to_raymerge_import(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module, as task_vectors ships them
    done = _run(tmp_path, str(pickled), str(tmp_path / "out.safetensors"), command=("raymerge.cli", "convert"))
    message = done.stderr + done.stdout
    assert str(pickled) in message and "raymerge import" in message
    assert "weights_only=False" not in message
    assert not (tmp_path / "out.safetensors").exists()
