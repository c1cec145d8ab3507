"""Results → tables (terminal and Markdown) and PNG plots; ``python -m raymerge.report RESULTS_DIR``.

Two table shapes, as in the papers: robust fine-tuning (one task; columns ID, each shift, OOD average; DaWin
Table 1) and multi-task (columns one per task and their average; CART Table 1/3, DaWin Table 3). Sweep rows
(``rank_sweep``, ``sweep/*``) are left out of those tables: they get their own plots and small tables.

Plots, written next to ``REPORT.md`` when their rows are present (accuracy always in percent):

- ID versus OOD accuracy: WiSE-FT curve, ZS/FT endpoints, DaWin variants, ensembles and soups (DaWin Fig. 3);
- average accuracy versus rank ratio ρ from the ``rank_sweep`` rows (CART Fig. 1/5);
- DaWin's per-sample λ(x) histogram per test set, robust setting;
- DaWin's mean coefficient per (evaluated task, candidate model), multi-task setting (DaWin Fig. 4);
- DaWin's diagnostics per test set: entropy-based against oracle coefficients, split by which candidates are
  right (DaWin Fig. 11), beside tables of correlations, mean entropies and a verdict (:mod:`raymerge.diagnostics`);
- average accuracy versus number of merged tasks from the ``sweep/*`` rows (CART Fig. 6).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raymerge import diagnostics
from raymerge._io import atomic_file, write_text
from raymerge.diagnostics import Diagnostics
from raymerge.results import ResultStore

Row = dict[str, Any]

ID_SPLIT = "test"
# Sweep methods: many configurations of one method, reported as curves rather than table rows.
RANK_SWEEP, SWEEP_PREFIX = "rank_sweep", "sweep/"
LINE_MARKERS = ["o", "s", "^", "v", "D", "P"]
# Legend names of the rank sweep's curves as the papers call them.
CURVE_NAMES = {"cart": "CART", "task_arithmetic": "low-rank task arithmetic"}

# Parameters that identify a row but would only clutter its label (they are in the Parquet rows), and values
# that are the usual case.
HIDDEN_PARAMS = {"models", "model", "svd", "lambdas", "own_task", "lam0", "curve"}
HIDDEN_VALUES = {("scores", "entropy")}
SHOWN_ALWAYS = {"finetuned": {"model"}}


def method_label(method: str, params: str | dict[str, Any]) -> str:
    """Row label: the method and its distinguishing parameters, e.g. ``wise_ft lam=0.5``.

    A multi-task ``finetuned`` row (each model on its own task) is labelled as one method, so that the table shows
    the individual models' upper bound in one line."""
    p = json.loads(params) if isinstance(params, str) else params
    if p.get("own_task"):
        return f"{method} (each on its own task)"
    keep = SHOWN_ALWAYS.get(method, set())
    defaults = _defaults(method.removeprefix(SWEEP_PREFIX))
    shown = " ".join(f"{k}={v}" for k, v in sorted(p.items())
                     if (k not in HIDDEN_PARAMS or k in keep) and (k, v) not in HIDDEN_VALUES and v is not None
                     and defaults.get(k, _NO_DEFAULT) != v)
    return f"{method} {shown}".strip()


_NO_DEFAULT = object()


def _defaults(name: str) -> dict[str, Any]:
    """A registered method's parameter defaults (as a row records them): labels show only what differs."""
    from raymerge import methods

    unit = methods.get(name)
    return unit.params().record() if unit else {}


def row_label(row: Row) -> str:
    """A table row's label: :func:`method_label`, and the λ a selection on validation chose (task arithmetic)."""
    details = json.loads(row.get("details") or "{}")
    chosen = f" (λ={details['lam']:g} on validation)" if "validation_accuracy" in details else ""
    return method_label(row["method"], row["params"]) + chosen


def is_sweep(method: str) -> bool:
    """Rows drawn as curves (the rank sweep, task-subset sweeps) rather than table rows."""
    return method == RANK_SWEEP or method.startswith(SWEEP_PREFIX)


def is_oracle(method: str, params: dict[str, Any]) -> bool:
    """DaWin with label-based coefficients: an upper bound, never a method to pick."""
    return method == "dawin" and params.get("scores") == "oracle"


def current_rows(store: ResultStore) -> list[Row]:
    """The rows tables and plots show: for an experiment whose runs recorded their plan (:meth:`ResultStore.
    write_current`), the rows of that plan; otherwise the newest row of each (method, params, task, split). Rows an
    input change superseded (another test set, head or seed gives a row another key) stay stored but are not shown."""
    current, shown, newest = store.current(), [], {}
    for r in sorted(store.rows(), key=lambda r: r.get("written_at") or 0):
        if r["experiment"] in current:
            if r["key"] in current[r["experiment"]]:
                shown.append(r)
        else:
            newest[(r["experiment"], r["method"], json.dumps(_params(r), sort_keys=True), r["task"], r["split"])] = r
    return shown + list(newest.values())


def table_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows of the main tables: every row except the sweeps (``rank_sweep``, ``sweep/*``)."""
    return [r for r in rows if not is_sweep(r["method"])]


def build_table(rows: Sequence[Row]) -> tuple[list[str], list[list[Any]]]:
    """Pivot result rows into (header, table rows) with accuracy in percent; sweep rows are left out.

    Robust shape when any split other than ``test`` is present (columns ID, shifts, OOD avg); multi-task shape
    otherwise (columns tasks, avg over the tasks a method was evaluated on).
    """
    rows = table_rows(rows)
    robust = any(r["split"] != ID_SPLIT for r in rows)
    cells: dict[str, dict[str, float]] = {}
    extra: dict[str, tuple[float, int]] = {}
    for r in rows:
        label = row_label(r)
        column = r["split"] if robust else r["task"]
        cells.setdefault(label, {})[column] = 100.0 * r["accuracy"]
        secs, merges = extra.get(label, (0.0, 0))
        extra[label] = (max(secs, float(r.get("seconds") or 0.0)), max(merges, int(r.get("merges") or 0)))
    if robust:
        shifts = sorted({r["split"] for r in rows} - {ID_SPLIT})
        header = ["method", "ID", *shifts, "OOD avg", "seconds", "merges/set"]
        body = []
        for label, c in cells.items():
            ood = [c[s] for s in shifts if s in c]
            body.append([label, c.get(ID_SPLIT), *[c.get(s) for s in shifts], np.mean(ood) if ood else None, *extra[label]])
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


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _render(header: Sequence[str], text: Sequence[Sequence[str]], markdown: bool) -> str:
    """Cells already formatted as aligned text (first column left, the others right) or a Markdown table."""
    if markdown:
        return _markdown_table(header, text)
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in text)])


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """Render :func:`build_table` as aligned text (terminal) or a Markdown table; sweep rows are left out."""
    header, body = build_table(rows)
    return _render(header, [[_fmt(v, header[i]) for i, v in enumerate(r)] for r in body], markdown)


# ---------------------------------------------------------------------------------------------------------------
# Data behind the plots: pure functions of rows (and per-sample columns), tested on their own.


def _params(row: Row) -> dict[str, Any]:
    return json.loads(row["params"]) if isinstance(row["params"], str) else dict(row["params"])


def _configs(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows of each evaluated configuration, keyed by (method, params as sorted JSON), in store order."""
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r["method"], json.dumps(_params(r), sort_keys=True)), []).append(r)
    return out


def _mean_percent(rows: Sequence[Row]) -> float:
    return float(100.0 * np.mean([r["accuracy"] for r in rows]))


def _curve_label(method: str, params: dict[str, Any], varied: str) -> str:
    """Legend label of one curve of a sweep: the method's name, and its parameters other than ``varied``."""
    name = CURVE_NAMES.get(params.get("curve"), method.split("/", 1)[-1])
    return method_label(name, {k: v for k, v in params.items() if k != varied})


@dataclass(frozen=True)
class Point:
    """One robust-setting configuration: ID test accuracy and mean accuracy over the shifts, in percent."""

    method: str
    params: dict[str, Any]
    id_acc: float | None
    ood_acc: float | None


def id_ood_points(rows: Sequence[Row]) -> list[Point]:
    """ID accuracy and OOD average (mean over the shifts a configuration was evaluated on) per configuration."""
    points = []
    for (method, params), group in _configs(table_rows(rows)).items():
        shifts = [r for r in group if r["split"] != ID_SPLIT]
        ids = [r for r in group if r["split"] == ID_SPLIT]
        points.append(Point(method, json.loads(params), _mean_percent(ids) if ids else None,
                            _mean_percent(shifts) if shifts else None))
    return points


def rank_sweep_curves(rows: Sequence[Row]) -> dict[str, list[tuple[float, float]]]:
    """Per ``rank_sweep`` curve: (rank ratio ρ, accuracy averaged over the tasks in percent), sorted by ρ."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for (method, params), group in _configs(rows).items():
        p = json.loads(params)
        if method == RANK_SWEEP and "rank_ratio" in p:
            lam = p.get("cart_lam") if p.get("curve") == "cart" else p.get("task_arithmetic_lam")
            p = {k: v for k, v in p.items() if not k.endswith("_lam")} | {"lam": lam}
            curves.setdefault(_curve_label(method, p, "rank_ratio"), []).append((float(p["rank_ratio"]), _mean_percent(group)))
    return {label: sorted(points) for label, points in curves.items()}


def reference_accuracies(rows: Sequence[Row]) -> dict[str, float]:
    """Horizontal references of the rank sweep, accuracy averaged over tasks in percent: weight averaging and
    task arithmetic (each configuration present), and the individual models each on its own task."""
    refs = {method_label(m, p): _mean_percent(g) for (m, p), g in _configs(rows).items()
            if m in ("weight_average", "task_arithmetic")}
    individual = [r for r in rows if r["method"] == "finetuned" and _params(r).get("own_task")]
    if individual:
        refs["individual (upper bound)"] = _mean_percent(individual)
    return refs


class TaskCountPoint(NamedTuple):
    """Mean and standard error (percent) of the per-subset average accuracy over the subsets of one size."""

    size: int
    mean: float
    sem: float  # nan when only one subset has this size: no spread to estimate
    subsets: int


def accuracy_by_task_count(rows: Sequence[Row]) -> dict[str, list[TaskCountPoint]]:
    """Accuracy versus number of merged tasks (CART Fig. 6) from ``sweep/*`` rows with a ``subset`` parameter.

    A subset's accuracy is its merged model's accuracy averaged over the subset's own tasks (rows of other tasks
    are ignored); per curve and subset size, the mean over subsets and its standard error std(ddof=1)/√n.
    """
    per_size: dict[str, dict[int, list[float]]] = {}
    for (method, params), group in _configs(rows).items():
        p = json.loads(params)
        if not method.startswith(SWEEP_PREFIX) or not p.get("subset"):
            continue
        own = [r for r in group if r["task"] in p["subset"]]
        if own:
            label = _curve_label(method, p, "subset")
            per_size.setdefault(label, {}).setdefault(len(p["subset"]), []).append(_mean_percent(own))
    out = {}
    for label, sizes in per_size.items():
        out[label] = []
        for size, accs in sorted(sizes.items()):
            sem = float(np.std(accs, ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else math.nan
            out[label].append(TaskCountPoint(size, float(np.mean(accs)), sem, len(accs)))
    return out


def _mean_sem(p: TaskCountPoint | None) -> str:
    if p is None:
        return "-"
    sem = "-" if math.isnan(p.sem) else f"{p.sem:.1f}"
    return f"{p.mean:.1f} ± {sem} ({p.subsets})"


def format_sweep_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """:func:`accuracy_by_task_count` as aligned text (terminal) or Markdown: one row per subset size, one column
    per curve, cells ``mean ± s.e. (number of subsets)`` in percent."""
    curves = accuracy_by_task_count(rows)
    sizes = sorted({p.size for points in curves.values() for p in points})
    body = [[str(n), *(_mean_sem({p.size: p for p in points}.get(n)) for points in curves.values())] for n in sizes]
    return _render(["tasks", *curves], body, markdown)


def _column_array(table: pa.Table, name: str) -> np.ndarray:
    """A stored per-sample column as numpy: (N,) for a plain column, (N, M) for a list column (rows of one length)."""
    column = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)


def _sample_columns(store: ResultStore, row: Row, required: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Every per-sample column of ``row`` as numpy, or None when its samples file is unreadable or lacks one of
    ``required`` (the report then leaves the row out instead of failing)."""
    try:
        table = store.samples(row["key"])
    except (OSError, pa.ArrowException):
        return None
    if not set(required) <= set(table.column_names):
        return None
    return {name: _column_array(table, name) for name in table.column_names}


def _coefficients(store: ResultStore, row: Row) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A DaWin row's per-sample coefficients (N, M) and mixture component (N,) if stored; None when its samples
    file or coefficient column is absent (the plot then leaves the row out instead of failing the report)."""
    columns = _sample_columns(store, row, ["coefficients"])
    if columns is None:
        return None
    return columns["coefficients"].astype(np.float64), columns.get("component")


def coefficient_matrix(store: ResultStore, rows: Sequence[Row]) -> tuple[list[str], list[str], np.ndarray]:
    """Multi-task DaWin's mean coefficient per (evaluated task, candidate model) (DaWin Fig. 4).

    ``rows``: the DaWin rows of one configuration, one per task. Returns (tasks, models, matrix (T, M)), models in
    the ``models`` parameter's order and tasks in that order first, so that when the method works (each task
    weights its own fine-tuned model most) the diagonal stands out. Tasks without stored coefficients are left out.
    """
    models = list(_params(rows[0])["models"]) if rows else []
    ordered = sorted(rows, key=lambda r: models.index(r["task"]) if r["task"] in models else len(models))
    tasks, means = [], []
    for r in ordered:
        stored = _coefficients(store, r)
        if stored is not None:
            tasks.append(r["task"])
            means.append(stored[0].mean(axis=0))
    return tasks, models, np.array(means).reshape(len(tasks), len(models))


@dataclass(frozen=True)
class LambdaSet:
    """DaWin's λ(x) (weight of the fine-tuned model θ1) on one test set, and its mixture components."""

    split: str
    lambdas: np.ndarray  # (N,)
    components: list[tuple[float, int]]  # (mean λ of the component's members, member count), by mean λ


def lambda_by_set(store: ResultStore, rows: Sequence[Row]) -> list[LambdaSet]:
    """Per test set of robust DaWin rows (ID first, then the shifts by name): λ(x) = coefficient column 1 and
    each mixture component's mean λ over its members. Sets without stored coefficients are left out."""
    out = []
    for r in sorted(rows, key=lambda r: (r["split"] != ID_SPLIT, r["split"])):
        stored = _coefficients(store, r)
        if stored is None:
            continue
        lam, component = stored[0][:, 1], stored[1]
        comps = [] if component is None else sorted(
            (float(lam[component == j].mean()), int((component == j).sum())) for j in np.unique(component))
        out.append(LambdaSet(r["split"], lam, comps))
    return out


DIAGNOSTIC_COLUMNS = ("entropies", "cross_entropies", "coefficients", "oracle_coefficients", "candidate_correct")


@dataclass(frozen=True)
class SetDiagnostics:
    """DaWin's diagnostics on one test set, recomputed from a row's stored per-sample columns."""

    task: str
    split: str
    diagnostics: Diagnostics


def dawin_diagnostics(store: ResultStore, rows: Sequence[Row]) -> list[SetDiagnostics]:
    """Per test set of one DaWin configuration's rows (the ID split first, then the others by name, tasks in store
    order): :func:`raymerge.diagnostics.diagnose` on the stored per-sample columns, the candidates named by the
    ``models`` parameter. Rows whose samples lack the diagnostic columns (older results) are left out."""
    out = []
    for r in sorted(rows, key=lambda r: (r["split"] != ID_SPLIT, r["split"])):
        columns = _sample_columns(store, r, DIAGNOSTIC_COLUMNS)
        if columns is None:
            continue
        names = _params(r).get("models")
        if names is None or len(names) != columns["entropies"].shape[1]:
            names = None
        out.append(SetDiagnostics(r["task"], r["split"], diagnostics.diagnose(columns, names)))
    return out


def diagnostics_table(d: Diagnostics) -> tuple[list[str], list[list[str]]]:
    """Split table of one test set: group size, Pearson r / Spearman ρ of each candidate's entropy with its
    cross-entropy, and of the entropy-based coefficient with the oracle coefficient ("n/a (reason)" when undefined).
    """
    compared = "λ vs oracle λ* (r / ρ)" if len(d.names) == 2 else "coefficients vs oracle (r / ρ)"
    header = ["split", "n", *(f"H vs CE: {name} (r / ρ)" for name in d.names), compared]
    body = [[s.name, str(s.size), *(str(c) for c in s.entropy_vs_loss), str(s.coefficient_vs_oracle)] for s in d.splits]
    return header, body


def mean_entropy_table(d: Diagnostics) -> tuple[list[str], list[list[str]]]:
    """Mean entropy in nats (temperature 1) per split of the candidates, the static merge and DaWin's output
    (DaWin Fig. 12); "-" for an empty split. Empty table when no entropies at temperature 1 were stored."""
    labels = list(d.splits[0].mean_entropies)
    body = [[s.name, *("-" if math.isnan(s.mean_entropies[k]) else f"{s.mean_entropies[k]:.3f}" for k in labels)]
            for s in d.splits] if labels else []
    return ["split", *labels], body


# ---------------------------------------------------------------------------------------------------------------
# Figures: built on the Agg canvas directly (no pyplot, no display, no global figure state), saved atomically.


def _new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: Path) -> Path:
    # bbox "tight" keeps legends placed outside the axes inside the image
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _legend_outside(ax: Axes) -> None:
    """Legend to the right of the axes, so it never covers data points."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _finish_line_plot(fig: Figure, ax: Axes, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Grid, axis labels, title and an outside legend, then the atomic save shared by the single-panel plots."""
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend_outside(ax)
    return _save_figure(fig, path)


def _theta1(points: Sequence[Point]) -> str | None:
    """Name of θ1, the fine-tuned endpoint: WiSE-FT's ``model``, else DaWin's second candidate, else the first
    fine-tuned model."""
    for p in points:
        if p.method == "wise_ft" and "model" in p.params:
            return p.params["model"]
    for p in points:
        if p.method.startswith("dawin") and len(p.params.get("models", [])) > 1:
            return p.params["models"][1]
    return next((p.params.get("model") for p in points if p.method == "finetuned"), None)


def _legend_rank(p: Point) -> tuple[bool, ...]:
    """Legend order of the ID-versus-OOD points: ZS, fine-tuned models, baselines, DaWin variants, oracle last."""
    return p.method != "zeroshot", p.method != "finetuned", p.method.startswith("dawin"), is_oracle(p.method, p.params)


def plot_id_ood(points: Sequence[Point], path: Path, title: str) -> Path | None:
    """ID versus OOD (DaWin Fig. 3): x = ID test accuracy (%), y = mean accuracy over the shifts (%).

    The WiSE-FT curve (λ annotated at a few points), ZS and FT endpoints, DaWin variants (one marker each, the
    oracle hollow as an upper bound), other fine-tuned models, the output ensemble and soups. None when no
    configuration has both an ID and an OOD accuracy (e.g. a multi-task experiment).
    """
    pts = [p for p in points if p.id_acc is not None and p.ood_acc is not None]
    if not pts:
        return None
    fig = _new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    theta1 = _theta1(pts)

    wise = sorted((p for p in pts if p.method == "wise_ft"), key=lambda p: p.params["lam"])
    if wise:
        ax.plot([p.id_acc for p in wise], [p.ood_acc for p in wise], "-o", color="tab:blue", ms=4, lw=1.5,
                label="WiSE-FT (λ from 0 to 1)", zorder=2)
        # λ on four interior points (the ends are ZS and FT, and the whole grid would overlap), on the outer side
        # of the usually concave curve: upper left where it rises, upper right where it falls
        for i in sorted({int(round(i)) for i in np.linspace(0, len(wise) - 1, 6)[1:-1]}):
            rising = wise[min(i + 1, len(wise) - 1)].ood_acc >= wise[max(i - 1, 0)].ood_acc
            ax.annotate(f"λ={wise[i].params['lam']:g}", (wise[i].id_acc, wise[i].ood_acc), textcoords="offset points",
                        xytext=(-5, 5) if rising else (5, 5), ha="right" if rising else "left", fontsize=8,
                        color="tab:blue")

    others = cycle(zip(["s", "^", "v", "p", "h", "<", ">", "8"],
                       ["tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:orange", "0.4"]))
    dawin_markers = cycle(["D", "P", "X", "v", "^", "<", ">", "d"])
    for p in sorted((p for p in pts if p.method != "wise_ft"), key=_legend_rank):
        label = method_label(p.method, p.params)
        xy = (p.id_acc, p.ood_acc)
        if p.method == "zeroshot":
            ax.scatter(*xy, marker="*", s=200, color="black", label="ZS (zero-shot θ0)", zorder=4)
            ax.annotate("ZS", xy, textcoords="offset points", xytext=(8, 4), fontsize=10, weight="bold")
        elif p.method == "finetuned" and p.params.get("model") == theta1:
            ax.scatter(*xy, marker="s", s=80, color="black", label=f"FT (fine-tuned θ1: {theta1})", zorder=4)
            ax.annotate("FT", xy, textcoords="offset points", xytext=(8, 4), fontsize=10, weight="bold")
        elif p.method == "finetuned":
            ax.scatter(*xy, marker="o", s=30, color="0.6", label=label, zorder=3)
        elif is_oracle(p.method, p.params):
            ax.scatter(*xy, marker="o", s=110, facecolors="none", edgecolors="tab:red", linewidths=1.8,
                       label=label, zorder=4)
            # text to the left: the oracle sits at the top right, where text on its right would leave the axes
            ax.annotate("upper bound", xy, textcoords="offset points", xytext=(-9, -3), ha="right", fontsize=8,
                        color="tab:red")
        elif p.method.startswith("dawin"):
            ax.scatter(*xy, marker=next(dawin_markers), s=70, color="tab:red", edgecolors="white", linewidths=0.5,
                       label=label, zorder=4)
        else:
            marker, color = next(others)
            ax.scatter(*xy, marker=marker, s=60, color=color, label=label, zorder=3)

    ax.margins(0.08)
    return _finish_line_plot(fig, ax, path, "ID accuracy (%)", "OOD average accuracy (%)", title)


def plot_rank_sweep(curves: dict[str, list[tuple[float, float]]], refs: dict[str, float], path: Path,
                    title: str) -> Path | None:
    """Accuracy versus rank ratio (CART Fig. 1/5): x = ρ in [0, 1], y = accuracy averaged over tasks (%), one
    line per method; horizontal references for weight averaging, task arithmetic and the individual models
    (dashed, upper bound). None without curves."""
    if not curves:
        return None
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    for (label, points), marker in zip(curves.items(), cycle(LINE_MARKERS)):
        ax.plot(*zip(*points), marker=marker, ms=5, lw=1.8, label=label)
    ref_styles = {"weight_average": ("tab:gray", ":"), "task_arithmetic": ("tab:brown", "-.")}
    for label, value in refs.items():
        color, style = ("black", "--") if label.startswith("individual") else ref_styles.get(label.split()[0], ("0.5", ":"))
        ax.axhline(value, color=color, ls=style, lw=1.3, label=f"{label} ({value:.1f}%)")
    ax.set_xlim(-0.02, 1.02)
    return _finish_line_plot(fig, ax, path, "rank ratio ρ (fraction of singular values kept)", "average accuracy over tasks (%)", title)


def plot_lambda_histograms(sets: Sequence[LambdaSet], path: Path, title: str) -> Path | None:
    """Robust DaWin: histogram of the per-sample λ(x) (weight of θ1, in [0, 1]) on each test set, one panel per
    set, y in percent of that set's samples; dashed vertical lines at each mixture component's mean λ. None
    without sets."""
    if not sets:
        return None
    cols = min(len(sets), 3)
    nrows = math.ceil(len(sets) / cols)
    fig = _new_figure(3.4 * cols, 2.6 * nrows + 0.6, layout="constrained")
    fig.get_layout_engine().set(wspace=0.08)  # keeps one panel's "1.0" apart from the next panel's "0.0"
    axes = fig.subplots(nrows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    bins = np.linspace(0.0, 1.0, 26)
    for ax, s in zip(axes, sets):
        ax.hist(s.lambdas, bins=bins, weights=np.full(len(s.lambdas), 100.0 / len(s.lambdas)), color="tab:blue",
                alpha=0.75, edgecolor="white", linewidth=0.5)
        for j, (mean, _) in enumerate(s.components):
            ax.axvline(mean, color="tab:red", ls="--", lw=1.2, label="component mean λ" if j == 0 else None)
        name = "ID (test)" if s.split == ID_SPLIT else s.split
        ax.set_title(f"{name}: N={len(s.lambdas)}, mean λ={s.lambdas.mean():.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(sets):]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * cols:]:
        ax.set_xlabel("λ(x), weight of θ1")
    for ax in axes[::cols]:
        ax.set_ylabel("% of samples")
    axes[0].set_xlim(0.0, 1.0)
    if any(s.components for s in sets):
        # one legend for all panels, outside them so that no bars are covered
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(title)
    return _save_figure(fig, path)


def plot_coefficient_heatmap(tasks: Sequence[str], models: Sequence[str], matrix: np.ndarray, path: Path,
                             title: str) -> Path | None:
    """Multi-task DaWin (DaWin Fig. 4): rows = evaluated tasks, columns = candidate models, cell = mean
    coefficient (in [0, 1], rows sum to 1) over the task's test samples, annotated. None when empty."""
    if matrix.size == 0:
        return None
    fig = _new_figure(1.0 + 0.75 * len(models), 1.0 + 0.55 * len(tasks))
    ax = fig.add_subplot()
    vmax = float(matrix.max())
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for i, j in np.ndindex(matrix.shape):
        # dark text on the light end of viridis, light text on the dark end
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="black" if matrix[i, j] > 0.6 * vmax else "white")
    ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("candidate model (fine-tuned on)")
    ax.set_ylabel("evaluated task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean coefficient", shrink=0.85)
    return _save_figure(fig, path)


def _set_name(s: SetDiagnostics, robust: bool) -> str:
    if not robust:
        return s.task
    return "ID (test)" if s.split == ID_SPLIT else s.split


def plot_coefficient_vs_oracle(sets: Sequence[SetDiagnostics], path: Path, title: str, robust: bool) -> Path | None:
    """DaWin Fig. 11: histograms of DaWin's entropy-based coefficient (filled) against the oracle's
    cross-entropy-based one (outline), in % of each panel's samples over [0, 1]. Two candidates: one row per test
    set, one column per split (all, TT, TF, FT, FF) of λ(x). More candidates: one panel per test set with every
    entry of the coefficient matrices. Panel titles give n and Pearson r. None without sets."""
    if not sets:
        return None
    two = len(sets[0].diagnostics.names) == 2
    panels = [(s, split.name) for s in sets for split in (s.diagnostics.splits if two else s.diagnostics.splits[:1])]
    cols = len(sets[0].diagnostics.splits) if two else min(len(sets), 4)
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(2.9 * cols, 2.3 * nrows + 0.7, layout="constrained")
    axes = fig.subplots(nrows, cols, sharex=True, squeeze=False).ravel()
    for ax, (s, split) in zip(axes, panels):
        edges, ours, theirs = s.diagnostics.histogram(split, bins=20)
        total = max(int(ours.sum()), 1)
        ax.stairs(100.0 * ours / total, edges, fill=True, color="tab:blue", alpha=0.6, label="DaWin (entropy)")
        ax.stairs(100.0 * theirs / total, edges, color="tab:red", lw=1.4, label="oracle (cross-entropy)")
        stats = s.diagnostics.split(split)
        r = stats.coefficient_vs_oracle
        ax.set_title(f"{_set_name(s, robust)} · {split}\nn={stats.size}, r={r.pearson:.2f}" if not r.reason
                     else f"{_set_name(s, robust)} · {split}\nn={stats.size}, r n/a", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("% of samples", fontsize=8)
    for ax in axes[max(len(panels) - cols, 0):len(panels)]:
        ax.set_xlabel(f"λ(x), weight of {sets[0].diagnostics.names[1]}" if two else "coefficient (every candidate)",
                      fontsize=8)
    axes[0].set_xlim(0.0, 1.0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    return _save_figure(fig, path)


def plot_task_count(curves: dict[str, list[TaskCountPoint]], path: Path, title: str) -> Path | None:
    """Accuracy versus number of merged tasks (CART Fig. 6): x = subset size, y = mean over subsets of the
    per-subset average accuracy (%), error bars ± one standard error; one line per method. None without curves."""
    if not curves:
        return None
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for (label, points), marker in zip(curves.items(), cycle(LINE_MARKERS)):
        ax.errorbar([p.size for p in points], [p.mean for p in points], yerr=np.nan_to_num([p.sem for p in points]),
                    marker=marker, ms=5, lw=1.8, capsize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.08)
    return _finish_line_plot(fig, ax, path, "number of tasks merged", "average accuracy (%)", title)


# ---------------------------------------------------------------------------------------------------------------
# Report sections: each returns its Markdown lines, or none when the experiment lacks its rows.


def _figure_markdown(heading: str, path: Path | None, caption: str, *table: str) -> list[str]:
    """A section heading, the embedded PNG, its one-line caption and its small table; none without a PNG."""
    if path is None:
        return []
    return [f"### {heading}", "", f"![{heading}]({path.name})", "", f"*{caption}*", "", *(line for t in table for line in (t, ""))]


def _plot_path(root: Path, experiment: str, kind: str) -> Path:
    return root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', experiment).strip('_') or 'experiment'}_{kind}.png"


def _latest_config(rows: Sequence[Row], method: str, **match: Any) -> list[Row]:
    """Rows of the last-written configuration of ``method`` whose params include ``match`` ([] when none):
    a results directory can hold several runs of one method (e.g. two values of DaWin's k)."""
    configs = [g for (m, p), g in _configs(rows).items()
               if m == method and all(json.loads(p).get(k) == v for k, v in match.items())]
    return configs[-1] if configs else []


def _id_ood_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    path = plot_id_ood(id_ood_points(rows), _plot_path(root, name, "id_vs_ood"), f"{name}: ID versus OOD accuracy")
    return _figure_markdown(
        "ID versus OOD", path,
        "ID accuracy (x, %) versus OOD average accuracy (y, %): WiSE-FT curve, ZS/FT endpoints, DaWin variants "
        "(oracle hollow: upper bound), ensembles and soups; numbers in the ID and OOD avg columns above.")


def _rank_sweep_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    curves, refs = rank_sweep_curves(rows), reference_accuracies(rows)
    path = plot_rank_sweep(curves, refs, _plot_path(root, name, "rank_sweep"), f"{name}: accuracy versus rank ratio")
    ratios = sorted({rho for points in curves.values() for rho, _ in points})
    body = [[f"{rho:g}", *(_fmt(dict(points).get(rho), "") for points in curves.values())] for rho in ratios]
    return _figure_markdown(
        "Accuracy versus rank ratio", path,
        "Accuracy averaged over tasks (%) versus rank ratio ρ of the task vectors, one line per method; horizontal "
        "lines: weight averaging, task arithmetic and the individual models (dashed, upper bound).",
        _markdown_table(["ρ", *curves], body),
        "References (avg %): " + (", ".join(f"{k} {v:.1f}" for k, v in refs.items()) or "none"))


def _lambda_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    dawin_rows = _latest_config(rows, "dawin", offset=True, mixture="beta")
    sets = lambda_by_set(store, dawin_rows)
    k = _params(dawin_rows[0]).get("k") if dawin_rows else None
    path = plot_lambda_histograms(sets, _plot_path(root, name, "dawin_lambda"), f"{name}: DaWin λ(x) per test set (offset, k={k})")
    body = [[s.split, str(len(s.lambdas)), f"{s.lambdas.mean():.3f}",
             ", ".join(f"{m:.2f} ({n})" for m, n in s.components) or "-"] for s in sets]
    return _figure_markdown(
        "DaWin coefficients per test set", path,
        "Histogram of DaWin's per-sample λ(x) (weight of the fine-tuned model, offset on) on each test set, in % of "
        "its samples; dashed lines: mean λ of each mixture component.",
        _markdown_table(["set", "N", "mean λ", "component mean λ (members)"], body))


def _heatmap_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    if any(r["split"] != ID_SPLIT for r in rows):
        return []  # robust setting: two candidates per sample, shown as λ(x) histograms instead
    tasks, models, matrix = coefficient_matrix(store, _latest_config(rows, "dawin"))
    path = plot_coefficient_heatmap(tasks, models, matrix, _plot_path(root, name, "dawin_coefficients"),
                                    f"{name}: DaWin mean coefficient per task and model")
    body = [[t, *(f"{v:.3f}" for v in matrix[i])] for i, t in enumerate(tasks)]
    return _figure_markdown(
        "DaWin coefficients per task", path,
        "Mean DaWin coefficient of each candidate model (columns) over each task's test samples (rows); a bright "
        "diagonal means each task weights its own fine-tuned model most.",
        _markdown_table(["task \\ model", *models], body))


def _diagnostics_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    robust = any(r["split"] != ID_SPLIT for r in rows)
    dawin_rows = (_latest_config(rows, "dawin", offset=True) if robust else []) or _latest_config(rows, "dawin")
    sets = dawin_diagnostics(store, dawin_rows)
    label = method_label("dawin", _params(dawin_rows[0])) if dawin_rows else "dawin"
    path = plot_coefficient_vs_oracle(sets, _plot_path(root, name, "dawin_diagnostics"),
                                      f"{name}: DaWin coefficients against the oracle's ({label})", robust)
    if path is None:
        return []
    split_help = ("TT/TF/FT/FF: which candidate is right (T) or wrong (F), first letter candidate 0 "
                  f"({sets[0].diagnostics.names[0]})" if len(sets[0].diagnostics.names) == 2 else
                  "'<model> right': the samples that candidate gets right (groups overlap); 'none right': no candidate")
    lines = [
        "### DaWin diagnostics: does entropy track the loss?", "",
        f"DaWin ({label}) weights each candidate by exp(−entropy) as a label-free stand-in for exp(−cross-entropy). "
        "Per test set and per split of its samples (" + split_help + "): Pearson r / Spearman ρ of each candidate's "
        "entropy with its cross-entropy (fitted temperatures), and of DaWin's coefficient with the oracle's "
        "(Eq. 1 on cross-entropies; λ for two candidates, every entry for more). The verdict uses r of the "
        f"coefficients over all samples: ≥ {diagnostics.STRONG_CORRELATION} tracks, below "
        f"{diagnostics.WEAK_CORRELATION} does not, and then DaWin's merges sit near the static interpolation. "
        "Mean entropies (nats) are at temperature 1 for candidates and merged models alike; 'static merge' is the "
        "merge with uniform coefficients. Recomputed from the per-sample columns of the samples files.", "",
    ]
    for s in sets:
        lines += [f"**{_set_name(s, robust)}**: {s.diagnostics.verdict}", "", _markdown_table(*diagnostics_table(s.diagnostics)), ""]
        header, body = mean_entropy_table(s.diagnostics)
        if body:
            lines += ["Mean entropy (nats):", "", _markdown_table(header, body), ""]
    lines += [f"![DaWin coefficients against the oracle's]({path.name})", "",
              "*Histograms of DaWin's entropy-based coefficients (filled) and the oracle's cross-entropy-based ones "
              "(outline), in % of each panel's samples (DaWin Fig. 11).*", ""]
    return lines


def _task_count_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    path = plot_task_count(accuracy_by_task_count(rows), _plot_path(root, name, "tasks_vs_accuracy"),
                           f"{name}: accuracy versus number of tasks")
    return _figure_markdown(
        "Accuracy versus number of tasks", path,
        "Average accuracy (%) over a subset's own tasks versus subset size: mean ± standard error over subsets, one "
        "line per method; table cells: mean ± s.e. (number of subsets).",
        format_sweep_table(rows, markdown=True))


ADAPTIVE = ("adamerging", "cart_pp")  # methods whose rows carry learned coefficients in their details


@dataclass(frozen=True)
class LearnedCoefficients:
    """What a test-time adaptation learned: ``matrix`` (L, T) coefficients of each coefficient group (a parameter
    tensor, or all of them) for each task's model, and the mean entropy (nats) at the first and last step."""

    label: str
    layers: list[str]
    tasks: list[str]
    matrix: np.ndarray
    first_loss: float
    last_loss: float


def learned_coefficients(rows: Sequence[Row]) -> list[LearnedCoefficients]:
    """One :class:`LearnedCoefficients` per configuration of AdaMerging / CART++ (not sweeps), from its rows' details."""
    out = []
    for (method, params), group in _configs(table_rows(rows)).items():
        details = json.loads(group[0].get("details") or "{}")
        if method in ADAPTIVE and "coefficients" in details:
            losses = details.get("losses") or [math.nan]
            out.append(LearnedCoefficients(method_label(method, params), details["layers"], details["tasks"],
                                           np.asarray(details["coefficients"], dtype=np.float64).T,
                                           float(losses[0]), float(losses[-1])))
    return out


def _short_layer(name: str) -> str:
    return re.sub(r"^(visual\.)?transformer\.resblocks\.(\d+)\.", r"block \2: ", name)


def plot_learned_coefficients(learned: LearnedCoefficients, path: Path, title: str) -> Path:
    """Heatmap of learned coefficients: rows = coefficient groups (layers, in model order), columns = tasks' models;
    cells annotated while there are few enough to read."""
    rows, cols = learned.matrix.shape
    fig = _new_figure(2.5 + 0.8 * cols, min(1.5 + 0.22 * rows, 40.0))
    ax = fig.add_subplot()
    image = ax.imshow(learned.matrix, cmap="viridis", aspect="auto")
    if rows * cols <= 400:
        mid = (learned.matrix.max() + learned.matrix.min()) / 2
        for i, j in np.ndindex(learned.matrix.shape):
            ax.text(j, i, f"{learned.matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if learned.matrix[i, j] > mid else "white")
    ax.set_xticks(range(cols), learned.tasks, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [_short_layer(n) for n in learned.layers], fontsize=6 if rows > 30 else 8)
    ax.set_xlabel("task vector of the model fine-tuned on")
    ax.set_ylabel("coefficient group (parameter tensor)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="learned coefficient λ", shrink=0.6)
    return _save_figure(fig, path)


def _learned_section(store: ResultStore, name: str, rows: Sequence[Row], root: Path) -> list[str]:
    lines = []
    for i, learned in enumerate(learned_coefficients(rows)):
        path = plot_learned_coefficients(learned, _plot_path(root, name, f"learned_coefficients_{i}"),
                                         f"{name}: {learned.label}, learned coefficients")
        body = [[t, f"{learned.matrix[:, j].mean():.3f}", f"{learned.matrix[:, j].min():.3f}",
                 f"{learned.matrix[:, j].max():.3f}"] for j, t in enumerate(learned.tasks)]
        lines += _figure_markdown(
            f"Learned coefficients: {learned.label}", path,
            f"Coefficient λ of each task's vector (columns) in each parameter tensor (rows), learned by minimizing "
            f"the prediction entropy on the unlabeled test sets: mean entropy {learned.first_loss:.4f} → "
            f"{learned.last_loss:.4f} nats over the adaptation.",
            _markdown_table(["task", "mean λ", "min λ", "max λ"], body))
    return lines


SECTIONS: list[Callable[[ResultStore, str, Sequence[Row], Path], list[str]]] = [
    _id_ood_section, _lambda_section, _rank_sweep_section, _heatmap_section, _learned_section, _diagnostics_section,
    _task_count_section,
]


def write_report(results_dir: str | Path) -> Path:
    """Write ``REPORT.md`` (tables and plots, PNGs beside it) into ``results_dir``; returns its path.

    A plot whose rows are absent is skipped; every file is written to a temporary name and renamed into place.
    """
    root = Path(results_dir)
    store = ResultStore(root)
    by_exp: dict[str, list[Row]] = {}
    for r in current_rows(store):
        by_exp.setdefault(r["experiment"], []).append(r)
    parts = [f"# raymerge report: {root.name}", ""]
    for name, exp_rows in by_exp.items():
        parts += [f"## {name}", ""]
        if table_rows(exp_rows):
            parts += ["Accuracy in percent on each test set; seconds = the run's wall time on the candidate over all "
                      "its test sets, from its turn to its rows (each row stores it; the next static candidate's "
                      "passes are queued behind the current one's, so they overlap; adaptations started ahead "
                      "count their own time, and a candidate evaluated while one holds an actor its wait); "
                      "merges/set = merged weight sets evaluated per test set.", "",
                      format_table(exp_rows, markdown=True), ""]
        for section in SECTIONS:
            parts += section(store, name, exp_rows, root)
    out = root / "REPORT.md"
    write_text(out, "\n".join(parts))
    return out


def print_locations(written: Sequence[tuple[Any, Path]]) -> None:
    """The last lines of a job: where each experiment's rows and report are on the node that ran the driver, and,
    when that node is a cluster's head, how to fetch them."""
    print()
    for exp, report_path in written:
        print(f"{exp.name}: rows in {exp.output_dir / 'rows'}, report in {report_path}")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        print("These paths are on the node that ran this job's driver (a cluster's head). Fetch them with:")
        for root in sorted({str(exp.output_dir) for exp, _ in written}):
            print(f"  ray rsync-down cluster.yaml {root}/ ./{Path(root).name}/")
        print("or set RAYMERGE_RESULTS (runtime env) to a shared filesystem.")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m raymerge.report", description="Markdown + PNG report of a results directory")
    parser.add_argument("results_dir")
    args = parser.parse_args(argv)
    print(write_report(args.results_dir))


if __name__ == "__main__":
    main()
