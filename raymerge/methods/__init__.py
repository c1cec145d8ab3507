"""The method registry: one unit per merge method (see :mod:`raymerge.methods.base`).

Every module of this package is imported on first use, so a new method is one new file here; packages outside
raymerge register theirs through the ``raymerge.methods`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from raymerge.methods.base import (
    MERGES,
    MULTITASK,
    REGISTRY,
    ROBUST,
    SETTINGS,
    SWEEP,
    Candidate,
    Evaluator,
    Method,
    Model,
    Paper,
    Params,
    Pool,
    Prediction,
    Reads,
    Recipe,
    default_of,
    register,
)

__all__ = [
    "MERGES", "MULTITASK", "REGISTRY", "ROBUST", "SETTINGS", "SWEEP", "Candidate", "Evaluator", "Method", "Model",
    "Paper", "Params", "Pool", "Prediction", "Reads", "Recipe", "all_methods", "default_of", "get", "register",
]

_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group="raymerge.methods"):
        ep.load()
    _loaded = True


def all_methods() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    _load()
    return dict(REGISTRY)


def get(name: str) -> Method | None:
    _load()
    return REGISTRY.get(name)


def _type_name(annotation: object) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[object]) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥"}
    parts = [f"{symbols[name]} {getattr(m, name)}" for m in metadata for name in symbols if hasattr(m, name)]
    return ", ".join(parts)


def parameters(unit: Method) -> list[dict[str, str]]:
    """Each parameter of ``unit``: name, type, default, allowed range and its one-line description, as text."""
    out = []
    for name, f in unit.params.model_fields.items():
        out.append({"name": name, "type": _type_name(f.annotation), "default": repr(f.get_default(call_default_factory=True)),
                    "range": _bounds(f.metadata), "doc": f.description or ""})
    return out


def describe() -> str:
    """``raymerge methods``: every method with its settings, paper and parameters (type, default, range, doc)."""
    lines = []
    for unit in all_methods().values():
        lines += [f"{unit.name}: {unit.summary}",
                  f"  settings: {', '.join(s for s in SETTINGS if s in unit.settings)}"
                  + ("; may draw random numbers (the seed is then part of its row keys)" if unit.random else ""),
                  *([f"  paper: {unit.paper}"] if unit.paper else [])]
        for p in parameters(unit):
            bounds = f", {p['range']}" if p["range"] else ""
            lines.append(f"  {p['name']}: {p['type']} = {p['default']}{bounds}. {p['doc']}".rstrip(". ") + ("." if p["doc"] else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def markdown_table() -> str:
    """The README's method table, generated from the registry (a test keeps the README equal to it)."""
    rows = ["| method | settings | parameters (default) | paper |", "|---|---|---|---|"]
    for unit in all_methods().values():
        params = ", ".join(f"`{p['name']}={p['default']}`" for p in parameters(unit)) or "none"
        paper = f"{unit.paper.title} ([arXiv:{unit.paper.arxiv}](https://arxiv.org/abs/{unit.paper.arxiv}))" \
            if unit.paper and unit.paper.arxiv else (unit.paper.title if unit.paper else "")
        rows.append(f"| `{unit.name}`: {unit.summary} | {', '.join(s for s in SETTINGS if s in unit.settings)} | "
                    f"{params} | {paper} |")
    return "\n".join(rows) + "\n"
