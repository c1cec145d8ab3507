"""What every benchmark module shares: the run context, timing, rows, progress lines and the machine description.

A benchmark module exposes ``TITLE``, ``run(ctx) -> list[dict]`` and ``meaning(rows) -> str`` (the "what this
means" line of its section). Rows have the keys of :func:`bench.mixture.run` (benchmark, case, measured_s,
baseline_s, baseline, ratio, ideal, note) plus, where they apply:

- ``ratio_means``: how ``ratio`` is formed ("baseline / measured", "passes of a single evaluation", ...);
- ``gap``: how far the measurement is from the ideal, in words and numbers ("+12% over 3 passes");
- ``value`` / ``unit`` (and ``baseline_value``): a non-time quantity, e.g. images/s or a relative error;
- ``estimate``: True for numbers computed from measurements and stated assumptions rather than measured.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

T0 = time.perf_counter()


def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the run started."""
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best(values: list[float]) -> float:
    return float(min(values))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    """``min–max`` of a few repeats, for notes."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{min(values):.3g}–{max(values):.3g}"


def pct_over(measured: float, ideal: float) -> str:
    """``+12% over ideal`` (or ``-5% under``)."""
    diff = measured / ideal - 1
    if abs(diff) < 0.005:
        return "at the ideal (within 0.5%)"
    return f"{diff:+.0%} {'over' if diff >= 0 else 'under'} ideal"


def row(benchmark: str, case: str, measured_s: float, baseline_s: float, baseline: str, ratio: float,
        ideal: str, note: str, **extra: Any) -> dict:
    out = {"benchmark": benchmark, "case": case, "measured_s": float(measured_s), "baseline_s": float(baseline_s),
           "baseline": baseline, "ratio": float(ratio), "ideal": ideal, "note": note}
    for key, value in extra.items():
        out[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return out


def check_finite(rows: list[dict]) -> None:
    """Numbers in rows must be finite: a NaN in a report is a bug in the benchmark, not a result."""
    for r in rows:
        for key, value in r.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"row {r['benchmark']} / {r['case']}: {key} is {value}")


@dataclass
class Context:
    """One benchmark run: mode, zoo choice, a scratch directory, and values later sections reuse."""

    quick: bool
    zoo: str  # "embedded", "tiny" or a manifest path
    workdir: Path
    revisions: list[str] = field(default_factory=list)  # other code revisions to measure beside this tree (rehearsal)
    repeat: int = 1  # measurements per revision (rehearsal)
    shared: dict[str, Any] = field(default_factory=dict)
    _manifest: Path | None = None

    def manifest(self) -> Path:
        """The zoo manifest: the embedded zoo (built on first use), a tiny zoo (built in seconds), or a file."""
        if self._manifest is None:
            if self.zoo == "embedded":
                from raymerge.zoo import ensure_zoo, zoo_dir

                if not (zoo_dir() / "manifest.yaml").is_file():
                    progress(f"building the embedded zoo under {zoo_dir()} (first use: minutes; waits if another "
                             "process is building it)")
                self._manifest = ensure_zoo()
            elif self.zoo == "tiny":
                from raymerge.zoo import build_zoo, default_cache_dir

                root = default_cache_dir() / "bench-zoo-tiny"
                if (root / "manifest.yaml").is_file():
                    self._manifest = root / "manifest.yaml"
                else:
                    progress(f"building the tiny zoo under {root}")
                    self._manifest = build_zoo(root, seed=0, scale="tiny")
            else:
                path = Path(self.zoo).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"--zoo {self.zoo}: no such manifest")
                self._manifest = path
        return self._manifest

    def scratch(self, name: str) -> Path:
        """A fresh empty directory under the run's scratch directory."""
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def start_ray(num_cpus: int = 2) -> None:
    """A private local Ray (never someone else's cluster: RAY-NOTES.md)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _kernel(seconds_out, ready, start_event, reps: int) -> None:
    """A fixed CPU-bound job in a fresh process: float64 512×512 matrix products, BLAS on one thread."""
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import numpy as np

    a = np.random.default_rng(0).standard_normal((512, 512))
    ready.put(True)
    start_event.wait()
    start = time.perf_counter()
    for _ in range(reps):
        a = a @ a
        a /= np.abs(a).max()
    seconds_out.put(time.perf_counter() - start)


def parallel_capacity(reps: int = 100, tries: int = 2) -> float:
    """How many cores' worth of a fixed CPU-bound job this machine gives right now: 2 × (time of the job in one
    process) / (time of the same job in each of two concurrent processes). 2.0 on two free cores, ~1.0 when other
    users' processes hold one of them. No Ray, no torch: the reference for every "2 vs 1" ratio in the report."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def once(n: int) -> float:
        out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_kernel, args=(out, ready, go, reps)) for _ in range(n)]
        for p in procs:
            p.start()
        for _ in procs:  # every process has imported numpy before the clock starts
            ready.get()
        go.set()
        times = [out.get() for _ in procs]
        for p in procs:
            p.join()
        return max(times)

    one = min(once(1) for _ in range(tries))
    two = min(once(2) for _ in range(tries))
    return 2 * one / two


def wait_for_idle_cpus(timeout: float = 30.0) -> None:
    """Wait until Ray reports every CPU available again (finished tasks' worker leases returned, killed actors'
    CPUs released), so the next measurement starts from a quiescent cluster. Switching resource shapes while the
    previous call's leases were still held made the raylet start fresh worker processes (seconds each) here."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.05)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import numpy
    import open_clip
    import ray
    import torch

    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        mem_gib = round(mem / 2**20, 1)
    except (OSError, StopIteration):
        mem_gib = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
