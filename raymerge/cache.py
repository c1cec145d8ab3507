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
    makes every :meth:`get` a miss while :meth:`put` still refreshes the entries.
    """

    def __init__(self, root: str | Path, bypass_reads: bool = False) -> None:
        self.root = Path(root)
        self.bypass_reads = bypass_reads

    def path(self, *parts: str) -> Path:
        return self.root / (hashlib.sha256("|".join(parts).encode()).hexdigest()[:32] + ".npy")

    def get(self, *parts: str) -> np.ndarray | None:
        """The cached array of key ``parts``, or None (a miss, a bypass, or an unreadable entry)."""
        if self.bypass_reads:
            return None
        p = self.path(*parts)
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
        with atomic_file(self.path(*parts), fsync=False) as tmp, open(tmp, "wb") as f:
            np.save(f, logits)
