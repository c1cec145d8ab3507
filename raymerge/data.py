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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymerge._io import atomic_dir

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
from raymerge.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class DatasetError(InputError):
    """A dataset cannot be read or is unusable (empty, labels out of range); the message names the file."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set: ``labels`` int64 (N,) indexing ``class_names``, and the images either decoded
    (``images``: uint8 (N, H, W) or (N, H, W, C), e.g. the embedded zoo's raw pixels) or ``encoded`` (one JPEG/PNG
    file's bytes per image, named by ``names`` in errors), which are decoded and preprocessed only where they are
    evaluated (:func:`raymerge.models.prepare_images`, on the actors), never on the driver."""

    name: str
    images: np.ndarray | None
    labels: np.ndarray
    class_names: tuple[str, ...]
    split: str = "test"
    source: str = ""
    encoded: tuple[bytes, ...] | None = None
    names: tuple[str, ...] = ()
    _hash: list = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def hash(self) -> str:
        """SHA-256 of the images (pixels, or each encoded file's bytes), labels and class names: part of every row
        key and logit-cache key that reads this set."""
        if not self._hash:
            h = hashlib.sha256()
            if self.encoded is not None:
                for blob in self.encoded:
                    h.update(len(blob).to_bytes(8, "little"))
                    h.update(blob)
            else:
                h.update(str(self.images.shape).encode())
                h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            h.update(json.dumps(list(self.class_names)).encode())
            self._hash.append(h.hexdigest())
        return self._hash[0]

    def subset(self, rows: np.ndarray) -> ImageDataset:
        """Rows ``rows`` (an index array) of this set: what one actor's shard holds."""
        return replace(
            self,
            images=None if self.images is None else self.images[rows],
            labels=self.labels[rows],
            encoded=None if self.encoded is None else tuple(self.encoded[i] for i in rows),
            names=tuple(self.names[i] for i in rows) if self.names else (),
            _hash=[],
        )

    def relabel(self, labels: np.ndarray, class_names: tuple[str, ...]) -> ImageDataset:
        """The same images with ``labels`` indexing ``class_names`` (a class subset's positions)."""
        return replace(self, labels=labels, class_names=class_names, _hash=[])

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
JPEG_END = b"\xff\xd9"


def _unreadable(blob: bytes) -> str | None:
    """Why an encoded image cannot be read, from its header and structure alone (no pixel decoding): Pillow
    identifies the format and ``verify()`` checks what it can without decoding (PNG chunks and CRCs); a JPEG must
    end with its end-of-image marker, which a truncated file lacks. None when it looks whole."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            fmt = img.format
            img.verify()
    except Exception as err:  # noqa: BLE001: Pillow signals damage with many exception types
        return f"{type(err).__name__}: {err}"
    if fmt == "JPEG" and JPEG_END not in blob[-1024:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_encoded(blobs: Sequence[bytes], names: Sequence[str], source: str) -> None:
    """One :class:`DatasetError` listing every image of ``blobs`` that cannot be read (see :func:`_unreadable`)."""
    bad = [f"{name} ({why})" for blob, name in zip(blobs, names) if (why := _unreadable(blob))]
    if bad:
        listed = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(f"{source}: {len(bad)} of {len(blobs)} images cannot be read:\n{listed}{more}")


def decode(blob: bytes, name: str) -> PILImage:
    """An encoded image as an RGB PIL image; :class:`DatasetError` naming it when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001: see _unreadable
        raise DatasetError(f"image {name} cannot be decoded ({type(err).__name__}: {err})") from None


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
    encoded, names = None, ()
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
        images = None
        encoded = tuple(table.column("image").to_pylist())
        names = tuple(f"{path} row {i}" for i in range(table.num_rows))
        check_encoded(encoded, names, f"dataset {path}, column 'image'")
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
        encoded=encoded,
        names=names,
    )


def load_image_folder(root: str | Path, name: str | None = None, split: str = "test") -> ImageDataset:
    """``root/<class>/<image>``, classes in sorted order, images of any size kept encoded (decoded where evaluated).

    Every image is checked before anything is reported, so one :class:`DatasetError` names every unreadable file.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, cls in enumerate(classes)
             for f in sorted((root / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"image folder {root} holds no images under <class>/ subdirectories")
    encoded = tuple(f.read_bytes() for f, _ in files)
    names = tuple(str(f) for f, _ in files)
    check_encoded(encoded, names, f"image folder {root}")
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return ImageDataset(name or root.name, None, labels, tuple(classes), split, str(root), encoded, names)


def load_dataset(path: str | Path, name: str | None = None) -> ImageDataset:
    """Dispatch on what is at ``path``: a ``.parquet`` file, a directory of shards, or an image folder."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_dir() and not any(path.glob("*.parquet")):
        return load_image_folder(path, name)
    return load_parquet(path, name)


def write_parquet(dataset: ImageDataset, path: str | Path, shard_rows: int = 4096) -> None:
    """Write ``dataset`` as a directory of Parquet shards (raw ``pixels``, or the encoded files as ``image``),
    replacing whatever is at ``path`` as a whole (:func:`raymerge._io.atomic_dir`), so a reader never sees half a
    dataset."""
    meta = {"raymerge.class_names": json.dumps(list(dataset.class_names)), "raymerge.split": dataset.split}
    if dataset.encoded is None:
        meta["raymerge.shape"] = json.dumps(list(dataset.images.shape[1:]))
    n = len(dataset)
    with atomic_dir(path) as tmp:
        for i, start in enumerate(range(0, max(n, 1), shard_rows)):
            rows = slice(start, min(start + shard_rows, n))
            if dataset.encoded is None:
                column = {"pixels": pa.array([img.tobytes() for img in dataset.images[rows]], pa.binary())}
            else:
                column = {"image": pa.array(dataset.encoded[rows], pa.binary())}
            table = pa.table({**column, "label": pa.array(dataset.labels[rows], pa.int64())})
            pq.write_table(table.replace_schema_metadata(meta), tmp / f"part-{i:05d}.parquet")


def shard_indices(n: int, num_shards: int, align: int = 1, start: int = 0) -> list[np.ndarray]:
    """Split ``range(n)`` into ``num_shards`` contiguous index arrays whose boundaries are multiples of ``align``,
    as even as whole blocks of ``align`` allow; the s-th piece of the split is element ``(start + s) % num_shards``.

    Aligning shards to the evaluation batch size makes every batch of a sharded run identical to the
    corresponding batch of a single-process run, so their logits agree bit for bit. The first
    ``blocks % num_shards`` pieces hold one block more than the others (a set of fewer blocks than shards leaves
    some empty): ``start`` chooses which shards, so that consecutive sets, given consecutive starts
    (:class:`Sharder`), put their extra blocks on different actors.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    per, extra = divmod(-(-n // align), num_shards)
    edges = np.minimum(np.cumsum([0] + [per + (s < extra) for s in range(num_shards)]) * align, n)
    split = [np.arange(edges[s], edges[s + 1]) for s in range(num_shards)]
    return [split[(i - start) % num_shards] for i in range(num_shards)]


@dataclass
class Sharder:
    """Shards consecutive datasets (:func:`shard_indices`) over ``num_shards`` actors, each starting on the actor
    after the last one that took an extra block of the previous dataset: the sets of one candidate, evaluated at
    once, then share the actors evenly instead of queueing on the first ones."""

    num_shards: int
    align: int = 1
    start: int = 0

    def __call__(self, n: int) -> list[np.ndarray]:
        """The shards (one index array per actor, some maybe empty) of the next dataset, of ``n`` samples."""
        parts = shard_indices(n, self.num_shards, self.align, self.start)
        self.start = (self.start + -(-n // self.align)) % self.num_shards
        return parts
