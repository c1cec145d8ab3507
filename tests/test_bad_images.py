"""Unreadable images are named by path, all of them in one message, and stop a job before any work."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import torch

from raymerge import models, pipeline
from raymerge.data import DatasetError, decode, load_dataset
from raymerge.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size: int = 16) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, list[Path]]:
    """``root/<digit>/*.jpg``: 30 JPEGs, of which one is truncated, plus one that is not an image and one empty."""
    root = tmp_path / "images"
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i in range(3):
            (root / str(label) / f"{i}.jpg").write_bytes(_jpeg(10 * label + i))
    truncated, garbage, empty = root / "3" / "1.jpg", root / "7" / "x.jpeg", root / "9" / "empty.png"
    truncated.write_bytes(_jpeg(31)[:300])
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    empty.write_bytes(b"")
    (root / "5" / "notes.txt").write_text("not an image, and not named like one: skipped")
    return root, [truncated, garbage, empty]


def test_every_unreadable_image_is_named_in_one_error(folder):
    root, bad = folder
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    message = str(err.value)
    assert isinstance(err.value, InputError)
    assert f"image folder {root}: 3 of 32 images cannot be read" in message
    for path in bad:
        assert str(path) in message
    assert message.count("\n  - ") == 3  # the good files are not listed
    assert str(root / "3" / "0.jpg") not in message


def test_readable_folder_loads(folder):
    root, bad = folder
    for path in bad:
        path.unlink()
    (root / "3" / "1.jpg").write_bytes(_jpeg(31))
    ds = load_dataset(root)
    assert len(ds) == 30 and ds.images is None and len(ds.encoded) == 30  # the driver keeps the files encoded
    assert ds.class_names == tuple(str(d) for d in range(10))
    assert list(np.bincount(ds.labels)) == [3] * 10
    # where they are evaluated, decoded pixels are PIL's, byte for byte
    i = ds.names.index(str(root / "7" / "2.jpg"))
    with Image.open(root / "7" / "2.jpg") as ref:
        assert np.array_equal(np.asarray(decode(ds.encoded[i], ds.names[i])), np.asarray(ref.convert("RGB")))


def test_images_of_any_size_are_preprocessed_as_open_clip_does(folder):
    root, bad = folder
    for path in bad:
        path.unlink()
    (root / "3" / "1.jpg").write_bytes(_jpeg(31, size=32))
    ds = load_dataset(root)
    batch = models.prepare_images(ds, "raymerge-tiny-vit")
    assert batch.shape == (30, 3, 16, 16)
    i = ds.names.index(str(root / "3" / "1.jpg"))
    with Image.open(root / "3" / "1.jpg") as img:
        expected = models.image_transform("raymerge-tiny-vit")(img.convert("RGB"))
    assert torch.equal(batch[i], expected)


def test_corrupt_encoded_rows_of_a_parquet_dataset_are_named(tmp_path):
    blobs = [_jpeg(i) for i in range(5)]
    blobs[1], blobs[4] = b"\xff\xd8 not a jpeg", blobs[4][:200]
    table = pa.table({"image": blobs, "label": [0, 1, 0, 1, 0]})
    pq.write_table(table, tmp_path / "enc.parquet")
    with pytest.raises(DatasetError, match=r"enc\.parquet, column 'image': 2 of 5 images cannot be read:\n  - \S+enc\.parquet row 1 .*\n  - \S+enc\.parquet row 4 "):
        load_dataset(tmp_path / "enc.parquet")


def test_eval_job_stops_with_one_message_and_exit_code_2(folder, mini_pool, tmp_path, monkeypatch, capsys):
    root, bad = folder
    pool = tmp_path / "pool"
    shutil.copytree(mini_pool, pool, ignore=shutil.ignore_patterns("results"))
    raw = yaml.safe_load((pool / "experiment.yaml").read_text())
    raw["task_pool"]["digits"]["shifts"]["rotate"] = str(root)
    raw["output_dir"] = str(tmp_path / "out")
    (pool / "experiment.yaml").write_text(yaml.safe_dump(raw))

    def no_work(*args, **kwargs):
        raise AssertionError("Ray or workers were started before the bad input was caught")

    monkeypatch.setattr(pipeline, "connect", no_work)
    monkeypatch.setattr(pipeline, "WorkerPool", no_work)
    spec = importlib.util.spec_from_file_location("eval_job", REPO / "jobs" / "eval.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    assert job.main(["--config", str(pool / "experiment.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("error: ") == 1
    for path in bad:
        assert str(path) in err
    assert not (tmp_path / "out").exists()
