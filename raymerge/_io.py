"""Writing files so that no reader, crash or concurrent writer ever sees or leaves half of one.

Every file raymerge writes (results parts and samples, summaries, reports, checkpoints, datasets, the zoo, the
logit cache, benchmark results) goes through :func:`atomic_file` or :func:`atomic_dir`: the content is written
under a temporary name beside the target (same directory, so the final rename stays on one filesystem and is
atomic), made durable, then moved into place. The temporary name carries the process id and a random suffix, so
two processes or threads writing the same target never share one; a failed write (an exception, Ctrl-C)
removes it. A process killed outright (SIGKILL) leaves a hidden ``.<name>.<pid>.<random>.tmp`` beside the
target, never a partial target.

Hand-written rather than a library: ``atomicwrites`` (the usual choice) is archived and unmaintained, and neither
it nor its forks swap in whole directories (Parquet datasets, the zoo).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# os.link fails with these where the filesystem has no hard links (some network and FUSE mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# os.rename(directory, target) fails with these when target is a non-empty directory or a file
_TARGET_IN_THE_WAY = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


def default_cache_dir() -> Path:
    """``$RAYMERGE_CACHE``, else ``~/.cache/raymerge``: where the embedded zoo and the logit cache live."""
    return Path(os.environ.get("RAYMERGE_CACHE") or Path.home() / ".cache" / "raymerge").expanduser()


def temp_sibling(target: Path, suffix: str = "tmp") -> Path:
    """A hidden name beside ``target`` that no other process or thread picks: ``.<name>.<pid>.<random>.<suffix>``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.{suffix}")


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk; a rename is durable only once its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_exclusive(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s content the name ``target`` unless ``target`` exists: a hard link is created atomically
    and fails with EEXIST, where a rename would silently replace."""
    try:
        os.link(tmp, target)
    except FileExistsError as err:
        raise FileExistsError(errno.EEXIST, f"{target} exists; refusing to overwrite it", str(target)) from err
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: check, then rename. Not atomic, but raymerge's exclusive writes all use names
        # unique to the writer (time, pid, random), so no second writer races for the same name.
        if target.exists():
            raise FileExistsError(errno.EEXIST, f"{target} exists; refusing to overwrite it", str(target)) from None
        os.rename(tmp, target)


@contextmanager
def atomic_file(target: str | Path, *, exclusive: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write the content of ``target`` to; on a clean exit it becomes ``target``.

    ``exclusive``: never replace an existing ``target`` (:class:`FileExistsError`, and the temporary file is
    removed); otherwise an existing ``target`` is replaced in one step, readers seeing the old content or the new.
    ``fsync``: flush the content and the directory entry to the disk before returning (skip it only for files
    whose loss after a power cut costs nothing but a recomputation, such as caches).
    The parent directory is created if needed. On any exception the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(errno.ENOENT, f"the writer of {target} wrote no file", str(tmp))
        if fsync:
            _fsync(tmp)
        if exclusive:
            _link_exclusive(tmp, target)
        else:
            os.replace(tmp, target)
        if fsync:
            _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | Path, text: str, *, exclusive: bool = False, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``target`` through :func:`atomic_file`."""
    with atomic_file(target, exclusive=exclusive, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename directory ``tmp`` to ``target``, moving whatever is at ``target`` aside first (and deleting it after).

    Between the two renames ``target`` is briefly absent (POSIX cannot swap a non-empty directory in one step);
    it is never partial. Concurrent writers of one target each install a complete directory; the last one stays.
    """
    aside: list[Path] = []
    try:
        for _ in range(1000):
            try:
                os.rename(tmp, target)
                break
            except OSError as err:
                if err.errno not in _TARGET_IN_THE_WAY:
                    raise
            old = temp_sibling(target, "old")
            try:
                os.rename(target, old)
                aside.append(old)
            except FileNotFoundError:  # another writer moved it aside first: try again
                pass
        else:
            raise OSError(errno.EBUSY, f"could not install {tmp} as {target}: other writers keep replacing it")
    except BaseException:
        if aside and not target.exists():  # failed (or interrupted) between the renames: put the old one back
            os.rename(aside.pop(), target)
        raise
    finally:
        for old in aside:
            _remove(old)


def remove_stale_siblings(target: str | Path) -> None:
    """Delete the temporary files and directories that killed writers of ``target`` left beside it.

    Only for a caller holding a lock on ``target``: without one they may be another writer's, still in use.
    """
    target = Path(target)
    for pattern in (f".{target.name}.*.tmp", f".{target.name}.*.old"):
        for path in target.parent.glob(pattern):
            _remove(path)


@contextmanager
def atomic_dir(target: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary directory; on a clean exit it replaces ``target`` (a directory or file, or
    nothing) as a whole, so a reader finds the old content, the new content or (briefly) nothing, never a part.

    ``fsync`` flushes every file written into it, and the directories, first. On any exception (Ctrl-C
    included) the temporary directory is deleted and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for root, _, files in os.walk(tmp):
                for name in files:
                    _fsync(Path(root) / name)
                _fsync(Path(root))
        _swap_in(tmp, target)
        if fsync:
            _fsync(target.parent)
    except BaseException:
        _remove(tmp)
        raise
