"""``raymerge`` console script: ``zoo build``, ``methods``, ``report DIR``, ``results repair DIR``, ``import SRC``,
``head``, ``convert SRC DST``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(src: Path, dst: Path, trust_pickle: bool) -> None:
    """Rewrite a checkpoint as safetensors holding the image encoder's state dict.

    An escape hatch for pickles that ``raymerge import`` refuses: ``--trust-pickle`` unpickles with Python's own
    unpickler, which runs whatever the file names, so it is for files from a source you trust. Without it a
    pickled module is refused with a pointer to ``raymerge import``, which reads task_vectors files safely.
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


def import_command(args: argparse.Namespace) -> str:
    from raymerge import formats, heads

    src = args.src
    if args.pretrained is not None:
        if args.format not in ("auto", "open_clip") or args.model is None or src is not None:
            raise ValueError("--pretrained goes with --format open_clip --model ARCH and no SRC")
        src, args.format = formats.resolve_pretrained(args.model, args.pretrained), "open_clip"
    if src is None:
        raise ValueError("name the checkpoint to import (SRC), or --pretrained with --format open_clip")
    names = heads.class_names(args.classes) if args.classes else None
    return formats.import_checkpoint(src, args.out, args.format, args.model, args.projection_from, names)


def head_command(args: argparse.Namespace) -> str:
    from raymerge import heads, models

    head = heads.zero_shot_head(args.model, args.weights, args.classes, args.templates, device=args.device)
    models.save_head(head, args.out)
    return f"wrote zero-shot head {args.out}: {head.num_classes} classes × {head.weight.shape[1]} features"


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
    imp = sub.add_parser(
        "import", help="convert a checkpoint (task_vectors, TALL-masks, Hugging Face, open_clip) to raymerge's form",
        description="Write SRC as raymerge's own checkpoint: an image encoder as its open_clip vision-tower "
        "safetensors, a classification head as a head file. Pickles are read by a restricted unpickler that runs "
        "nothing from the file.",
    )
    imp.add_argument("src", nargs="?", help="file or Hugging Face directory (omit with --pretrained)")
    imp.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    imp.add_argument("--format", default="auto", choices=["auto", "task_vectors", "tall_masks", "hf", "open_clip", "raymerge"])
    imp.add_argument("--model", help="open_clip architecture of an encoder, e.g. ViT-B-32-quickgelu (OpenAI CLIP)")
    imp.add_argument("--projection-from", help="checkpoint holding the visual projection (a base HF CLIPModel) "
                     "for a Hugging Face CLIPVisionModel")
    imp.add_argument("--pretrained", help="open_clip weights: a local file, or a pretrained tag found in open_clip's cache")
    imp.add_argument("--classes", help="class names of a head: a known dataset name or a file with one name per line")
    hd = sub.add_parser("head", help="build a zero-shot head from a CLIP text tower, class names and templates")
    hd.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-32-quickgelu")
    hd.add_argument("--weights", required=True, help="a whole CLIP: open_clip file, HF CLIPModel directory, ...")
    hd.add_argument("--classes", required=True, help="a known dataset name or a file with one class name per line")
    hd.add_argument("--templates", required=True, help="a known template set or a file with one template per line ({} = class)")
    hd.add_argument("--out", required=True, type=Path)
    hd.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    conv = sub.add_parser("convert", help="convert a state dict to safetensors (pickles: use raymerge import)")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    conv.add_argument("--trust-pickle", action="store_true",
                      help="unpickle SRC with Python's own unpickler: only for files from a source you trust")
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
        command = {"import": import_command, "head": head_command}.get(args.command)
        try:
            if command is None:
                convert(args.src, args.dst, args.trust_pickle)
            else:
                print(command(args))
        except ValueError as err:  # CheckpointError, ModelError, HeadError: bad input, already explained
            print(f"raymerge {args.command}: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
