"""The results store: one row per evaluation, keyed by what determines it, in append-only Parquet.

Layout of a results directory::

    rows/part-<n>.parquet       per-set rows (method, params, task, split, accuracy, ...), one file per flush
    samples/<key>.parquet       per-sample outputs of one row (prediction, label, and method extras)
    summary.json                every row in brief, for people and dashboards (rewritten at the end of each run)

Every file is written to a temporary name and renamed into place, so a crash leaves either the old state or the
new one. A part that cannot be read (truncated by a crash that bypassed the rename, edited by hand) is reported
with its path and refused, never silently mixed in; :meth:`ResultStore.repair` moves such parts aside.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_FIELDS = ("key", "experiment", "method", "params", "pool", "task", "split", "accuracy", "n", "seconds", "merges")


class ResultsError(RuntimeError):
    """The results directory holds a file that cannot be trusted; the message names it."""


def row_key(identity: Mapping[str, Any]) -> str:
    """Hash of a row's identity: everything that determines the row (method, parameters, seed, weights, head,
    data, evaluation settings), as canonical JSON."""
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class ResultStore:
    """Append-only, keyed store of evaluation rows under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        self.samples_dir = self.root / "samples"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        # rows by key from the parts read so far: each part is read once, so a sweep's appends stay linear
        self._rows: dict[str, dict[str, Any]] = {}
        self._read: set[Path] = set()

    def _parts(self) -> list[Path]:
        return sorted(self.rows_dir.glob("part-*.parquet"))

    def _read_part(self, part: Path) -> pa.Table:
        try:
            table = pq.read_table(part)
        except (pa.ArrowException, OSError) as err:
            raise ResultsError(
                f"results part {part} is corrupt ({err}); run `python -m raymerge.results repair {self.root}` "
                "to move it aside (its rows will be recomputed)"
            ) from err
        missing = [f for f in ROW_FIELDS if f not in table.column_names]
        if missing:
            raise ResultsError(f"results part {part} lacks columns {missing}: not written by raymerge")
        return table

    def _refresh(self) -> None:
        """Read the parts not read yet (written by this store or by another process)."""
        for part in self._parts():
            if part not in self._read:
                for row in self._read_part(part).to_pylist():
                    self._rows.setdefault(row["key"], row)
                self._read.add(part)

    def rows(self) -> list[dict[str, Any]]:
        """All rows, first write of each key wins (a rerun never duplicates a key)."""
        self._refresh()
        return list(self._rows.values())

    def keys(self) -> set[str]:
        self._refresh()
        return set(self._rows)

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` as one new part; rows whose key is already stored are dropped."""
        done = self.keys()
        fresh = [dict(r) for r in rows if r["key"] not in done]
        if not fresh:
            return
        for r in fresh:
            r["params"] = json.dumps(r["params"], sort_keys=True, default=str) if not isinstance(r["params"], str) else r["params"]
        table = pa.Table.from_pylist([{f: r.get(f) for f in ROW_FIELDS} | r for r in fresh])
        n = len(self._read)
        while (self.rows_dir / f"part-{n:06d}.parquet").exists():
            n += 1
        part = self.rows_dir / f"part-{n:06d}.parquet"
        _atomic_write_table(table, part)
        for row in table.to_pylist():
            self._rows.setdefault(row["key"], row)
        self._read.add(part)

    def write_samples(self, key: str, columns: Mapping[str, np.ndarray]) -> None:
        """Per-sample outputs of row ``key``: equal-length 1-D arrays, or 2-D arrays stored as list columns."""
        arrays = {name: pa.array(list(v) if np.ndim(v) > 1 else v) for name, v in columns.items()}
        _atomic_write_table(pa.table(arrays), self.samples_dir / f"{key}.parquet")

    def samples(self, key: str) -> pa.Table:
        return pq.read_table(self.samples_dir / f"{key}.parquet")

    def write_summary(self) -> None:
        """``summary.json``: every row in brief. Written at the end of a run, not per append (it grows with the rows)."""
        tmp = self.root / ".summary.json.tmp"
        rows = [{k: r[k] for k in ("method", "params", "task", "split", "accuracy", "n")} for r in self.rows()]
        tmp.write_text(json.dumps({"rows": len(rows), "results": rows}, indent=1))
        os.replace(tmp, self.root / "summary.json")

    def repair(self) -> list[Path]:
        """Move unreadable parts to ``rows/corrupt/``; returns what was moved."""
        self._rows.clear()
        self._read.clear()
        moved = []
        for part in self._parts():
            try:
                self._read_part(part)
            except ResultsError:
                target = self.rows_dir / "corrupt" / part.name
                target.parent.mkdir(exist_ok=True)
                os.replace(part, target)
                moved.append(target)
        return moved


def main(argv: list[str] | None = None) -> None:
    """``python -m raymerge.results repair DIR``: move corrupt parts aside so their rows are recomputed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m raymerge.results")
    parser.add_argument("command", choices=["repair"])
    parser.add_argument("results_dir")
    args = parser.parse_args(argv)
    moved = ResultStore(args.results_dir).repair()
    print(f"moved {len(moved)} corrupt part(s) aside" + "".join(f"\n  {m}" for m in moved))


if __name__ == "__main__":
    main()
