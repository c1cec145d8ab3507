"""Section adapter for :mod:`bench.mixture` (Beta / Dirichlet mixture fits), whose rows are used as they are."""

from __future__ import annotations

import re

from bench import mixture
from bench.common import Context

TITLE = "Mixture fitting (DaWin's Beta / Dirichlet mixtures)"
USES_RAY = False  # plain numpy in this process


def run(ctx: Context) -> list[dict]:
    return mixture.run(quick=ctx.quick)


def floor_seconds(r: dict) -> float | None:
    """The ``≈ X s`` floor that :mod:`bench.mixture` writes into its ``ideal`` text, if any."""
    match = re.search(r"≈\s*([0-9.]+)\s*s", str(r.get("ideal", "")))
    return float(match.group(1)) if match else None


def meaning(rows: list[dict]) -> str:
    ref = [r for r in rows if "reference EM" in r["baseline"]]
    paper = [r for r in rows if "paper" in r["baseline"]]
    text = ("Our vectorised EM is " + ", ".join(f"{r['ratio']:.1f}× ({r['benchmark']} {r['case']})" for r in ref)
            + " faster per iteration than the obvious reference EM")
    if paper:
        text += (f", and fits {paper[0]['case'].split(',')[0]} coefficients {paper[0]['ratio']:.0f}× faster than the "
                 "paper's ~30 s for 50k (their hardware)")
    floors = [(r, floor_seconds(r)) for r in ref]
    gaps = [f"{r['measured_s'] / f:.0f}×" for r, f in floors if f]
    if gaps:
        text += f"; it is {', '.join(gaps)} its exp+matmul floor, so restarts and the M-step, not density evaluation, dominate"
    return text + ". A fit takes seconds at most, negligible next to a DaWin evaluation pass at ImageNet scale."
