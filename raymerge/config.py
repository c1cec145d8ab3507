"""Experiment files: one YAML describes the model pool, the task pool, the methods, resources and output.

Everything is validated before Ray starts: unknown keys, wrong types, bad values and missing files are all
collected and reported together in one :class:`ConfigError`, each with its dotted path.

An experiment either names a zoo manifest and a setting (``zoo: embedded`` and ``setting: robust``) or spells
out ``model_pool`` and ``task_pool`` itself, in the same shape as the manifest's settings. Relative paths are
resolved against the file that holds them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED = "embedded"


class ConfigError(ValueError):
    """An experiment file is invalid; ``problems`` lists every problem found, each with its dotted path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Param:
    """One schema entry: accepted Python types, default (``required`` when there is none), and a value check."""

    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    check: Callable[[Any], str | None] | None = None


def _in_unit(v: Any) -> str | None:
    return None if 0.0 <= float(v) <= 1.0 else f"must be in [0, 1], got {v}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def _number_list(v: Any) -> str | None:
    bad = [x for x in v if not isinstance(x, (int, float)) or isinstance(x, bool)]
    if bad or not v:
        return f"must be a non-empty list of numbers, got {v!r}"
    return None


def _cart_configs(v: Any) -> str | None:
    for i, c in enumerate(v):
        if not isinstance(c, Mapping) or set(c) - {"rank_ratio", "lam"} or "rank_ratio" not in c:
            return f"entry {i} must be a mapping with rank_ratio (and optional lam), got {c!r}"
        if not 0.0 <= float(c["rank_ratio"]) <= 1.0:
            return f"entry {i}: rank_ratio must be in [0, 1], got {c['rank_ratio']}"
    return None if v else "must list at least one {rank_ratio, lam} pair"


NUM = (int, float)
SVD_PARAM = Param((str,), "exact", check=lambda v: None if v in ("exact", "randomized") else f"must be exact or randomized, got {v!r}")
TENTHS = [round(0.1 * i, 1) for i in range(11)]

# Every method an experiment can ask for, with its parameters. Method semantics live in pipeline.py.
METHODS: dict[str, dict[str, Param]] = {
    "zeroshot": {},
    "finetuned": {},
    "wise_ft": {"lambdas": Param((list,), TENTHS, check=_number_list)},
    "output_ensemble": {},
    "weight_average": {},
    "model_stock": {},
    "greedy_soup": {},
    "task_arithmetic": {
        "lambdas": Param((list,), [round(0.1 * i, 1) for i in range(1, 11)], check=_number_list),
    },
    "ties": {"lam": Param(NUM, 1.0), "density": Param(NUM, 0.2, check=lambda v: None if 0 < v <= 1 else f"must be in (0, 1], got {v}")},
    "cart": {
        "configs": Param((list,), [{"rank_ratio": 0.08, "lam": 1.0}, {"rank_ratio": 0.12, "lam": 2.0}], check=_cart_configs),
        "svd": SVD_PARAM,
    },
    "rank_sweep": {
        "rank_ratios": Param((list,), [0.0, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.32, 0.5, 0.75, 1.0], check=_number_list),
        "cart_lam": Param(NUM, 1.0),
        "task_arithmetic_lam": Param(NUM, 0.3),
        "svd": SVD_PARAM,
    },
    "dawin": {
        "k": Param((int,), 3, check=_positive),
        "offset": Param((bool,), True),
        "mixture": Param((str,), "auto", check=lambda v: None if v in ("auto", "beta", "dirichlet", "none") else f"must be auto, beta, dirichlet or none, got {v!r}"),
        "lam0": Param(NUM, 0.3),
        "samplewise": Param((bool,), True),
        "oracle": Param((bool,), True),
    },
}

# Methods that combine several fine-tuned models *of one task* (or θ0 with θ1): meaningless across tasks.
ROBUST_ONLY = ("wise_ft", "model_stock", "greedy_soup")

RESOURCES: dict[str, Param] = {
    "num_actors": Param((int,), 2, check=_positive),
    # fractional by default: actors hold their CPUs while alive, and CART's SVD tasks need room beside them
    "num_cpus_per_actor": Param(NUM, 0.5, check=_non_negative),
    "num_gpus_per_actor": Param(NUM, 0.0, check=_non_negative),
    "batch_size": Param((int,), 256, check=_positive),
}

# Methods a task-subset sweep can run, with the fixed parameters each subset's merge uses.
SWEEP_METHODS: dict[str, dict[str, Param]] = {
    "weight_average": {},
    "task_arithmetic": {"lam": Param(NUM, 0.3)},
    "ties": METHODS["ties"],
    "cart": {"rank_ratio": Param(NUM, 0.08, check=_in_unit), "lam": Param(NUM, 1.0), "svd": SVD_PARAM},
    "dawin": {"k": Param((int,), 1, check=_positive), "lam0": Param(NUM, 0.3)},
}

SWEEP: dict[str, Param] = {
    "min_size": Param((int,), 2, check=_positive),
    "max_size": Param((int,), None),
    "tasks": Param((list,), None),  # the task pool's tasks to sweep over (default: all)
    "methods": Param((dict,), {m: {} for m in SWEEP_METHODS}),
}

TOP: dict[str, Param] = {
    "name": Param((str,), required=True),
    "seed": Param((int,), 0),
    "zoo": Param((str,), None),
    "setting": Param((str,), None),
    "model_pool": Param((dict,), None),
    "task_pool": Param((dict,), None),
    "methods": Param((dict,), required=True),
    "resources": Param((dict,), {}),
    "output_dir": Param((str,), None),
    "sweep": Param((dict,), None),
}

MODEL_POOL: dict[str, Param] = {
    "architecture": Param((str,), required=True),
    "base": Param((str,), required=True),
    "finetuned": Param((dict,), required=True),
}

TASK: dict[str, Param] = {
    "head": Param((str,), required=True),
    "finetuned": Param((str,), None),
    "validation": Param((str,), None),
    "test": Param((str,), required=True),
    "shifts": Param((dict,), {}),
}


@dataclass(frozen=True)
class TaskSpec:
    """A task: its fixed head, its own fine-tuned model (multi-task), and its splits (name → dataset path)."""

    name: str
    head: Path
    finetuned: str | None
    validation: Path | None
    test: Path
    shifts: dict[str, Path] = field(default_factory=dict)

    def eval_sets(self) -> dict[str, Path]:
        """Test split first, then each shifted set: the columns of a robust-setting table."""
        return {"test": self.test, **self.shifts}


@dataclass(frozen=True)
class Experiment:
    """A validated experiment, paths absolute."""

    name: str
    seed: int
    architecture: str
    base: Path
    finetuned: dict[str, Path]
    tasks: dict[str, TaskSpec]
    methods: dict[str, dict[str, Any]]
    resources: dict[str, Any]
    output_dir: Path
    source: str
    raw: dict[str, Any]
    sweep: dict[str, Any] | None = None

    @property
    def setting(self) -> str:
        """``robust`` (one task with shifted test sets) or ``multitask`` (tasks with their own fine-tuned models)."""
        return "multitask" if any(t.finetuned for t in self.tasks.values()) else "robust"


def _check_fields(node: Any, schema: Mapping[str, Param], where: str, problems: list[str]) -> dict[str, Any]:
    """Check ``node`` against ``schema``; return it with defaults filled in. Problems are appended, not raised."""
    if not isinstance(node, Mapping):
        problems.append(f"{where or 'file'}: must be a mapping, got {type(node).__name__}")
        return {}
    out: dict[str, Any] = {}
    for key in node:
        if key not in schema:
            problems.append(f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(schema)})")
    for key, p in schema.items():
        path = f"{where + '.' if where else ''}{key}"
        if key not in node or node[key] is None:
            if p.required:
                problems.append(f"{path}: required key is missing")
            out[key] = copy.deepcopy(p.default)
            continue
        value = node[key]
        if isinstance(value, bool) and bool not in p.types or not isinstance(value, p.types):
            names = " or ".join(t.__name__ for t in p.types)
            problems.append(f"{path}: must be {names}, got {type(value).__name__} {value!r}")
            continue
        message = p.check(value) if p.check else None
        if message:
            problems.append(f"{path}: {message}")
        out[key] = value
    return out


def _path(value: Any, base_dir: Path, where: str, problems: list[str]) -> Path:
    if not isinstance(value, str):
        problems.append(f"{where}: must be a path string, got {type(value).__name__} {value!r}")
        return Path()
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        problems.append(f"{where}: {path} does not exist")
    return path


def _pools_from_zoo(zoo: str, setting: str | None, base_dir: Path, problems: list[str]) -> tuple[dict, dict, Path]:
    if zoo == EMBEDDED:
        from raymerge.zoo import ensure_zoo

        manifest = ensure_zoo()
    else:
        manifest = Path(zoo).expanduser()
        manifest = manifest if manifest.is_absolute() else base_dir / manifest
        if not manifest.is_file():
            problems.append(f"zoo: manifest {manifest} does not exist")
            return {}, {}, base_dir
    settings = (yaml.safe_load(manifest.read_text()) or {}).get("settings", {})
    if setting not in settings:
        problems.append(f"setting: {setting!r} is not a setting of zoo {manifest} (has: {', '.join(settings)})")
        return {}, {}, base_dir
    return settings[setting]["model_pool"], settings[setting]["task_pool"], manifest.parent


def validate(raw: Any, source: str = "<experiment>", base_dir: Path | None = None) -> Experiment:
    """Validate a parsed experiment mapping; raise :class:`ConfigError` listing every problem found."""
    base_dir = base_dir or Path.cwd()
    problems: list[str] = []
    top = _check_fields(raw, TOP, "", problems)
    pools_dir = base_dir
    model_pool, task_pool = top.get("model_pool"), top.get("task_pool")
    if top.get("zoo"):
        if model_pool or task_pool:
            problems.append("zoo: give either zoo (with setting) or model_pool and task_pool, not both")
        model_pool, task_pool, pools_dir = _pools_from_zoo(top["zoo"], top.get("setting"), base_dir, problems)
    elif not (model_pool and task_pool):
        problems.append("model_pool, task_pool: required unless zoo and setting are given")
    mp = _check_fields(model_pool or {}, MODEL_POOL, "model_pool", problems) if model_pool else {}
    base = _path(mp["base"], pools_dir, "model_pool.base", problems) if mp.get("base") else Path()
    finetuned = {
        name: _path(p, pools_dir, f"model_pool.finetuned.{name}", problems) for name, p in (mp.get("finetuned") or {}).items()
    }
    if mp.get("architecture"):
        from raymerge.models import ModelError, encoder_config

        try:
            encoder_config(mp["architecture"])
        except ModelError as err:
            problems.append(f"model_pool.architecture: {err}")
    tasks = {}
    for name, node in (task_pool or {}).items():
        t = _check_fields(node, TASK, f"task_pool.{name}", problems)
        if not t:
            continue
        if t.get("finetuned") and t["finetuned"] not in finetuned:
            problems.append(f"task_pool.{name}.finetuned: {t['finetuned']!r} is not in model_pool.finetuned")
        where = f"task_pool.{name}"
        tasks[name] = TaskSpec(
            name=name,
            head=_path(t["head"], pools_dir, f"{where}.head", problems) if t.get("head") else Path(),
            finetuned=t.get("finetuned"),
            validation=_path(t["validation"], pools_dir, f"{where}.validation", problems) if t.get("validation") else None,
            test=_path(t["test"], pools_dir, f"{where}.test", problems) if t.get("test") else Path(),
            shifts={s: _path(p, pools_dir, f"{where}.shifts.{s}", problems) for s, p in (t.get("shifts") or {}).items()},
        )
    methods = {}
    for name, params in (top.get("methods") or {}).items():
        if name not in METHODS:
            problems.append(f"methods.{name}: unknown method (known: {', '.join(METHODS)})")
            continue
        methods[name] = _check_fields(params or {}, METHODS[name], f"methods.{name}", problems)
    resources = _check_fields(top.get("resources") or {}, RESOURCES, "resources", problems)
    sweep = None
    if top.get("sweep") is not None:
        sweep = _check_fields(top["sweep"], SWEEP, "sweep", problems)
        chosen = sweep.get("methods") or {}
        sweep["methods"] = {}
        for name, params in chosen.items():
            if name not in SWEEP_METHODS:
                problems.append(f"sweep.methods.{name}: unknown sweep method (known: {', '.join(SWEEP_METHODS)})")
                continue
            sweep["methods"][name] = _check_fields(params or {}, SWEEP_METHODS[name], f"sweep.methods.{name}", problems)
        if not any(t.finetuned for t in tasks.values()):
            problems.append("sweep: needs a multi-task pool (tasks with their own fine-tuned models)")
        unknown = [t for t in sweep.get("tasks") or [] if t not in tasks]
        if unknown:
            problems.append(f"sweep.tasks: {unknown} are not tasks of the task pool")
    if any(t.finetuned for t in tasks.values()):
        problems += [f"methods.{m}: applies to the robust setting only (one task, several fine-tuned models)"
                     for m in methods if m in ROBUST_ONLY]
    output = Path(top.get("output_dir") or f"results/{top.get('name')}").expanduser()
    if not output.is_absolute():
        if os.environ.get("RAYMERGE_RESULTS"):
            output = Path(os.environ["RAYMERGE_RESULTS"]).expanduser() / output
        elif os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # a submitted job runs in a temporary copy of its working dir: relative results would vanish with it
            problems.append(f"output_dir: {output} is relative, and under `ray job submit` the working directory is a "
                            "temporary copy; give an absolute path or set RAYMERGE_RESULTS in the job's runtime env")
        output = output if output.is_absolute() else Path.cwd() / output
    if problems:
        raise ConfigError(source, problems)
    return Experiment(
        name=top["name"],
        seed=top["seed"],
        architecture=mp["architecture"],
        base=base,
        finetuned=finetuned,
        tasks=tasks,
        methods=methods,
        resources=resources,
        output_dir=output,
        source=source,
        raw=raw,
        sweep=sweep,
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a copy of ``raw``."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", [f"{item!r}: expected KEY.PATH=VALUE"])
        dotted, value = item.split("=", 1)
        node = out
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", [f"{dotted}: {part} is not a mapping"])
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file; ``None`` loads the packaged default experiment."""
    path = Path(path) if path else Path(__file__).parent / "experiments" / "robust.yaml"
    if not path.is_file():
        raise ConfigError(str(path), [f"experiment file {path} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from err
    raw = apply_overrides(raw or {}, overrides or [])
    return validate(raw, str(path), path.parent)
