"""Sweep merges over every subset of the task pool (resumable: a restart finishes only what is missing).

    python jobs/sweep.py                                   # all 247 subsets of the embedded zoo's 8 tasks
    python jobs/sweep.py --config FILE.yaml --set sweep.max_size=4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from raymerge import cluster, config
from raymerge.errors import input_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(config.__file__).parent / "experiments" / "sweep.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="recompute rows already in the results store")
    parser.add_argument("--address", help="Ray cluster address, or \"local\" for a fresh local Ray (default: RAY_ADDRESS, else plain ray.init())")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    cluster.warn_if_unauthenticated(args.address)  # first: a cluster open to anyone is worth knowing before any work
    if args.cache_dir:
        os.environ["RAYMERGE_CACHE"] = str(args.cache_dir)
    try:
        exp = config.load(args.config, args.set)
        # imported once the file is checked: a typo is answered in 3 s, not after open_clip's and matplotlib's 5 s
        from raymerge import report, sweep
        store = sweep.run_sweep(exp, args.force, args.cache_dir, args.address)
    except input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [r for r in report.current_rows(store) if r["experiment"] == exp.name and r["method"].startswith("sweep/")]
    print(report.format_sweep_table(rows))
    report.print_locations([(exp, report.write_report(exp.output_dir))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
