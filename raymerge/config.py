"""Experiment files: one YAML describes the model pool, the task pool, the methods, resources and output.

Everything is validated before any work (no zoo build, no Ray start): the file's shape by pydantic models, each
method's parameters by its registered unit (:mod:`raymerge.methods`), then paths, model names and cross-references.
Every problem is collected and reported together in one :class:`ConfigError`, each with its dotted path.

An experiment either names a zoo and a setting (``zoo: embedded`` and ``setting: robust``) or spells out
``model_pool`` and ``task_pool`` itself, in the same shape as a zoo manifest's settings. Relative paths are resolved
against the file that holds them; a relative ``output_dir`` against :func:`results_root`.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raymerge import methods
from raymerge.errors import InputError
from raymerge.methods import MULTITASK, ROBUST, SWEEP, Params

EMBEDDED = "embedded"
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


class ConfigError(InputError):
    """An experiment file is invalid; ``problems`` lists every problem found, each with its dotted path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelPoolSpec(Spec):
    architecture: str = Field(description="an open_clip model name, or a config registered with raymerge")
    base: str = Field(description="the pre-trained weights θ0: any checkpoint format `raymerge import` reads, or "
                                  "open_clip:TAG for a file in open_clip's cache")
    finetuned: dict[str, str] = Field(min_length=1, description="name -> fine-tuned weights θt")
    projection_from: str | None = Field(None, description="the checkpoint whose visual projection Hugging Face "
                                                          "CLIPVisionModel fine-tunes use (default: base)")


Classes = str | list[str | int]  # a known dataset's class list, a file of class names, or names / head indices


class HeadSpec(Spec):
    """A zero-shot head built from the CLIP text tower, class names and prompt templates."""

    classes: str | list[str] = Field(description="a known dataset name, a file with one class name per line, or a list")
    templates: str | list[str] = Field(description="a known template set, a file with one template per line ({} = "
                                                   "class name), or a list")
    weights: str | None = Field(None, description="a whole CLIP with its text tower (default: model_pool.base)")


class ShiftSpec(Spec):
    data: str
    classes: Classes | None = Field(None, description="the head's classes this set is scored on (ImageNet-R: 200)")


class TaskFileSpec(Spec):
    head: str | HeadSpec
    finetuned: str | None = Field(None, description="multi-task: the model_pool.finetuned model of this task")
    validation: str | None = None
    test: str
    classes: Classes | None = Field(None, description="restrict every set of the task to these classes of its head")
    shifts: dict[str, str | ShiftSpec] = Field(default_factory=dict)


class Resources(Spec):
    """How many evaluation actors to start, what each asks Ray for, and evaluation settings."""

    num_actors: int = Field(2, ge=1)
    # fractional by default: actors hold their CPUs while alive, and the SVD tasks need room beside them
    num_cpus_per_actor: float = Field(0.5, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1, description="every batch is zero-padded to this shape (part of row keys)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="evaluation under autocast in this dtype (merges stay float32); auto: bf16 on a GPU, "
                            "fp32 on a CPU (part of row keys)")
    max_merges_in_flight: int = Field(4, ge=1, description="merged weight sets alive at once in DaWin's phase 2")
    adaptations_in_flight: int = Field(
        1, ge=1, description="test-time adaptations (AdaMerging, CART++) run at once, on different actors (at most "
                             "one each), the next ones started at an adaptation's turn; each holds θ0 and its task "
                             "vectors on the driver while it adapts, then its learned weights until they are "
                             "evaluated")
    merge_on: Literal["task", "actor"] = Field(
        "task", description="where merges are built: Ray tasks (once per merge, read by every actor from the object "
                            "store) or the actors themselves from the models they keep resident (the recipe travels, "
                            "not the weights; suits GPU nodes); the results are the same")
    # an autoscaler launching GPU nodes takes minutes; past this the job gives up with the pending demand
    start_timeout_s: float | None = Field(1800.0, gt=0, description="seconds to wait for the actors to start")


DEFAULT_SWEEP_METHODS: dict[str, Any] = {
    "weight_average": {}, "task_arithmetic": {"lambdas": [0.3]}, "ties": {}, "cart": {}, "dawin": {"k": 1},
}


class SweepSpec(Spec):
    min_size: int = Field(2, ge=1)
    max_size: int | None = Field(None, ge=1)
    tasks: list[str] | None = Field(None, description="the task pool's tasks to sweep over (default: all)")
    subsets_per_size: int | None = Field(None, ge=1, description="sample this many subsets of each size (seeded); "
                                                                 "default: all of them up to 10 tasks, 20 beyond")
    methods: dict[str, Any] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_SWEEP_METHODS))


class ExperimentSpec(Spec):
    name: str = Field(min_length=1)
    seed: int = Field(0, ge=0, lt=2**63, description="every random draw (mixtures, randomized SVDs, sampling) from it")
    zoo: str | None = Field(None, description="'embedded' or a zoo manifest path, with setting")
    setting: Literal["robust", "multitask"] | None = None
    model_pool: ModelPoolSpec | None = None
    task_pool: dict[str, TaskFileSpec] | None = None
    methods: dict[str, Any]
    resources: Resources = Field(default_factory=Resources)
    output_dir: str | None = None
    sweep: SweepSpec | None = None


@dataclass(frozen=True)
class ZeroShotHead:
    """A head to build from ``weights``' text tower (None: the model pool's base), class names and templates."""

    classes: str | tuple[str, ...]
    templates: str | tuple[str, ...]
    weights: Path | str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task: its fixed head (a file, or a zero-shot head to build), its own fine-tuned model (multi-task), its splits
    (name → dataset path) and, per split, the head's classes it is scored on (None: all of them)."""

    name: str
    head: Path | ZeroShotHead
    finetuned: str | None
    validation: Path | None
    test: Path
    shifts: dict[str, Path] = field(default_factory=dict)
    classes: dict[str, tuple[str | int, ...]] = field(default_factory=dict)

    def eval_sets(self) -> dict[str, Path]:
        """Test split first, then each shifted set: the columns of a robust-setting table."""
        return {"test": self.test, **self.shifts}


MethodConfigs = dict[str, list[Params]]  # method name -> its validated configurations, in file order


@dataclass(frozen=True)
class Sweep:
    min_size: int
    max_size: int | None
    tasks: list[str] | None
    methods: MethodConfigs
    subsets_per_size: int | None = None


@dataclass(frozen=True)
class Experiment:
    """A validated experiment, paths absolute."""

    name: str
    seed: int
    setting: str
    architecture: str
    base: Path | str  # a path, or open_clip:TAG
    finetuned: dict[str, Path | str]
    tasks: dict[str, TaskSpec]
    methods: MethodConfigs
    resources: Resources
    output_dir: Path
    source: str
    raw: dict[str, Any]
    sweep: Sweep | None = None
    projection_from: Path | str | None = None


# --- turning pydantic's errors into one line each ----------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The types a value of ``annotation`` may be, looking through Optional/Union."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    return [annotation]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (for listing its known keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
            continue
        candidates = [a for a in _unwrap(current) if typing.get_origin(a) in (dict, list)]
        if not candidates:
            return None
        current = typing.get_args(candidates[0])[-1]
    models = [a for a in _unwrap(current) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _user_loc(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...]:
    """``loc`` without pydantic's union-member tags (``str``, ``HeadSpec``, ``list[...]``): a part is kept when it is a
    key or index of the input at that depth (a task called ``Cars`` stays), or when the input stops there."""
    out, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, (dict, list)):
            out.append(part)  # a key the input lacks: the missing (or unknown) key itself
            node = None
            continue
        else:
            continue  # below a leaf or a union tag of a leaf value
        out.append(part)
    return tuple(out)


def _problems(err: ValidationError, model: type[BaseModel], where: str, raw: Any = None) -> list[str]:
    out = []
    for e in err.errors():
        loc = _user_loc(tuple(e["loc"]), raw)
        path = ".".join([where, *map(str, loc)] if where else map(str, loc)) or "file"
        if e["type"] == "extra_forbidden":
            holder = _model_at(model, loc)
            known = f" (known: {', '.join(holder.model_fields)})" if holder else ""
            out.append(f"{path}: unknown key{known}")
        elif e["type"] == "missing":
            out.append(f"{path}: required key is missing")
        else:
            out.append(f"{path}: {e['msg'][0].lower()}{e['msg'][1:]}, got {_describe(e.get('input'))}")
    return out


# --- validation --------------------------------------------------------------------------------------------------


def _fused_attention(architecture: str) -> bool:
    """Whether ``architecture``'s attention keeps q, k and v in one matrix (what ``qkv: split`` splits)."""
    import torch

    from raymerge.lowrank import is_fused_qkv
    from raymerge.models import ModelError, build_encoder

    try:
        with torch.device("meta"):
            return any(is_fused_qkv(k, v) for k, v in build_encoder(architecture).state_dict().items())
    except ModelError:
        return True  # an unknown architecture is reported on its own


def validate_methods(node: Any, where: str, setting: str | None, models: list[str] | None, problems: list[str],
                     sweep: bool = False, architecture: str | None = None) -> MethodConfigs:
    """Each ``name: params`` (or ``name: [params, ...]`` for several configurations) against its registered unit.

    ``setting`` None (unknown because of other problems) skips the setting checks; ``models`` None skips checking
    ``model`` parameters against the pool's fine-tuned models, ``architecture`` None the ``qkv`` parameters against
    the model. Problems are appended, not raised.
    """
    out: MethodConfigs = {}
    known = methods.all_methods()
    for name, value in (node or {}).items():
        unit = known.get(name)
        if unit is None:
            problems.append(f"{where}.{name}: unknown method (known: {', '.join(known)}; see `raymerge methods`)")
            continue
        configs = value if isinstance(value, list) else [{} if value is None else value]
        if not configs:
            problems.append(f"{where}.{name}: an empty list of configurations")
        out[name] = []
        for i, cfg in enumerate(configs):
            loc = f"{where}.{name}" + (f".{i}" if isinstance(value, list) else "")
            if not isinstance(cfg, dict):
                problems.append(f"{loc}: must be a mapping of parameters, got {_describe(cfg)}")
                continue
            try:
                params = unit.params.model_validate(cfg)
            except ValidationError as err:
                problems += _problems(err, unit.params, loc, cfg)
                continue
            if setting is not None:
                problems += [f"{loc}: {m}" for m in unit.problems(params, setting, sweep=sweep)]
            model = getattr(params, "model", None)
            if model is not None and models is not None and model not in models:
                problems.append(f"{loc}.model: {model!r} is not in model_pool.finetuned ({', '.join(models)})")
            if getattr(params, "qkv", None) == "split" and architecture and not _fused_attention(architecture):
                problems.append(f"{loc}.qkv: split needs fused attention weights (attn.in_proj_weight), which "
                                f"{architecture} does not have")
            out[name].append(params)
    return out


def results_root() -> Path:
    """Where a relative ``output_dir`` lands: ``$RAYMERGE_RESULTS``; else, in a job submitted with ``ray job submit``
    (whose working directory is a temporary copy), ``~/raymerge-results`` on the node that runs the driver; else the
    current directory."""
    if os.environ.get("RAYMERGE_RESULTS"):
        return Path(os.environ["RAYMERGE_RESULTS"]).expanduser()
    if os.environ.get(JOB_ENV):
        return Path.home() / "raymerge-results"
    return Path.cwd()


def _path(value: str, base_dir: Path, where: str, problems: list[str]) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        problems.append(f"{where}: {path} does not exist")
    return path


def _zoo_manifest(zoo: str, base_dir: Path, build: bool) -> Path:
    if zoo == EMBEDDED:
        from raymerge.zoo import ensure_zoo, zoo_dir

        return ensure_zoo() if build else zoo_dir() / "manifest.yaml"
    manifest = Path(zoo).expanduser()
    return manifest if manifest.is_absolute() else base_dir / manifest


def _setting_of(spec: ExperimentSpec) -> str | None:
    if spec.setting:
        return spec.setting
    if spec.task_pool:
        return MULTITASK if any(t.finetuned for t in spec.task_pool.values()) else ROBUST
    return None


def _check_shape(spec: ExperimentSpec, base_dir: Path, problems: list[str]) -> None:
    if spec.zoo:
        if spec.model_pool or spec.task_pool:
            problems.append("zoo: give either zoo (with setting) or model_pool and task_pool, not both")
        if not spec.setting:
            problems.append("setting: required with zoo (robust or multitask)")
        if spec.zoo != EMBEDDED and not _zoo_manifest(spec.zoo, base_dir, build=False).is_file():
            problems.append(f"zoo: manifest {_zoo_manifest(spec.zoo, base_dir, build=False)} does not exist")
    elif not (spec.model_pool and spec.task_pool):
        problems.append("model_pool, task_pool: required unless zoo and setting are given")
    elif spec.setting and spec.setting != _setting_of(spec.model_copy(update={"setting": None})):
        problems.append(f"setting: {spec.setting!r} does not match the task pool (tasks with a finetuned model "
                        "make a multitask pool)")


def _checkpoint(value: str, architecture: str, base_dir: Path, where: str, problems: list[str]) -> Path | str:
    """A checkpoint path (file, Hugging Face directory) or ``open_clip:TAG``, which must be in open_clip's cache."""
    from raymerge import formats
    from raymerge.errors import InputError

    if value.startswith(formats.PRETRAINED_PREFIX):
        try:
            formats.resolve_source(value, architecture)
        except InputError as err:
            problems.append(f"{where}: {err}")
        return value
    return _path(value, base_dir, where, problems)


def _classes(value: Classes | None, base_dir: Path, where: str, problems: list[str]) -> tuple[str | int, ...] | None:
    """A class subset as names or head indices; a known list's or a file's names are read now, so a wrong name is
    reported before any work."""
    from raymerge import heads
    from raymerge.errors import InputError

    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            problems.append(f"{where}: an empty list of classes")
        return tuple(value)
    local = base_dir / Path(value).expanduser()
    try:
        return heads.class_names(str(local) if local.is_file() else value)
    except InputError as err:
        problems.append(f"{where}: {err}")
        return None


def _head(value: str | HeadSpec, base_dir: Path, where: str, problems: list[str]) -> Path | ZeroShotHead:
    from raymerge import heads
    from raymerge.errors import InputError

    if isinstance(value, str):
        return _path(value, base_dir, where, problems)

    def resolve(spec: str | list[str], read, what: str) -> str | tuple[str, ...]:
        if isinstance(spec, list):
            return tuple(spec)
        local = base_dir / Path(spec).expanduser()
        spec = str(local) if local.is_file() else spec
        try:
            read(spec)
        except InputError as err:
            problems.append(f"{where}.{what}: {err}")
        return spec

    weights = None if value.weights is None else _path(value.weights, base_dir, f"{where}.weights", problems)
    return ZeroShotHead(resolve(value.classes, heads.class_names, "classes"),
                        resolve(value.templates, heads.templates, "templates"), weights)


def _check_pools(model_pool: ModelPoolSpec, task_pool: dict[str, TaskFileSpec], pools_dir: Path,
                 problems: list[str]) -> tuple[Path | str, dict[str, Path | str], dict[str, TaskSpec], Path | str | None]:
    arch = model_pool.architecture
    from raymerge.models import ModelError, encoder_config

    try:
        encoder_config(arch)
    except ModelError as err:
        problems.append(f"model_pool.architecture: {err}")
        arch = ""
    base = _checkpoint(model_pool.base, arch, pools_dir, "model_pool.base", problems)
    finetuned = {name: _checkpoint(p, arch, pools_dir, f"model_pool.finetuned.{name}", problems)
                 for name, p in model_pool.finetuned.items()}
    projection = None if model_pool.projection_from is None else _checkpoint(
        model_pool.projection_from, arch, pools_dir, "model_pool.projection_from", problems)
    tasks = {}
    for name, t in task_pool.items():
        where = f"task_pool.{name}"
        if t.finetuned and t.finetuned not in finetuned:
            problems.append(f"{where}.finetuned: {t.finetuned!r} is not in model_pool.finetuned")
        everywhere = _classes(t.classes, pools_dir, f"{where}.classes", problems)
        shifts, classes = {}, {}
        for s, shift in t.shifts.items():
            data, subset = (shift, None) if isinstance(shift, str) else (shift.data, shift.classes)
            shifts[s] = _path(data, pools_dir, f"{where}.shifts.{s}" + ("" if isinstance(shift, str) else ".data"),
                              problems)
            subset = _classes(subset, pools_dir, f"{where}.shifts.{s}.classes", problems) or everywhere
            if subset:
                classes[s] = subset
        if everywhere:
            classes.update({"test": everywhere, **({"validation": everywhere} if t.validation else {})})
        tasks[name] = TaskSpec(
            name=name,
            head=_head(t.head, pools_dir, f"{where}.head", problems),
            finetuned=t.finetuned,
            validation=_path(t.validation, pools_dir, f"{where}.validation", problems) if t.validation else None,
            test=_path(t.test, pools_dir, f"{where}.test", problems),
            shifts=shifts,
            classes=classes,
        )
    return base, finetuned, tasks, projection


def _check_selection(exp_methods: MethodConfigs, tasks: dict[str, TaskSpec], where: str, problems: list[str]) -> None:
    """Methods that select on every task's validation split need every task to have one (DaWin, which only reads a
    task's own validation split when it has one, fits no temperature without it)."""
    lacking = [t for t, spec in tasks.items() if spec.validation is None]
    for name, configs in exp_methods.items():
        unit = methods.get(name)
        if lacking and any("validation" in unit.reads_for(p).every_task for p in configs):
            problems.append(f"{where}.{name}: reads validation splits, which tasks {lacking} lack")


RESERVED_SPLITS = ("test", "validation")


def _check_names(tasks: dict[str, TaskSpec], problems: list[str]) -> None:
    """Task and shift names become parts of dataset and head names (``task/split``): no ``/``, and a shift may not
    take a split's name."""
    for name, spec in tasks.items():
        if "/" in name or name == "*":
            problems.append(f"task_pool.{name}: a task name may not contain '/' or be '*'")
        for shift in spec.shifts:
            if shift in RESERVED_SPLITS or "/" in shift or shift == "*":
                problems.append(f"task_pool.{name}.shifts.{shift}: a shift may not be called {', '.join(RESERVED_SPLITS)} "
                                "or '*', or contain '/'")


def _check_model_counts(exp_methods: MethodConfigs, models: int, where: str, problems: list[str],
                        what: str = "the pool has") -> None:
    for name in exp_methods:
        need = methods.get(name).min_models
        if models < need:
            problems.append(f"{where}.{name}: merges at least {need} fine-tuned models, {what} {models}")


@dataclass(frozen=True)
class _Checked:
    """What can be validated without the embedded zoo: the file's shape, every method's parameters, the output, and
    (for a pool the file spells out) every path."""

    spec: ExperimentSpec
    setting: str
    methods: MethodConfigs
    sweep: Sweep | None
    output_dir: Path
    pools: tuple[Path | str, dict[str, Path | str], dict[str, TaskSpec], Path | str | None] | None


def _spec(raw: Any, problems: list[str]) -> tuple[ExperimentSpec | None, set[str]]:
    """The file's shape. When parts of it are wrong, the others are still validated (so that every problem is listed
    at once): top-level keys with problems are set aside. Returns the spec (None if nothing usable) and those keys."""
    try:
        return ExperimentSpec.model_validate(raw), set()
    except ValidationError as err:
        problems += _problems(err, ExperimentSpec, "", raw)
        bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
        if not isinstance(raw, dict) or len(bad) < len({str(e["loc"][0]) if e["loc"] else "" for e in err.errors()}):
            return None, bad
        rest = {k: v for k, v in raw.items() if k not in bad} | {"name": raw.get("name") if "name" not in bad else "?"}
        rest.setdefault("methods", {})
        try:
            return ExperimentSpec.model_validate(rest), bad
        except ValidationError:
            return None, bad


def _check_file(raw: Any, source: str, base_dir: Path) -> _Checked:
    problems: list[str] = []
    spec, bad = _spec(raw, problems)
    if spec is None:
        raise ConfigError(source, problems)
    if not bad & {"zoo", "setting", "model_pool", "task_pool"}:
        _check_shape(spec, base_dir, problems)
    setting = _setting_of(spec)
    models = list(spec.model_pool.finetuned) if spec.model_pool else None
    architecture = spec.model_pool.architecture if spec.model_pool else None
    exp_methods = validate_methods(spec.methods, "methods", setting, models, problems, architecture=architecture)
    sweep = None
    if spec.sweep is not None:
        if setting != MULTITASK:
            problems.append("sweep: needs a multi-task pool (tasks with their own fine-tuned models)")
        sweep_methods = validate_methods(spec.sweep.methods, "sweep.methods", MULTITASK, models, problems, sweep=True,
                                         architecture=architecture)
        sweep = Sweep(spec.sweep.min_size, spec.sweep.max_size, spec.sweep.tasks, sweep_methods,
                      spec.sweep.subsets_per_size)
        if spec.sweep.max_size is not None and spec.sweep.max_size < spec.sweep.min_size:
            problems.append(f"sweep.max_size: {spec.sweep.max_size} is below min_size {spec.sweep.min_size}")
    pools = None
    if not spec.zoo and spec.model_pool and spec.task_pool:
        pools = _check_pools(spec.model_pool, spec.task_pool, base_dir, problems)
        _check_references(exp_methods, sweep, pools[2], len(spec.model_pool.finetuned), problems)
    output = Path(spec.output_dir or f"results/{spec.name}").expanduser()
    if problems:
        raise ConfigError(source, problems)
    return _Checked(spec, setting, exp_methods, sweep, output if output.is_absolute() else results_root() / output,
                    pools)


def _check_references(exp_methods: MethodConfigs, sweep: Sweep | None, tasks: dict[str, TaskSpec],
                      finetuned: int, problems: list[str]) -> None:
    _check_selection(exp_methods, tasks, "methods", problems)
    _check_names(tasks, problems)
    _check_model_counts(exp_methods, finetuned, "methods", problems)
    if sweep is not None:
        _check_selection(sweep.methods, tasks, "sweep.methods", problems)
        swept = sweep.tasks or list(tasks)
        unknown = [t for t in swept if t not in tasks]
        if unknown:
            problems.append(f"sweep.tasks: {unknown} are not tasks of the task pool")
        if len(set(swept)) < len(swept):
            problems.append(f"sweep.tasks: lists a task twice ({swept})")
        alone = [t for t in swept if t in tasks and not tasks[t].finetuned]
        if alone:
            problems.append(f"sweep.tasks: {alone} have no fine-tuned model (task_pool.<task>.finetuned) to merge")
        _check_model_counts(sweep.methods, sweep.min_size, "sweep.methods", problems, "sweep.min_size is")


def validate(raw: Any, source: str = "<experiment>", base_dir: Path | None = None) -> Experiment:
    """Validate a parsed experiment mapping; raise :class:`ConfigError` listing every problem found.

    Everything that can be checked without the embedded zoo is checked first; only then is the zoo built (minutes,
    once) and its pools checked like a user's.
    """
    base_dir = base_dir or Path.cwd()
    checked = _check_file(raw, source, base_dir)
    spec, setting, exp_methods = checked.spec, checked.setting, checked.methods
    architecture = spec.model_pool.architecture if spec.model_pool else ""
    if checked.pools is not None:
        base, finetuned, tasks, projection = checked.pools
    else:
        problems: list[str] = []
        manifest = _zoo_manifest(spec.zoo, base_dir, build=True)
        settings = (yaml.safe_load(manifest.read_text()) or {}).get("settings", {})
        if setting not in settings:
            raise ConfigError(source, [f"setting: {setting!r} is not a setting of zoo {manifest} (has: {', '.join(settings)})"])
        model_pool = ModelPoolSpec.model_validate(settings[setting]["model_pool"])
        task_pool = {n: TaskFileSpec.model_validate(t) for n, t in settings[setting]["task_pool"].items()}
        architecture = model_pool.architecture
        # `model` parameters can be checked only now that the zoo's model names are known
        exp_methods = validate_methods(spec.methods, "methods", setting, list(model_pool.finetuned), problems,
                                       architecture=architecture)
        base, finetuned, tasks, projection = _check_pools(model_pool, task_pool, manifest.parent, problems)
        _check_references(exp_methods, checked.sweep, tasks, len(model_pool.finetuned), problems)
        if problems:
            raise ConfigError(source, problems)
    return Experiment(
        name=spec.name, seed=spec.seed, setting=setting, architecture=architecture, base=base,
        finetuned=finetuned, tasks=tasks, methods=exp_methods, resources=spec.resources, output_dir=checked.output_dir,
        source=source, raw=raw, sweep=checked.sweep, projection_from=projection,
    )


def apply_overrides(raw: Any, overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a copy of ``raw``; a numeric part indexes a list
    (``methods.cart.0.lam=2``)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"file: an experiment must be a mapping of keys, got {_describe(raw)}"])
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE")
            continue
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problems.append(f"--set {dotted}: the value is not valid YAML ({err})")
            continue
        node: Any = out
        parts = dotted.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                problems.append(f"--set {dotted}: {'.'.join(parts[:depth]) or 'the file'} is not a mapping"
                                + (" (index a list with a number)" if isinstance(node, list) else ""))
                break
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
    if problems:
        raise ConfigError(source, problems)
    return out


def _read(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], Path]:
    path = Path(path) if path else Path(__file__).parent / "experiments" / "robust.yaml"
    if not path.is_file():
        raise ConfigError(str(path), [f"experiment file {path} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from err
    return apply_overrides({} if raw is None else raw, overrides or [], str(path)), path


def check(path: str | Path | None = None, overrides: list[str] | None = None) -> None:
    """Everything :func:`load` checks before it would build the embedded zoo: run it on every file of a job first,
    so that a problem in the second file wastes no zoo build for the first."""
    raw, path = _read(path, overrides)
    _check_file(raw, str(path), path.parent)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file; ``None`` loads the packaged robust experiment."""
    raw, path = _read(path, overrides)
    return validate(raw, str(path), path.parent)
