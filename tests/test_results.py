"""The results store: keyed, append-only, atomic; corrupt parts are refused by name and can be repaired."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raymerge.results import ResultsError, ResultStore, main, row_key


def _row(method: str, split: str, acc: float) -> dict:
    params = {"lam": 0.5}
    return {"key": row_key(method, params, "pool", "digits", split), "experiment": "e", "method": method,
            "params": params, "pool": "pool", "task": "digits", "split": split, "accuracy": acc, "n": 10,
            "seconds": 1.0, "merges": 1}


def test_row_key_depends_on_everything_that_determines_a_result():
    base = row_key("wise_ft", {"lam": 0.5}, "p", "t", "test")
    assert base == row_key("wise_ft", {"lam": 0.5}, "p", "t", "test")
    others = [row_key("wise_ft", {"lam": 0.6}, "p", "t", "test"), row_key("ties", {"lam": 0.5}, "p", "t", "test"),
              row_key("wise_ft", {"lam": 0.5}, "q", "t", "test"), row_key("wise_ft", {"lam": 0.5}, "p", "u", "test"),
              row_key("wise_ft", {"lam": 0.5}, "p", "t", "rotate")]
    assert len({base, *others}) == 6


def test_append_only_no_duplicates_and_summary(tmp_path):
    store = ResultStore(tmp_path)
    store.append([_row("a", "test", 0.5), _row("a", "rotate", 0.25)])
    store.append([_row("a", "test", 0.99), _row("b", "test", 0.75)])  # the first key is already stored
    rows = {(r["method"], r["split"]): r["accuracy"] for r in store.rows()}
    assert rows == {("a", "test"): 0.5, ("a", "rotate"): 0.25, ("b", "test"): 0.75}
    assert len(list((tmp_path / "rows").glob("part-*.parquet"))) == 2
    assert len(ResultStore(tmp_path).rows()) == 3  # a fresh reader sees exactly what this one wrote
    store.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_samples_roundtrip(tmp_path):
    store = ResultStore(tmp_path)
    coeffs = np.array([[0.25, 0.75], [0.5, 0.5]])
    store.write_samples("k", {"prediction": np.array([1, 0]), "coefficients": coeffs})
    table = store.samples("k").to_pydict()
    assert table["prediction"] == [1, 0] and np.allclose(table["coefficients"], coeffs)


def test_corrupt_part_is_refused_then_repaired(tmp_path, capsys):
    store = ResultStore(tmp_path)
    store.append([_row("a", "test", 0.5)])
    store.append([_row("b", "test", 0.75)])
    part = sorted((tmp_path / "rows").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:40])  # what a crash that bypassed the rename could leave
    restarted = ResultStore(tmp_path)  # the run after the crash opens the directory afresh
    with pytest.raises(ResultsError, match=rf"results part {part} is corrupt.*raymerge.results repair"):
        restarted.rows()
    main(["repair", str(tmp_path)])
    assert "moved 1 corrupt part(s) aside" in capsys.readouterr().out
    assert [r["method"] for r in ResultStore(tmp_path).rows()] == ["a"]  # row b is missing: a rerun recomputes it
    assert (tmp_path / "rows" / "corrupt" / part.name).exists()


def test_foreign_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = ResultStore(tmp_path)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "rows" / "part-000000.parquet")
    with pytest.raises(ResultsError, match="lacks columns .*not written by raymerge"):
        store.rows()
