"""The one atomic-write helper: whole files or none, no temporary left behind, exclusive creation never overwrites."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from raymerge import _io
from raymerge._io import atomic_dir, atomic_file, default_cache_dir, remove_stale_siblings, write_text
from raymerge.cache import LogitCache


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_replaces_whole_and_readers_see_the_old_content_until_then(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text(target, "old")
    with atomic_file(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new, first half")
            f.flush()
            assert target.read_text() == "old"  # a reader mid-write sees the old file, not a part of the new one
            f.write(", second half")
        assert tmp.parent == target.parent and tmp.name.startswith(f".a.txt.{os.getpid()}.")
        assert target.read_text() == "old"
    assert target.read_text() == "new, first half, second half"
    assert _leftovers(target.parent) == []


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"precious")
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error):
            with atomic_file(target) as tmp:
                tmp.write_bytes(b"half")
                raise error
        assert target.read_bytes() == b"precious"
        assert _leftovers(tmp_path) == []


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote no file"):
        with atomic_file(tmp_path / "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_exclusive_create_refuses_to_overwrite(tmp_path):
    target = tmp_path / "part.parquet"
    write_text(target, "first", exclusive=True)
    with pytest.raises(FileExistsError, match=f"{target} exists; refusing to overwrite it"):
        write_text(target, "second", exclusive=True)
    assert target.read_text() == "first"
    assert _leftovers(tmp_path) == []


def test_exclusive_create_racing_threads_one_wins(tmp_path):
    target = tmp_path / "once"
    start, won, lost = threading.Barrier(8), [], []

    def writer(i: int) -> None:
        start.wait()
        try:
            write_text(target, f"writer {i}", exclusive=True)
            won.append(i)
        except FileExistsError:
            lost.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert target.read_text() == f"writer {won[0]}"
    assert _leftovers(tmp_path) == []


def test_temporary_names_are_unique_per_write(tmp_path):
    names = {_io.temp_sibling(tmp_path / "x").name for _ in range(1000)}
    assert len(names) == 1000 and all(n.startswith(f".x.{os.getpid()}.") and n.endswith(".tmp") for n in names)


def test_atomic_dir_replaces_a_directory_or_a_file_as_a_whole(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "old-shard").write_text("old")
    (target / "nested").mkdir()
    (target / "nested" / "x").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "part-0").write_text("new")
        assert sorted(p.name for p in target.iterdir()) == ["nested", "old-shard"]  # untouched until the end
    assert sorted(p.name for p in target.iterdir()) == ["part-0"]
    file_target = tmp_path / "was-a-file"
    file_target.write_text("file")
    with atomic_dir(file_target) as tmp:
        (tmp / "part-0").write_text("dir")
    assert (file_target / "part-0").read_text() == "dir"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "old-shard").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "part-0").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old-shard"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_concurrent_writers_leave_one_complete_directory(tmp_path):
    target = tmp_path / "dataset"
    start = threading.Barrier(4)

    def writer(i: int) -> None:
        start.wait()
        for _ in range(20):
            with atomic_dir(target, fsync=False) as tmp:
                for j in range(3):
                    (tmp / f"part-{j}").write_text(str(i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert sorted(contents) == ["part-0", "part-1", "part-2"] and len(set(contents.values())) == 1
    assert _leftovers(tmp_path) == []


def test_stale_temporaries_of_killed_writers_are_removed_on_request(tmp_path):
    target = tmp_path / "zoo"
    (tmp_path / ".zoo.123.abc.tmp").mkdir()
    (tmp_path / ".zoo.123.abc.tmp" / "half").write_text("x")
    (tmp_path / ".zoo.456.def.old").write_text("x")
    (tmp_path / ".other.1.a.tmp").write_text("not ours")
    remove_stale_siblings(target)
    assert _leftovers(tmp_path) == [".other.1.a.tmp"]


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("RAYMERGE_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "raymerge"


def test_logit_cache_roundtrip_bypass_and_damaged_entry(tmp_path, caplog):
    cache = LogitCache(tmp_path / "logits")
    logits = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert cache.get("arch", "w", "h", "d") is None
    cache.put(logits, "arch", "w", "h", "d")
    np.testing.assert_array_equal(cache.get("arch", "w", "h", "d"), logits)
    assert cache.get("arch", "w", "h", "other") is None
    forced = LogitCache(tmp_path / "logits", bypass_reads=True)  # --force: entries from before are misses ...
    assert forced.get("arch", "w", "h", "d") is None and not forced.has("arch", "w", "h", "d")
    forced.put(logits + 1, "arch", "w", "h", "d")  # ... but what the forced run wrote itself is served
    assert forced.has("arch", "w", "h", "d") and cache.has("arch", "w", "h", "d")
    np.testing.assert_array_equal(forced.get("arch", "w", "h", "d"), logits + 1)
    cache.path("arch", "w", "h", "d").write_bytes(b"\x93NUMPY truncated")
    assert cache.get("arch", "w", "h", "d") is None
    assert "unreadable" in caplog.text and str(cache.path("arch", "w", "h", "d")) in caplog.text
    assert _leftovers(tmp_path / "logits") == []
