"""``raymerge`` console script: ``zoo build``, ``methods``, ``report DIR``, ``results repair DIR``, ``convert SRC DST``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(src: Path, dst: Path, trust_pickle: bool) -> None:
    """Rewrite a checkpoint as safetensors holding the image encoder's state dict.

    task_vectors-style checkpoints are pickled ``ImageEncoder`` modules; unpickling runs arbitrary code, so it
    happens only here, only with ``--trust-pickle``, and never when raymerge loads weights for a run.
    """
    import torch

    from raymerge.models import CheckpointError, _strip_prefix, load_state_dict_file, save_state_dict_file

    try:
        sd = load_state_dict_file(src)
    except CheckpointError:
        if not trust_pickle:
            raise
        obj = torch.load(src, map_location="cpu", weights_only=False)
        sd = _strip_prefix(obj.state_dict() if hasattr(obj, "state_dict") else dict(obj))
    save_state_dict_file(sd, dst)
    print(f"wrote {dst} ({len(sd)} tensors)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zoo"]:
        from raymerge.zoo import main as zoo_main

        return zoo_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="raymerge")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("zoo", help="build or verify the embedded zoo (raymerge zoo build --help)")
    sub.add_parser("methods", help="list every merge method with its parameters, defaults, settings and paper")
    rep = sub.add_parser("report", help="write REPORT.md and plots for a results directory")
    rep.add_argument("results_dir")
    res = sub.add_parser("results", help="results store maintenance")
    res.add_argument("action", choices=["repair"])
    res.add_argument("results_dir")
    conv = sub.add_parser("convert", help="convert a checkpoint to safetensors (pickled modules need --trust-pickle)")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    conv.add_argument("--trust-pickle", action="store_true", help="unpickle SRC: only for files from a source you trust")
    args = parser.parse_args(argv)
    if args.command == "methods":
        from raymerge.methods import describe

        print(describe(), end="")
    elif args.command == "report":
        from raymerge.report import main as report_main

        report_main([args.results_dir])
    elif args.command == "results":
        from raymerge.results import main as results_main

        results_main([args.action, args.results_dir])
    else:
        convert(args.src, args.dst, args.trust_pickle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
