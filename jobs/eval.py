"""Evaluate merges of fine-tuned models on Ray.

    python jobs/eval.py                       # the default experiments on the embedded zoo (local Ray)
    python jobs/eval.py --config FILE.yaml    # your experiment
    python jobs/eval.py --config F --set methods.dawin.k=5 --force

Works embedded (no cluster: Ray starts in-process) and under ``ray job submit`` (joins the job's cluster).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from raymerge import cluster, config
from raymerge.errors import input_errors

DEFAULT_EXPERIMENTS = ["robust.yaml", "multitask.yaml"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="experiment YAML (repeatable); default: the packaged experiments")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. methods.dawin.k=5")
    parser.add_argument("--force", action="store_true", help="recompute rows already in the results store")
    parser.add_argument("--address", help="Ray cluster address, or \"local\" for a fresh local Ray (default: RAY_ADDRESS, else plain ray.init())")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")
    parser.add_argument("--cache-dir", type=Path, help="logit cache and embedded zoo location (default: $RAYMERGE_CACHE)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    cluster.warn_if_unauthenticated(args.address)  # first: a cluster open to anyone is worth knowing before any work
    if args.cache_dir:
        os.environ["RAYMERGE_CACHE"] = str(args.cache_dir)
    files = args.config or [str(Path(config.__file__).parent / "experiments" / f) for f in DEFAULT_EXPERIMENTS]
    try:
        # every file is checked before the zoo is built or Ray started, so a typo in the second file wastes no work
        for f in files:
            config.check(f, args.set)
        experiments = [config.load(f, args.set) for f in files]
        # imported once the files are checked: a typo is answered in 3 s, not after open_clip's and matplotlib's 5 s
        from raymerge import pipeline, report
        if args.num_cpus and not args.address:
            cluster.connect(None, args.num_cpus)
        stores = [pipeline.run_experiment(exp, args.force, args.cache_dir, args.address) for exp in experiments]
    except input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = []
    for exp, store in zip(experiments, stores):
        rows = [r for r in report.current_rows(store) if r["experiment"] == exp.name]
        print(f"\n== {exp.name} ({exp.setting}) — accuracy %\n")
        print(report.format_table(rows))
        written.append((exp, report.write_report(exp.output_dir)))
    report.print_locations(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
