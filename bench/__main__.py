"""``python -m bench [--quick] [--out DIR] [--zoo Z] [--only SECTION ...] [--update J] [--render J] [--revision REV]``

Runs the benchmark sections in order (mixture, dawin, cart, adamerging, ties, evaluation, precision, sweep), those
that need one on a private local Ray (``address="local"``, 2 CPUs, no dashboard), and writes ``BENCHMARKS.md``
(repository root) and ``bench/results.json``, or both into ``--out DIR``. Progress lines go to stderr.

``--quick`` is a smoke run (well under a minute once its zoo exists) with tiny sizes, on the tiny zoo unless
``--zoo`` says otherwise; its ratios mean nothing. The full run takes about 10–15 minutes on 2 cores, plus the
embedded zoo's one-time build (``--zoo embedded``, the default without ``--quick``; a build already under way in
another process is waited for). ``--zoo tiny`` builds (once) a tiny zoo under ``$RAYMERGE_CACHE/bench-zoo-tiny``;
``RAYMERGE_BENCH_ZOO`` sets the default. ``--render bench/results.json`` measures nothing: it rewrites the report
from stored rows (after a change to the report's format or its "what this means" lines). ``--only cart --update
bench/results.json`` measures one section and puts it into an existing report in place of its old rows, keeping the
other sections (each updated section then says when and how it was measured).

``rehearsal`` (issue 16's rehearsal: ``jobs/sweep.py`` over a real-sized ViT-B/32 pool in its own processes,
minutes per code revision, a one-time 1.7 GB fixture under ``$RAYMERGE_CACHE/bench-rehearsal``) runs only when
named: ``python -m bench --only rehearsal --revision e27b674 --update bench/results.json`` measures that commit
(from a temporary git worktree) beside this tree, side by side; ``--repeat 2`` measures each twice.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # raymerge's driver-side progress bars: our progress lines suffice

from bench import common, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("mixture", "dawin", "cart", "adamerging", "ties", "evaluation", "precision", "sweep")
OPTIONAL = ("rehearsal",)  # only with --only: minutes of real-sized jobs


def _module(key: str):
    import importlib

    return importlib.import_module("bench.mixtures" if key == "mixture" else f"bench.{key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (< 1 min once the zoo exists)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write BENCHMARKS.md and results.json into this directory (default: BENCHMARKS.md at the "
                        "repository root, bench/results.json)")
    parser.add_argument("--zoo", default=None,
                        help="embedded (default), tiny (default with --quick), or a zoo manifest.yaml path")
    parser.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL, default=None, help="run only these sections")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: rewrite the report (and its 'what this means' lines) from a results.json")
    parser.add_argument("--update", type=Path, default=None, metavar="RESULTS_JSON",
                        help="put the sections measured now into this results.json in place of their old rows, keep the "
                        "others, and rewrite its report (BENCHMARKS.md beside --out, else at the repository root)")
    parser.add_argument("--revision", action="append", default=[], metavar="REV",
                        help="rehearsal: also measure this git revision (from a temporary worktree), e.g. the code "
                        "before a change; repeatable")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="rehearsal: measurements per revision")
    args = parser.parse_args(argv)
    if args.update and not args.update.is_file():
        parser.error(f"--update {args.update}: no such results.json")
    if (args.revision or args.repeat != 1) and "rehearsal" not in (args.only or ()):
        parser.error("--revision and --repeat apply to the rehearsal section: add --only rehearsal")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: must be at least 1")
    for rev in args.revision:  # a typo fails here, not after minutes of measurements
        try:
            _module("rehearsal").resolve(rev)
        except ValueError as err:
            parser.error(str(err))
    if args.render:
        return render(args.render, args.out)
    zoo = args.zoo or os.environ.get("RAYMERGE_BENCH_ZOO") or ("tiny" if args.quick else "embedded")
    md_path = (args.out / "BENCHMARKS.md") if args.out else REPO / "BENCHMARKS.md"
    json_path = (args.out / "results.json") if args.out else REPO / "bench" / "results.json"
    command = "python -m bench" + (" " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
                                   if (argv if argv is not None else sys.argv[1:]) else "")
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = common.machine()
    workdir = Path(tempfile.mkdtemp(prefix="raymerge-bench-"))
    ctx = common.Context(quick=args.quick, zoo=zoo, workdir=workdir, revisions=args.revision, repeat=args.repeat)
    common.progress(f"{command}: zoo {zoo}, scratch {workdir}, load average {machine['load_average_at_start']}")
    capacity_args = {"reps": 30, "tries": 1} if args.quick else {}
    machine["parallel_capacity_at_start"] = round(common.parallel_capacity(**capacity_args), 2)
    ctx.shared["capacity"] = [machine["parallel_capacity_at_start"]]
    common.progress(f"parallel capacity (2 plain processes vs 1): {machine['parallel_capacity_at_start']}×")
    sections, failed = [], False
    ray_started = False
    try:
        for key in args.only or SECTIONS:
            module = _module(key)
            uses_ray = getattr(module, "USES_RAY", True)
            if uses_ray and not ray_started:
                ctx.manifest()  # build or wait for the zoo before Ray holds the cores
                common.progress("starting a private local Ray (2 CPUs)")
                common.start_ray()
                ray_started = True
            elif not uses_ray and ray_started:  # a section running its own processes gets the machine to itself
                import ray

                ray.shutdown()
                ray_started = False
            common.progress(f"section {key}: start")
            start = time.perf_counter()
            entry = {"key": key, "title": module.TITLE}
            try:
                rows = module.run(ctx)
                common.check_finite(rows)
                entry.update(rows=rows, meaning=module.meaning(rows))
            except Exception as err:  # report the failure, keep the other sections
                failed = True
                traceback.print_exc()
                entry.update(rows=[], meaning="", error=f"{type(err).__name__}: {err}")
            entry["seconds"] = time.perf_counter() - start
            sections.append(entry)
            common.progress(f"section {key}: {'FAILED' if entry.get('error') else 'done'} in {entry['seconds']:.0f} s")
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    capacity_end = round(common.parallel_capacity(**capacity_args), 2)
    common.progress(f"parallel capacity at the end: {capacity_end}×")
    result = {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "zoo": f"{zoo} ({ctx._manifest})" if ctx._manifest else zoo,
        "machine": machine,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "parallel_capacity_at_end": capacity_end,
        "seconds": time.perf_counter() - common.T0,
        "sections": sections,
    }
    if args.update:
        json_path, result = args.update, updated(args.update, result)
    report.write(result, md_path, json_path)
    common.progress(f"wrote {md_path} and {json_path} ({result['seconds']:.0f} s in all)")
    return 1 if failed else 0


def updated(json_path: Path, run: dict) -> dict:
    """The stored results with ``run``'s sections in place of theirs (in SECTIONS, OPTIONAL order), each marked with
    the run that measured it."""
    import json

    stored = json.loads(json_path.read_text())
    fresh = {}
    for section in run["sections"]:
        section["run"] = {"command": run["command"], "date": run["date"],
                          "load_average_at_start": run["machine"]["load_average_at_start"],
                          "parallel_capacity_at_start": run["machine"].get("parallel_capacity_at_start")}
        fresh[section["key"]] = section
    by_key = {section["key"]: section for section in stored["sections"]}
    # the report's run time: the sections' time moves with them
    stored["seconds"] += sum(s["seconds"] - by_key.get(key, {"seconds": 0.0})["seconds"] for key, s in fresh.items())
    by_key.update(fresh)
    stored["sections"] = [by_key[key] for key in SECTIONS + OPTIONAL if key in by_key]
    return stored


def render(json_path: Path, out: Path | None) -> int:
    """Rebuild the Markdown (and the sections' 'what this means' lines) from stored rows; no measurement."""
    import json

    result = json.loads(json_path.read_text())
    for section in result["sections"]:
        if section.get("rows") and not section.get("error"):
            section["meaning"] = _module(section["key"]).meaning(section["rows"])
    md_path = (out / "BENCHMARKS.md") if out else REPO / "BENCHMARKS.md"
    report.write(result, md_path, (out / "results.json") if out else json_path)
    common.progress(f"rendered {md_path} from {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
