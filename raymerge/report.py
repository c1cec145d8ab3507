"""Results → tables (terminal and Markdown) and PNG plots; ``python -m raymerge.report RESULTS_DIR``.

Two table shapes, as in the papers: robust fine-tuning (one task; columns ID, each shift, OOD average; DaWin
Table 1) and multi-task (columns one per task and their average; CART Table 1/3, DaWin Table 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raymerge.results import ResultStore


# Parameters that identify a row but would only clutter its label (they are in the Parquet rows).
HIDDEN_PARAMS = {"models", "model", "selected_on", "svd"}
SHOWN_ALWAYS = {"finetuned": {"model"}, "individual": {"model"}, "greedy_soup": {"models"}}


def method_label(method: str, params: str | dict[str, Any]) -> str:
    """Row label: the method and its distinguishing parameters, e.g. ``wise_ft lam=0.5``."""
    p = json.loads(params) if isinstance(params, str) else params
    keep = SHOWN_ALWAYS.get(method, set())
    shown = " ".join(f"{k}={v}" for k, v in sorted(p.items()) if k not in HIDDEN_PARAMS or k in keep)
    return f"{method} {shown}".strip()


def build_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Pivot result rows into (header, table rows) with accuracy in percent.

    Robust shape when any split other than ``test`` is present (columns ID, shifts, OOD avg); multi-task shape
    otherwise (columns tasks, avg over the tasks a method was evaluated on).
    """
    robust = any(r["split"] != "test" for r in rows)
    cells: dict[str, dict[str, float]] = {}
    extra: dict[str, tuple[float, int]] = {}
    for r in rows:
        label = method_label(r["method"], r["params"])
        column = r["split"] if robust else r["task"]
        cells.setdefault(label, {})[column] = 100.0 * r["accuracy"]
        secs, merges = extra.get(label, (0.0, 0))
        extra[label] = (secs + float(r.get("seconds") or 0.0), max(merges, int(r.get("merges") or 0)))
    if robust:
        shifts = sorted({r["split"] for r in rows} - {"test"})
        header = ["method", "ID", *shifts, "OOD avg", "seconds", "merges/set"]
        body = []
        for label, c in cells.items():
            ood = [c[s] for s in shifts if s in c]
            body.append([label, c.get("test"), *[c.get(s) for s in shifts], np.mean(ood) if ood else None, *extra[label]])
    else:
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        header = ["method", *tasks, "avg", "seconds", "merges/set"]
        body = []
        for label, c in cells.items():
            vals = [c[t] for t in tasks if t in c]
            body.append([label, *[c.get(t) for t in tasks], np.mean(vals) if vals else None, *extra[label]])
    return header, body


def _fmt(v: Any, column: str) -> str:
    if v is None:
        return "-"
    if column == "seconds":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Render :func:`build_table` as aligned text (terminal) or a Markdown table."""
    header, body = build_table(rows)
    text = [[_fmt(v, header[i]) for i, v in enumerate(r)] for r in body]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in text]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in text)])


def write_report(results_dir: str | Path) -> Path:
    """Write ``REPORT.md`` (tables and plots) into ``results_dir``; returns its path."""
    root = Path(results_dir)
    rows = ResultStore(root).rows()
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_exp.setdefault(r["experiment"], []).append(r)
    parts = [f"# raymerge report: {root.name}", ""]
    for name, exp_rows in by_exp.items():
        parts += [f"## {name}", "", "Accuracy in percent on each test set; seconds = evaluation wall time.", "",
                  format_table(exp_rows, markdown=True), ""]
    out = root / "REPORT.md"
    tmp = root / ".REPORT.md.tmp"
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m raymerge.report", description="Markdown + PNG report of a results directory")
    parser.add_argument("results_dir")
    args = parser.parse_args(argv)
    print(write_report(args.results_dir))


if __name__ == "__main__":
    main()
