"""The results store: evaluation rows keyed by everything that determines them, in append-only Parquet.

Layout of a results directory::

    rows/part-<time ns>-<pid>-<random>.parquet   rows (key, method, params, task, split, accuracy, ...), one file per append
    samples/<key>-<uuid>.parquet                 per-sample outputs of one row (prediction, label, method extras)
    summary.json                                 every row in brief, for people and dashboards (written at the end of a run)

Reading yields one row per key: the newest (greatest ``written_at``, nanoseconds since the epoch). A rerun skips
stored keys; ``append(..., replace=True)`` (``--force``) writes the new row, which then supersedes the old one.
Each row names its own samples file (column ``samples``), written under a fresh name before the row, so a row
and its samples always agree, whatever reruns or concurrent writers did.

Every part is created under a name unique to its writer, and exclusively (never replacing a file), so writers
in several processes can append to one directory at once and lose nothing. Files are written through
:mod:`raymerge._io`: a crash leaves either no file or a whole one. A part that cannot be read (damaged outside
raymerge) is refused with its path; :meth:`ResultStore.repair` moves it aside. Parts carry their row format in
their Parquet metadata (``raymerge.format``); a directory holding parts of an older format (whose keys covered
less) is refused, never mixed, until :meth:`ResultStore.migrate` moves those parts aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymerge.errors import InputError
from raymerge._io import atomic_file, write_text

ROW_FIELDS = ("key", "experiment", "method", "params", "pool", "task", "split", "accuracy", "n", "seconds", "merges")
# ROW_FIELDS, then two written by the store itself: when the row was written (ns since the epoch; orders the rows
# of one key) and the name of its samples file in samples/ (null when it has none)
SCHEMA = pa.schema([
    ("key", pa.string()), ("experiment", pa.string()), ("method", pa.string()), ("params", pa.string()),
    ("pool", pa.string()), ("task", pa.string()), ("split", pa.string()), ("accuracy", pa.float64()),
    ("n", pa.int64()), ("seconds", pa.float64()), ("merges", pa.int64()),
    ("written_at", pa.int64()), ("samples", pa.string()),
])
# The row format: bumped whenever what a key covers changes, so rows keyed the old way are never reused.
# 1 (no marker): sha256 of (method, params, pool, task, split). 2: row_key over the full identity mapping.
FORMAT = 2
FORMAT_META = b"raymerge.format"
_KEY = re.compile(r"[0-9a-f]+")
_OLD_SAMPLES = re.compile(r"[0-9a-f]{24}\.parquet")  # format 1 named samples files by their 24-hex key alone


class ResultsError(InputError):
    """The results directory holds a file that cannot be trusted or used; the message names it and what to do."""


_PLAIN = (str, bool, int, float)
Where = tuple  # (parent, dict key or list index): links back to the root, named only when an error needs it


def _named(where: Where | str) -> str:
    parts = []
    while isinstance(where, tuple):
        where, step = where
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return where + "".join(reversed(parts))


def _canonical(value: Any, where: Where | str) -> Any:
    """``value`` as plain JSON types, so equal identities give equal bytes (numpy scalars, tuples, paths)."""
    # exact types first: most values are plain leaves and dicts, and the abstract Mapping check costs ~1 µs
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, (dict, Mapping)):
        return {str(k): _canonical(v, (where, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, (where, i)) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return _canonical(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, _PLAIN):
        return value
    raise TypeError(f"row identity {_named(where)} is a {type(value).__name__}, which has no canonical JSON form")


def row_key(identity: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON (sorted keys, no whitespace) of ``identity``: everything that determines
    a row. Two identities give the same key exactly when they are equal as JSON values."""
    blob = json.dumps(_canonical(identity, "identity"), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _params_json(params: Any) -> str:
    return params if isinstance(params, str) else json.dumps(params, sort_keys=True, default=str)


class ResultStore:
    """Rows under ``root``, one per key (the newest); see the module docstring for the layout and guarantees.

    Constructing a store reads nothing and creates nothing; :meth:`check` reads the directory and raises
    :class:`ResultsError` for anything that cannot be used, so a run can refuse before it starts any work.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        self.samples_dir = self.root / "samples"
        # newest row by key from the parts read so far, and its (written_at, part, index) order: each part is read
        # once, so appends over a sweep stay linear in its rows
        self._rows: dict[str, dict[str, Any]] = {}
        self._order: dict[str, tuple[int, str, int]] = {}
        self._read: set[Path] = set()
        self._newest = 0

    # -- reading --------------------------------------------------------------------------------------------

    def _parts(self) -> list[Path]:
        return sorted(self.rows_dir.glob("part-*.parquet"))

    def _load(self, part: Path) -> pa.Table:
        """The table of ``part``; :class:`ResultsError` if it is unreadable or is not a raymerge rows part."""
        try:
            table = pq.read_table(part)
        except (pa.ArrowException, OSError) as err:
            raise ResultsError(
                f"results part {part} is corrupt ({err}); run `python -m raymerge.results repair {self.root}` "
                "to move it aside (its rows will be recomputed)"
            ) from err
        missing = [f for f in ROW_FIELDS if f not in table.column_names]
        if missing:
            raise ResultsError(f"results part {part} lacks columns {missing}: not written by raymerge; run "
                               f"`python -m raymerge.results repair {self.root}` to move it aside")
        return table

    @staticmethod
    def _format(schema: pa.Schema) -> int:
        """The row format of a part (1 for parts without the marker, written before formats were recorded)."""
        return int((schema.metadata or {}).get(FORMAT_META, b"1"))

    def _old_parts(self) -> list[Path]:
        """Readable rows parts of an older row format (schemas only; unreadable parts are left to repair)."""
        old = []
        for part in self._parts():
            try:
                schema = pq.read_schema(part)
            except (pa.ArrowException, OSError):
                continue
            if self._format(schema) < FORMAT and all(f in schema.names for f in ROW_FIELDS):
                old.append(part)
        return old

    def _refuse_format(self, part: Path, found: int) -> None:
        if found < FORMAT:
            old = self._old_parts()
            raise ResultsError(
                f"results directory {self.root} holds {len(old)} rows part(s) written by an older raymerge (row "
                f"format {found}, e.g. {part}); their keys do not cover everything that determines a row, so they "
                f"cannot be reused or mixed with new rows. Run `python -m raymerge.results migrate {self.root}` "
                f"to move them aside (into {self.rows_dir / f'format-{found}'}; their rows will be recomputed), "
                "or choose a new output_dir"
            )
        raise ResultsError(f"results part {part} has row format {found}, newer than this raymerge's ({FORMAT}): "
                           "upgrade raymerge, or choose a new output_dir")

    def _take(self, row: dict[str, Any], order: tuple[int, str, int]) -> None:
        """Keep ``row`` if it is the newest of its key seen so far."""
        key = row["key"]
        if key not in self._order or order > self._order[key]:
            self._rows[key], self._order[key] = row, order
        self._newest = max(self._newest, order[0])

    def _refresh(self) -> None:
        """Read the parts not read yet (written by this store or by another process)."""
        for part in self._parts():
            if part in self._read:
                continue
            table = self._load(part)
            found = self._format(table.schema)
            if found != FORMAT:
                self._refuse_format(part, found)
            for i, row in enumerate(table.to_pylist()):
                self._take(row, (row["written_at"], part.name, i))
            self._read.add(part)

    def check(self) -> None:
        """Read every part now: :class:`ResultsError` naming the first corrupt, foreign or old-format part.

        Cheap (each part is read once per store and kept); call it before starting anything expensive.
        """
        self._refresh()

    def rows(self) -> list[dict[str, Any]]:
        """One row per key, the newest; each a dict of the :data:`SCHEMA` fields and any extra columns written
        with it (``params`` as a JSON string)."""
        self._refresh()
        return list(self._rows.values())

    def keys(self) -> set[str]:
        self._refresh()
        return set(self._rows)

    def samples(self, key: str) -> pa.Table:
        """The per-sample outputs of row ``key`` (its newest row's file). :class:`KeyError` if no row has that
        key, :class:`FileNotFoundError` if the row has no samples or its file is gone."""
        self._refresh()
        name = self._rows[key].get("samples")
        if not name:
            raise FileNotFoundError(f"results row {key} in {self.root} has no per-sample file")
        return pq.read_table(self.samples_dir / name)

    # -- writing --------------------------------------------------------------------------------------------

    def _write_samples(self, key: str, columns: Mapping[str, np.ndarray]) -> str:
        """Write per-sample outputs (equal-length 1-D arrays, or (N, M) arrays stored as fixed-size list columns)
        under a fresh name; returns the name."""
        # a fixed-size list column wraps the flat values as they are: half the driver's time of a list built row by row
        arrays = {name: pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(v)), np.shape(v)[1]) if np.ndim(v) > 1
                  else pa.array(v) for name, v in columns.items()}
        name = f"{key}-{uuid.uuid4().hex}.parquet"
        # dictionary encoding pays for class indices and flags only: on float columns (entropies, coefficients: all
        # distinct) Parquet builds a dictionary, finds it too big and falls back, 5× the write time of plain pages
        dictionary = [n for n, v in columns.items() if not np.issubdtype(np.asarray(v).dtype, np.floating)]
        with atomic_file(self.samples_dir / name, exclusive=True) as tmp:
            pq.write_table(pa.table(arrays), tmp, use_dictionary=dictionary)
        return name

    def append(self, rows: Sequence[Mapping[str, Any]], samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
               replace: bool = False) -> int:
        """Write ``rows`` (dicts with at least :data:`ROW_FIELDS`) as one new part; returns how many were written.

        ``samples`` maps a row's key to its per-sample columns (see :meth:`_write_samples`), written before the
        part and named in the row. Without ``replace``, rows whose key is already stored are dropped (a rerun
        never duplicates a key); with it (``--force``) every row is written and supersedes the stored one.
        Within ``rows`` the last row of a key wins.
        """
        samples = samples or {}
        for r in rows:
            if not isinstance(r.get("key"), str) or not _KEY.fullmatch(r["key"]):
                raise ValueError(f"results row key {r.get('key')!r} is not a row_key() hex digest")
        unknown = set(samples) - {r["key"] for r in rows}
        if unknown:
            raise ValueError(f"samples given for keys without a row: {sorted(unknown)}")
        missing = [f for f in ROW_FIELDS if any(f not in r for r in rows)]
        if missing:
            raise ValueError(f"results rows lack fields {missing}")
        self._refresh()  # also with replace: the new rows must be newer than every stored one
        stored = set() if replace else set(self._rows)
        fresh = {r["key"]: dict(r) for r in rows if r["key"] not in stored}
        if not fresh:
            return 0
        # strictly after every row read so far, even if the clock stepped back: a replacement always wins
        written_at = max(time.time_ns(), self._newest + 1)
        for key, r in fresh.items():
            r["params"] = _params_json(r["params"])
            r["written_at"] = written_at
            if key in samples:
                r["samples"] = self._write_samples(key, samples[key])
        extra = sorted({c for r in fresh.values() for c in r} - set(SCHEMA.names))
        table = pa.Table.from_pylist(list(fresh.values()), schema=SCHEMA)
        for name in extra:
            table = table.append_column(name, pa.array([r.get(name) for r in fresh.values()]))
        table = table.replace_schema_metadata({FORMAT_META: str(FORMAT).encode()})
        part = self.rows_dir / f"part-{written_at:020d}-{os.getpid()}-{secrets.token_hex(4)}.parquet"
        with atomic_file(part, exclusive=True) as tmp:
            pq.write_table(table, tmp)
        for i, row in enumerate(table.to_pylist()):
            self._take(row, (written_at, part.name, i))
        self._read.add(part)
        return len(fresh)

    def write_current(self, experiment: str, job: str, keys: Iterable[str]) -> None:
        """Record the row keys the last ``job`` (``eval``, ``sweep``) of ``experiment`` planned, stored or computed:
        what its tables and report show, so that rows an input change superseded are left out of them even when a
        later run reuses older rows (a seed changed, then changed back)."""
        write_text(self.root / "current" / f"{experiment}.{job}.json", json.dumps(sorted(keys)))

    def current(self) -> dict[str, set[str]]:
        """The row keys each experiment's last runs planned (:meth:`write_current`), by experiment."""
        out: dict[str, set[str]] = {}
        for path in sorted((self.root / "current").glob("*.json")):
            experiment = path.name.rsplit(".", 2)[0]
            out.setdefault(experiment, set()).update(json.loads(path.read_text()))
        return out

    def write_summary(self) -> None:
        """``summary.json``: every row in brief. Written at the end of a run, not per append (it grows with the rows)."""
        rows = [{k: r[k] for k in ("method", "params", "task", "split", "accuracy", "n")} for r in self.rows()]
        write_text(self.root / "summary.json", json.dumps({"rows": len(rows), "results": rows}, indent=1))

    # -- maintenance (run while no run writes to the directory) ---------------------------------------------

    def _reset(self) -> None:
        self._rows.clear()
        self._order.clear()
        self._read.clear()

    def _move_aside(self, paths: Sequence[Path], folder: Path) -> list[Path]:
        moved = []
        for path in paths:
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(path, folder / path.name)
            moved.append(folder / path.name)
        return moved

    def repair(self) -> list[Path]:
        """Move unreadable and foreign parts to ``rows/corrupt/`` (their rows will be recomputed) and delete the
        samples files of superseded rows; returns the parts moved. Parts of an older row format are left to
        :meth:`migrate`."""
        self._reset()
        bad = []
        for part in self._parts():
            try:
                self._load(part)
            except ResultsError:
                bad.append(part)
        moved = self._move_aside(bad, self.rows_dir / "corrupt")
        if not self._old_parts():
            # a samples file named by a row that is not its key's newest is never read again; unnamed files are
            # left alone (a writer may be about to name one)
            superseded = {r["samples"] for p in self._parts() for r in pq.read_table(p, columns=["samples"]).to_pylist()}
            self._refresh()
            for name in superseded - {r.get("samples") for r in self._rows.values()} - {None}:
                (self.samples_dir / name).unlink(missing_ok=True)
        self._reset()
        return moved

    def migrate(self) -> list[Path]:
        """Move the parts of older row formats, and format 1's samples files, into ``format-<n>/`` folders beside
        them (kept for inspection, never read again); their rows will be recomputed. Returns the parts moved."""
        self._reset()
        moved = []
        for part in self._old_parts():
            moved += self._move_aside([part], self.rows_dir / f"format-{self._format(pq.read_schema(part))}")
        if moved and self.samples_dir.is_dir():
            old_samples = [p for p in self.samples_dir.glob("*.parquet") if _OLD_SAMPLES.fullmatch(p.name)]
            self._move_aside(old_samples, self.samples_dir / "format-1")
        return moved


def main(argv: list[str] | None = None) -> None:
    """``python -m raymerge.results {repair,migrate} DIR`` (while no run writes to DIR)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m raymerge.results")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("repair", help="move corrupt parts aside (their rows are recomputed); delete superseded samples"
                   ).add_argument("results_dir")
    sub.add_parser("migrate", help="move parts of an older row format aside (their rows are recomputed)"
                   ).add_argument("results_dir")
    args = parser.parse_args(argv)
    store = ResultStore(args.results_dir)
    if args.command == "repair":
        moved = store.repair()
        print(f"moved {len(moved)} corrupt part(s) aside" + "".join(f"\n  {m}" for m in moved))
    else:
        moved = store.migrate()
        print(f"moved {len(moved)} part(s) of an older row format aside" + "".join(f"\n  {m}" for m in moved))


if __name__ == "__main__":
    main()
