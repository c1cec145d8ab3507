"""The results store: one row per key (the newest), --force replaces, samples always match their row, concurrent
writers lose nothing, corrupt and old-format parts are refused by name and can be repaired or migrated."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymerge.results import FORMAT, ResultsError, ResultStore, main, row_key

N = 20  # samples per row


def _key(method: str, split: str) -> str:
    return row_key({"method": method, "params": {"lam": 0.5}, "task": "digits", "split": split})


def _row(method: str, split: str, acc: float) -> dict:
    return {"key": _key(method, split), "experiment": "e", "method": method, "params": {"lam": 0.5}, "pool": "pool",
            "task": "digits", "split": split, "accuracy": acc, "n": N, "seconds": 1.0, "merges": 1}


def _samples(acc: float) -> dict[str, np.ndarray]:
    """Per-sample columns whose accuracy is ``acc`` (a multiple of 1/N)."""
    right = round(acc * N)
    return {"prediction": np.r_[np.zeros(right, np.int64), np.ones(N - right, np.int64)], "label": np.zeros(N, np.int64)}


def _raw_rows(root: Path) -> int:
    return sum(pq.read_table(p).num_rows for p in (root / "rows").glob("part-*.parquet"))


def _consistent(store: ResultStore) -> None:
    """Every row's samples file gives that row's accuracy."""
    for r in store.rows():
        s = store.samples(r["key"]).to_pydict()
        assert np.mean(np.equal(s["prediction"], s["label"])) == pytest.approx(r["accuracy"]), r


def test_matrix_columns_read_back_as_written(tmp_path):
    from raymerge.report import _column_array

    rng = np.random.default_rng(0)
    columns = {"coefficients": rng.random((N, 3)), "candidate_correct": rng.random((N, 3)) > 0.5,
               "component": rng.integers(0, 4, N)}
    store = ResultStore(tmp_path)
    row = _row("a", "test", 0.5)
    store.append([row], samples={row["key"]: columns})
    table = ResultStore(tmp_path).samples(row["key"])
    for name, values in columns.items():
        got = _column_array(table, name)
        assert got.dtype == values.dtype and np.array_equal(got, values), name
    # what a user reading the file with pyarrow alone sees: one list of M values per sample
    assert table.column("coefficients").to_pylist()[7] == columns["coefficients"][7].tolist()


def test_a_row_identity_without_json_form_is_named_where_it_is():
    with pytest.raises(TypeError, match=r"row identity identity\.params\.lams\[1\] is a object"):
        row_key({"method": "m", "params": {"lams": [0.5, object()]}})


def test_row_key_is_sha256_of_canonical_json():
    identity = {"method": "wise_ft", "params": {"lam": 0.5, "models": ["a", "b"]}, "seed": 3}
    # written out by hand: sorted keys, no whitespace
    reference = hashlib.sha256(b'{"method":"wise_ft","params":{"lam":0.5,"models":["a","b"]},"seed":3}').hexdigest()
    assert row_key(identity) == reference
    # equal values in other spellings give the same key: key order, tuples, numpy scalars, paths
    assert row_key({"seed": np.int64(3), "params": {"models": ("a", "b"), "lam": np.float64(0.5)}, "method": "wise_ft"}) == reference
    assert row_key({"p": Path("/x/y")}) == row_key({"p": "/x/y"})
    changed = [identity | {"seed": 4}, identity | {"method": "ties"}, identity | {"params": {"lam": 0.6, "models": ["a", "b"]}},
               identity | {"params": {"lam": 0.5, "models": ["b", "a"]}}, identity | {"head": "abc"}]
    assert len({row_key(i) for i in changed} | {reference}) == len(changed) + 1
    with pytest.raises(TypeError, match=r"identity\.x is a object"):
        row_key({"x": object()})


def test_append_skips_stored_keys_and_summary(tmp_path):
    store = ResultStore(tmp_path)
    assert store.append([_row("a", "test", 0.5), _row("a", "rotate", 0.25)]) == 2
    assert store.append([_row("a", "test", 0.95), _row("b", "test", 0.75)]) == 1  # the first key is already stored
    rows = {(r["method"], r["split"]): r["accuracy"] for r in store.rows()}
    assert rows == {("a", "test"): 0.5, ("a", "rotate"): 0.25, ("b", "test"): 0.75}
    assert len(list((tmp_path / "rows").glob("part-*.parquet"))) == 2 and _raw_rows(tmp_path) == 3
    assert len(ResultStore(tmp_path).rows()) == 3  # a fresh reader sees exactly what this one wrote
    for part in (tmp_path / "rows").glob("part-*.parquet"):
        assert pq.read_schema(part).metadata[b"raymerge.format"] == str(FORMAT).encode()
    store.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == 3
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_force_replaces_rows_and_their_samples(tmp_path):
    store = ResultStore(tmp_path)
    first = [_row("a", "test", 0.5), _row("a", "rotate", 0.25)]
    store.append(first, samples={r["key"]: _samples(r["accuracy"]) for r in first})
    again = [_row("a", "test", 0.9), _row("a", "rotate", 0.6)]
    # without --force the stored rows stand, and no samples file is written for the dropped rows
    assert store.append(again, samples={r["key"]: _samples(r["accuracy"]) for r in again}) == 0
    assert len(list((tmp_path / "samples").iterdir())) == 2
    # --force: the new rows supersede the old ones, each naming its own new samples file
    assert store.append(again, samples={r["key"]: _samples(r["accuracy"]) for r in again}, replace=True) == 2
    for reader in (store, ResultStore(tmp_path)):
        assert sorted((r["split"], r["accuracy"]) for r in reader.rows()) == [("rotate", 0.6), ("test", 0.9)]
        _consistent(reader)
    assert _raw_rows(tmp_path) == 4  # append-only: the old rows stay on disk, superseded
    # a rerun without --force now skips the replaced keys
    assert store.append([_row("a", "test", 0.1)]) == 0
    assert ResultStore(tmp_path).samples(_key("a", "test")).num_rows == N


def test_newest_row_wins_by_write_time_not_by_part_name(tmp_path):
    """A writer that started earlier may finish later: its part sorts later but holds the older row."""
    rows = tmp_path / "rows"
    rows.mkdir(parents=True)
    meta = {b"raymerge.format": str(FORMAT).encode()}
    # the newest is neither the first part in name order nor the last
    for name, written_at, acc in (("part-0.parquet", 100, 0.25), ("part-1.parquet", 200, 0.75), ("part-2.parquet", 150, 0.5)):
        row = _row("a", "test", acc) | {"params": "{}", "written_at": written_at, "samples": None}
        pq.write_table(pa.Table.from_pylist([row]).replace_schema_metadata(meta), rows / name)
    store = ResultStore(tmp_path)
    assert [r["accuracy"] for r in store.rows()] == [0.75]
    store.append([_row("a", "test", 0.125)], replace=True)  # later than every stored row, whatever the clock says
    assert [r["accuracy"] for r in ResultStore(tmp_path).rows()] == [0.125]


def _writer(root: str, writer: int, appends: int, start) -> None:
    store = ResultStore(root)
    start.wait()
    for i in range(appends):
        # two rows of its own per append, and one key that both writers write (with replace, as --force does)
        own = [_row(f"w{writer}", f"s{i}-{j}", (writer + 1) / 4) for j in range(2)]
        shared = _row("shared", f"s{i}", (writer + 1) / 4)
        store.append(own, samples={r["key"]: _samples(r["accuracy"]) for r in own})
        store.append([shared], samples={shared["key"]: _samples(shared["accuracy"])}, replace=True)


def test_two_writer_processes_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    appends = 60
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, appends, start)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = ResultStore(tmp_path)
    rows = store.rows()
    own = {(r["method"], r["split"]) for r in rows if r["method"] != "shared"}
    assert own == {(f"w{w}", f"s{i}-{j}") for w in range(2) for i in range(appends) for j in range(2)}
    assert {r["split"] for r in rows if r["method"] == "shared"} == {f"s{i}" for i in range(appends)}
    assert len(list((tmp_path / "rows").glob("part-*.parquet"))) == 2 * 2 * appends  # every part survived
    assert _raw_rows(tmp_path) == 2 * 3 * appends
    _consistent(store)  # the shared keys' newest rows name their own writer's samples


def _old_format_dir(root: Path) -> tuple[Path, Path]:
    """A results directory as raymerge wrote it before row formats were recorded."""
    (root / "rows").mkdir(parents=True)
    (root / "samples").mkdir()
    old_key = "0123456789abcdef01234567"
    part = root / "rows" / "part-000000.parquet"
    pq.write_table(pa.Table.from_pylist([{f: v for f, v in _row("a", "test", 0.5).items()} | {"key": old_key, "params": "{}"}]), part)
    samples = root / "samples" / f"{old_key}.parquet"
    pq.write_table(pa.table({"prediction": [0]}), samples)
    return part, samples


def test_old_format_directory_is_refused_then_migrated(tmp_path, capsys):
    part, samples = _old_format_dir(tmp_path)
    store = ResultStore(tmp_path)
    message = (rf"results directory {tmp_path} holds 1 rows part\(s\) written by an older raymerge \(row format 1, "
               rf"e\.g\. {part}\).*python -m raymerge\.results migrate {tmp_path}.*or choose a new output_dir")
    with pytest.raises(ResultsError, match=message):
        store.check()
    with pytest.raises(ResultsError, match=message):
        store.append([_row("b", "test", 0.5)])  # nothing is mixed in
    assert _raw_rows(tmp_path) == 1
    main(["migrate", str(tmp_path)])
    assert "moved 1 part(s) of an older row format aside" in capsys.readouterr().out
    assert (tmp_path / "rows" / "format-1" / part.name).is_file()
    assert (tmp_path / "samples" / "format-1" / samples.name).is_file() and not samples.exists()
    store = ResultStore(tmp_path)
    store.check()
    assert store.rows() == []
    store.append([_row("a", "test", 0.75)])
    assert [r["accuracy"] for r in ResultStore(tmp_path).rows()] == [0.75]


def test_newer_format_is_refused(tmp_path):
    (tmp_path / "rows").mkdir()
    row = _row("a", "test", 0.5) | {"params": "{}", "written_at": 1, "samples": None}
    part = tmp_path / "rows" / "part-x.parquet"
    pq.write_table(pa.Table.from_pylist([row]).replace_schema_metadata({b"raymerge.format": b"99"}), part)
    with pytest.raises(ResultsError, match=rf"results part {part} has row format 99, newer than this raymerge's"):
        ResultStore(tmp_path).check()
    assert ResultStore(tmp_path).migrate() == [] and part.exists()  # migrate never touches newer parts


def test_a_missing_directory_is_an_empty_store_and_is_not_created(tmp_path):
    store = ResultStore(tmp_path / "nothing")
    store.check()
    assert store.rows() == [] and not (tmp_path / "nothing").exists()


def test_samples_roundtrip_with_2d_columns(tmp_path):
    store = ResultStore(tmp_path)
    coeffs = np.array([[0.25, 0.75], [0.5, 0.5]])
    row = _row("a", "test", 0.5)
    store.append([row], samples={row["key"]: {"prediction": np.array([1, 0]), "coefficients": coeffs}})
    table = ResultStore(tmp_path).samples(row["key"]).to_pydict()
    assert table["prediction"] == [1, 0] and np.allclose(table["coefficients"], coeffs)
    store.append([_row("b", "test", 0.5)])
    with pytest.raises(FileNotFoundError, match="has no per-sample file"):
        store.samples(_key("b", "test"))


def test_bad_rows_are_refused_before_anything_is_written(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match="not a row_key"):
        store.append([_row("a", "test", 0.5) | {"key": "../escape"}])
    with pytest.raises(ValueError, match=r"lack fields \['accuracy'\]"):
        store.append([{k: v for k, v in _row("a", "test", 0.5).items() if k != "accuracy"}])
    with pytest.raises(ValueError, match="samples given for keys without a row"):
        store.append([_row("a", "test", 0.5)], samples={_key("b", "test"): _samples(0.5)})
    assert not tmp_path.joinpath("rows").exists() or not list(tmp_path.joinpath("rows").iterdir())


def test_corrupt_part_is_refused_then_repaired(tmp_path, capsys):
    store = ResultStore(tmp_path)
    store.append([_row("a", "test", 0.5)])
    store.append([_row("b", "test", 0.75)])
    part = sorted((tmp_path / "rows").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:40])  # damaged outside raymerge
    restarted = ResultStore(tmp_path)  # the run after the damage opens the directory afresh
    with pytest.raises(ResultsError, match=rf"results part {part} is corrupt.*raymerge.results repair"):
        restarted.check()
    main(["repair", str(tmp_path)])
    assert "moved 1 corrupt part(s) aside" in capsys.readouterr().out
    assert [r["method"] for r in ResultStore(tmp_path).rows()] == ["a"]  # row b is missing: a rerun recomputes it
    assert (tmp_path / "rows" / "corrupt" / part.name).exists()


def test_repair_deletes_only_superseded_samples(tmp_path):
    store = ResultStore(tmp_path)
    row = _row("a", "test", 0.5)
    store.append([row], samples={row["key"]: _samples(0.5)})
    old = store.rows()[0]["samples"]
    store.append([row | {"accuracy": 0.75}], samples={row["key"]: _samples(0.75)}, replace=True)
    new = store.rows()[0]["samples"]
    unnamed = tmp_path / "samples" / f"{row['key']}-{'0' * 32}.parquet"  # a writer's, not yet named by its row
    pq.write_table(pa.table({"prediction": [0]}), unnamed)
    assert store.repair() == []
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted([new, unnamed.name]) and old != new
    _consistent(ResultStore(tmp_path))


def test_foreign_parquet_is_refused(tmp_path):
    (tmp_path / "rows").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "rows" / "part-000000.parquet")
    with pytest.raises(ResultsError, match="lacks columns .*not written by raymerge"):
        ResultStore(tmp_path).rows()
