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
from collections.abc import Mapping, Sequence
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

MAX_GROUPS = 2048  # groups of datasets evaluated together that spread_extra_blocks balances (~5 s on one core)
SEARCH_BUDGET = 2**25  # G·D·S² of spread_extra_blocks' tries: 64 tries for 16 actors and 8 tasks' 247 subsets
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


def shard_indices(n: int, num_shards: int, align: int = 1, extra_on: Sequence[int] | np.ndarray | None = None
                  ) -> list[np.ndarray]:
    """Split ``range(n)`` into ``num_shards`` contiguous index arrays, one per shard in order, whose boundaries are
    multiples of ``align``, as even as whole blocks of ``align`` allow.

    Aligning shards to the evaluation batch size makes every batch of a sharded run identical to the
    corresponding batch of a single-process run, so their logits agree bit for bit, whichever shard holds it. Every
    shard holds ``blocks // num_shards`` blocks and the shards in ``extra_on`` (``blocks % num_shards`` of them,
    default the first ones) one block more; a set of fewer blocks than shards leaves the others empty.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    per, extra = divmod(-(-n // align), num_shards)
    on = np.arange(extra) if extra_on is None else np.unique(np.asarray(extra_on, dtype=np.int64))
    if len(on) != extra or (extra and not 0 <= on[0] <= on[-1] < num_shards):
        raise ValueError(f"{n} samples in blocks of {align} over {num_shards} shards leave {extra} extra blocks, "
                         f"one each on {extra} distinct shards, not on {[] if extra_on is None else list(extra_on)}")
    counts = np.full(num_shards, per)
    counts[on] += 1
    edges = np.minimum(np.concatenate([[0], np.cumsum(counts)]) * align, n)
    return [np.arange(edges[s], edges[s + 1]) for s in range(num_shards)]


def spread_extra_blocks(extra: np.ndarray, together: np.ndarray, tries: int = 64, seed: int = 0) -> np.ndarray:
    """Move datasets' extra blocks between shards so that the groups of datasets evaluated together are balanced.

    ``extra`` (D, S) bool: dataset d's extra block lies on shard s (see :func:`shard_indices`); ``together`` (G, D):
    how many times group g's call evaluates dataset d. A call takes as long as its busiest shard, and every shard
    holds the same whole blocks of each dataset but for the extras, so a group's cost above its even share is its
    shards' largest count of extra blocks; their sum over groups is what this lowers. Iterated local search from
    ``extra``: descend by single moves (:func:`_descend`), then ``tries`` times re-place two datasets' extras at
    random (seeded) and descend again, keeping the result unless it is worse; fewer tries where G·D·S² exceeds
    :data:`SEARCH_BUDGET` / ``tries``. Of more than :data:`MAX_GROUPS` groups, an evenly spaced sample is balanced
    (all 16,383 subsets of 14 tasks would take ~40 s on one core).
    Returns the (D, S) placement; each dataset keeps its number of extra blocks. The placement decides only which
    actor evaluates a batch, never the batch, so it changes no result.
    """
    weight = np.asarray(together, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if len(weight) > MAX_GROUPS:  # a thinned, evenly spaced sample of the groups: the search's time is linear in G
        weight = weight[np.linspace(0, len(weight) - 1, MAX_GROUPS).astype(np.int64)]
    # a descent weighs G·S² moves per dataset: past 16 actors and 247 groups of 8, fewer tries (from the sizes
    # alone, so the placement stays the same run to run)
    tries = min(tries, SEARCH_BUDGET // max(1, weight.size * extra.shape[1] ** 2))
    best = _descend(extra, weight)
    cost = (weight @ best).max(axis=1).sum()
    movable = np.flatnonzero(best.any(axis=1) & ~best.all(axis=1) & weight.any(axis=0))
    for _ in range(tries if len(movable) else 0):
        trial = best.copy()
        for d in rng.choice(movable, min(2, len(movable)), replace=False):
            trial[d] = np.isin(np.arange(trial.shape[1]), rng.choice(trial.shape[1], trial[d].sum(), replace=False))
        trial = _descend(trial, weight)
        trial_cost = (weight @ trial).max(axis=1).sum()
        if trial_cost <= cost:
            best, cost = trial, trial_cost
    return best


def _descend(extra: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Local search for :func:`spread_extra_blocks`: make the move of one extra block to another shard that lowers
    the sum over groups of their largest count most (ties: the sum of squared counts, a smoother measure of the
    same balance) until none lowers it."""
    extra = extra.copy()
    load = weight @ extra  # (G, S): extra blocks each group's call puts on each shard
    while True:
        best = (0, 0, None)
        for d in np.flatnonzero(extra.any(axis=1) & ~extra.all(axis=1)):
            c = weight[:, d]
            groups = np.flatnonzero(c)
            if not len(groups):
                continue
            cg, lg = c[groups, None, None], load[groups]
            src, dst = np.flatnonzero(extra[d]), np.flatnonzero(~extra[d])
            # every move src -> dst at once, (g, src, dst): the loads of the two shards after it, and the largest of
            # the others (the first of the top three loads that is neither's)
            a, b = lg[:, src, None], lg[:, None, dst]
            top = np.sort(np.pad(lg, ((0, 0), (2, 0)), constant_values=-1), axis=1)  # padded: S may be under 3
            top1, top2, top3 = top[:, -1, None, None], top[:, -2, None, None], top[:, -3, None, None]
            rest = np.where((a == top1) | (b == top1),
                            np.where(((a == top1) & (b == top2)) | ((b == top1) & (a == top2)), top3, top2), top1)
            gain_max = (np.maximum(rest, np.maximum(a - cg, b + cg)) - top1).sum(axis=0)
            gain_sq = (2 * cg * (b - a + cg)).sum(axis=0)
            i, j = np.unravel_index(np.lexsort((gain_sq.ravel(), gain_max.ravel()))[0], gain_max.shape)
            if (gain_max[i, j], gain_sq[i, j]) < best[:2]:
                best = (gain_max[i, j], gain_sq[i, j], (d, src[i], dst[j]))
        if best[2] is None:
            return extra
        d, s, t = best[2]
        extra[d, s], extra[d, t] = False, True
        load[:, s] -= weight[:, d]
        load[:, t] += weight[:, d]


@dataclass
class Sharder:
    """Shards datasets (:func:`shard_indices`) over ``num_shards`` actors. Each dataset's extra blocks start on the
    actor after the last one that took an extra block of the dataset before it, so the datasets registered together
    share the actors evenly; given the groups of datasets that are evaluated together (a sweep's subsets), the
    extras are then spread so that each group is balanced too (:func:`spread_extra_blocks`)."""

    num_shards: int
    align: int = 1
    start: int = 0

    def __call__(self, sizes: Mapping[str, int], together: Sequence[Sequence[str]] = ()) -> dict[str, list[np.ndarray]]:
        """The shards (one index array per actor, some maybe empty) of each dataset of ``sizes`` (name: samples),
        ``together`` listing groups of their names evaluated at once."""
        names = list(sizes)
        extra = np.zeros((len(names), self.num_shards), dtype=bool)
        for d, name in enumerate(names):
            blocks = -(-sizes[name] // self.align)
            extra[d, (self.start + np.arange(blocks % self.num_shards)) % self.num_shards] = True
            self.start = (self.start + blocks) % self.num_shards
        if together:
            index = {name: d for d, name in enumerate(names)}
            counts = np.zeros((len(together), len(names)), dtype=np.int64)
            for g, group in enumerate(together):
                for name in group:
                    counts[g, index[name]] += 1
            extra = spread_extra_blocks(extra, counts)
        return {name: shard_indices(sizes[name], self.num_shards, self.align, np.flatnonzero(extra[d]))
                for d, name in enumerate(names)}
