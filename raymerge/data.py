"""Image classification datasets: Parquet shards or image folders in, uint8 arrays and int labels out.

Parquet layout (what the embedded zoo writes, and what a user's own data can use):
- columns ``label`` (int64) and either ``pixels`` (raw uint8 bytes of one image, shape in the metadata) or
  ``image`` (an encoded PNG/JPEG per row);
- schema metadata ``raymerge.class_names`` (JSON list), ``raymerge.split``, and for ``pixels`` ``raymerge.shape``
  (JSON ``[H, W]`` or ``[H, W, C]``).
A dataset is one ``.parquet`` file or a directory of ``*.parquet`` shards read in sorted order.
An image folder is ``root/<class name>/<image files>``, classes in sorted order.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymerge._io import atomic_dir
from raymerge.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class DatasetError(InputError):
    """A dataset cannot be read or is unusable (empty, labels out of range); the message names the file."""


@dataclass(frozen=True)
class ImageDataset:
    """``images`` uint8 (N, H, W) or (N, H, W, C); ``labels`` int64 (N,) indexing ``class_names``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    split: str = "test"
    source: str = ""
    _hash: list = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def hash(self) -> str:
        """SHA-256 of pixels, labels and class names: the dataset half of the logits cache key."""
        if not self._hash:
            h = hashlib.sha256()
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            h.update(json.dumps(list(self.class_names)).encode())
            self._hash.append(h.hexdigest())
        return self._hash[0]

    def check_labels(self, num_classes: int, head_source: str) -> None:
        """Raise :class:`DatasetError` if a label cannot index a head with ``num_classes`` outputs."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise DatasetError(
                f"dataset {self.source or self.name}: label {int(self.labels[i])} at row {i} is out of range "
                f"for head {head_source} with {num_classes} classes ({bad.size} such rows)"
            )


# How many unreadable images one error message lists by name; the count is always complete.
MAX_LISTED = 20


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img, dtype=np.uint8)


def _read_images(items: list, read: Callable[[Any], np.ndarray], names: list[str], source: str) -> np.ndarray:
    """``read`` every item and stack the images (N, H, W[, C]); ``names[i]`` names item i in errors.

    Every item is tried before anything is reported: one :class:`DatasetError` lists all unreadable images,
    or every image size found with an example of each. Pillow signals a damaged file with many exception
    types (OSError, SyntaxError, ValueError, struct.error, EOFError, ...) depending on the format and where
    the damage is, hence the broad ``except``: any failure to decode one image means that image is unreadable,
    and the user needs its name, not Pillow's stack.
    """
    images, bad = [], []
    for item, name in zip(items, names):
        try:
            images.append(read(item))
        except Exception as err:  # noqa: BLE001 (see docstring)
            bad.append(f"{name} ({type(err).__name__}: {err})")
    if bad:
        listed = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(f"{source}: {len(bad)} of {len(items)} images cannot be read:\n{listed}{more}")
    sizes: dict[tuple[int, ...], list[str]] = {}
    for im, name in zip(images, names):
        sizes.setdefault(im.shape, []).append(name)
    if len(sizes) > 1:
        found = "; ".join(f"{'x'.join(map(str, shape))}: {len(ns)} (e.g. {ns[0]})" for shape, ns in sizes.items())
        raise DatasetError(f"{source} mixes image sizes ({found}); resize them to one size first")
    return np.stack(images)


def _read_table(path: Path) -> pa.Table:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"dataset directory {path} has no .parquet files")
    try:
        tables = [pq.read_table(f) for f in files]
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"dataset {path} cannot be read as Parquet: {err}") from err
    first = tables[0].schema.metadata or {}
    for f, t in zip(files[1:], tables[1:]):
        if (t.schema.metadata or {}).get(b"raymerge.class_names") != first.get(b"raymerge.class_names"):
            raise DatasetError(f"dataset shard {f} lists other class names than {files[0]}")
    return pa.concat_tables(tables)


def load_parquet(path: str | Path, name: str | None = None) -> ImageDataset:
    """Read a Parquet dataset (file or directory of shards) into memory."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    table = _read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "label" not in table.column_names:
        raise DatasetError(f"dataset {path} has no 'label' column (columns: {table.column_names})")
    if table.num_rows == 0:
        raise DatasetError(f"dataset {path} is empty")
    labels = table.column("label").to_numpy().astype(np.int64)
    if "pixels" in table.column_names:
        if "raymerge.shape" not in meta:
            raise DatasetError(f"dataset {path} has a 'pixels' column but no 'raymerge.shape' metadata")
        shape = tuple(json.loads(meta["raymerge.shape"]))
        raw = b"".join(table.column("pixels").to_pylist())
        images = np.frombuffer(raw, dtype=np.uint8)
        if images.size != table.num_rows * int(np.prod(shape)):
            raise DatasetError(f"dataset {path}: 'pixels' bytes do not match shape {list(shape)} per row")
        images = images.reshape((table.num_rows, *shape))
    elif "image" in table.column_names:
        images = _read_images(table.column("image").to_pylist(), _decode, [f"row {i}" for i in range(table.num_rows)],
                              f"dataset {path}, column 'image'")
    else:
        raise DatasetError(f"dataset {path} needs a 'pixels' or 'image' column (columns: {table.column_names})")
    if "raymerge.class_names" in meta:
        class_names = tuple(json.loads(meta["raymerge.class_names"]))
    else:
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    return ImageDataset(
        name=name or path.stem,
        images=images,
        labels=labels,
        class_names=class_names,
        split=meta.get("raymerge.split", "test"),
        source=str(path),
    )


def _read_image_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image_folder(root: str | Path, name: str | None = None, split: str = "test") -> ImageDataset:
    """Read ``root/<class>/<image>`` into memory; all images must share one size.

    Every image is read before anything is reported, so one :class:`DatasetError` names every unreadable file.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, cls in enumerate(classes)
             for f in sorted((root / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"image folder {root} holds no images under <class>/ subdirectories")
    paths = [f for f, _ in files]
    images = _read_images(paths, _read_image_file, [str(f) for f in paths], f"image folder {root}")
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return ImageDataset(name or root.name, images, labels, tuple(classes), split, str(root))


def load_dataset(path: str | Path, name: str | None = None) -> ImageDataset:
    """Dispatch on what is at ``path``: a ``.parquet`` file, a directory of shards, or an image folder."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_dir() and not any(path.glob("*.parquet")):
        return load_image_folder(path, name)
    return load_parquet(path, name)


def write_parquet(dataset: ImageDataset, path: str | Path, shard_rows: int = 4096) -> None:
    """Write ``dataset`` as a directory of Parquet shards (raw ``pixels``), replacing whatever is at ``path`` as a
    whole (:func:`raymerge._io.atomic_dir`), so a reader never sees half a dataset."""
    meta = {
        "raymerge.class_names": json.dumps(list(dataset.class_names)),
        "raymerge.split": dataset.split,
        "raymerge.shape": json.dumps(list(dataset.images.shape[1:])),
    }
    n = len(dataset)
    with atomic_dir(path) as tmp:
        for i, start in enumerate(range(0, max(n, 1), shard_rows)):
            rows = slice(start, min(start + shard_rows, n))
            pixels = [img.tobytes() for img in dataset.images[rows]]
            table = pa.table({"pixels": pa.array(pixels, pa.binary()), "label": pa.array(dataset.labels[rows], pa.int64())})
            pq.write_table(table.replace_schema_metadata(meta), tmp / f"part-{i:05d}.parquet")


def shard_indices(n: int, num_shards: int, align: int = 1) -> list[np.ndarray]:
    """Split ``range(n)`` into ``num_shards`` contiguous index arrays whose boundaries are multiples of ``align``.

    Aligning shards to the evaluation batch size makes every batch of a sharded run identical to the
    corresponding batch of a single-process run, so their logits agree bit for bit. Trailing shards may be empty.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    blocks = -(-n // align)
    per = -(-blocks // num_shards)
    return [np.arange(min(s * per * align, n), min((s + 1) * per * align, n)) for s in range(num_shards)]
