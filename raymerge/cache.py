"""The logit cache: per-sample outputs on disk (logits, or what the actors reduced them to: predictions, DaWin's
scores), so a baseline computed once is reused across methods and runs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from raymerge._io import atomic_file

log = logging.getLogger("raymerge")


class LogitCache:
    """Output arrays under ``root``, one ``.npy`` file per key.

    The key is the caller's tuple of strings and must name everything the array depends on (the pipeline's:
    architecture, weights hash, head hash, dataset hash, evaluation settings, what the logits were reduced to). ``bypass_reads`` (``--force``)
    makes :meth:`get` a miss for every entry this cache object has not written itself, while :meth:`put` still
    refreshes the entries: a forced run recomputes each output once, not once per method that reads it.
    """

    def __init__(self, root: str | Path, bypass_reads: bool = False) -> None:
        self.root = Path(root)
        self.bypass_reads = bypass_reads
        self._written: set[Path] = set()

    def path(self, *parts: str) -> Path:
        return self.root / (hashlib.sha256("|".join(parts).encode()).hexdigest()[:32] + ".npy")

    def has(self, *parts: str) -> bool:
        """Whether :meth:`get` would find the entry (without reading it)."""
        p = self.path(*parts)
        return (not self.bypass_reads or p in self._written) and p.exists()

    def get(self, *parts: str) -> np.ndarray | None:
        """The cached array of key ``parts``, or None (a miss, a bypass, or an unreadable entry)."""
        p = self.path(*parts)
        if self.bypass_reads and p not in self._written:
            return None
        try:
            return np.load(p, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as err:
            # entries are written atomically; an unreadable one was damaged outside raymerge (a power cut before
            # the disk caught up, a hand edit): recomputing it is the repair
            log.warning("logit cache entry %s is unreadable (%s); recomputing it", p, err)
            return None

    def put(self, logits: np.ndarray, *parts: str) -> None:
        # no fsync: losing an entry to a power cut costs a recomputation, and get() treats a damaged one as a miss
        path = self.path(*parts)
        with atomic_file(path, fsync=False) as tmp, open(tmp, "wb") as f:
            np.save(f, logits)
        self._written.add(path)
