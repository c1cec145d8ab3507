"""The method registry: one unit per method, read by validation, sweeps, row keys and the docs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import ARCH, random_dataset, random_encoder
from raymerge import config, merge, methods, models
from raymerge.dawin_pipeline import LocalEvaluator
from raymerge.methods import MULTITASK, ROBUST, Pool, Recipe
from raymerge.pipeline import LoadedTask, Run
from raymerge.results import ResultStore, row_key
from raymerge.statedict import state_dict_hash, to_numpy
from raymerge.workers import Resources, evaluate_local

REPO = Path(__file__).resolve().parents[1]
BATCH = 32


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- a small world of state dicts and data, evaluated in one process --------------------------------------------


def _world(setting: str) -> tuple[Pool, Run]:
    """A pool of θ0 and three fine-tunes and the Run whose key function rows use (no Ray, no files)."""
    base = random_encoder(0)
    finetuned = {f"ft{i}": random_encoder(i, base, scale=0.05) for i in (1, 2, 3)}
    torch.manual_seed(7)
    if setting == ROBUST:
        tasks = {"digits": (None, ("test", "shift", "validation"))}
    else:
        tasks = {f"t{i}": (f"ft{i}", ("test", "validation")) for i in (1, 2, 3)}
    heads, sets, loaded = {}, {}, {}
    for j, (task, (model, splits)) in enumerate(tasks.items()):
        heads[task] = models.Head(torch.randn(5, 64), None, tuple("abcde"))
        data = {s: random_dataset(10 * j + i, 64, 5, f"{task}/{s}") for i, s in enumerate(splits)}
        sets |= {(task, s): ds for s, ds in data.items()}
        head_hash = heads[task].hash
        loaded[task] = LoadedTask(task, data, dict.fromkeys(data, heads[task]), dict.fromkeys(["*", *data], head_hash), model)
    evaluator = LocalEvaluator(ARCH, heads, sets, BATCH, {"base": base, **finetuned})
    pool = Pool(setting=setting, seed=0, base=base, finetuned=finetuned, tasks=list(tasks),
                splits={t: [s for s in splits if s != "validation"] for t, (_, splits) in tasks.items()},
                validation={t: True for t in tasks}, task_models={t: m for t, (m, _) in tasks.items()},
                evaluator=evaluator)
    run = Run(exp=SimpleNamespace(seed=0, architecture=ARCH, name="x", setting=setting), base=base,
              finetuned=finetuned, tasks=loaded, pool=SimpleNamespace(resources=Resources(batch_size=BATCH), precision="fp32"),
              cache=None, store=None,
              model_hashes={"base": state_dict_hash(base), **{n: state_dict_hash(sd) for n, sd in finetuned.items()}})
    return pool, run


@pytest.fixture(scope="module")
def worlds(ray_local):
    return {ROBUST: _world(ROBUST), MULTITASK: _world(MULTITASK)}


def _keys(run: Run, unit, params, pool: Pool) -> list[set[str]]:
    """Row keys of each candidate of ``unit`` with ``params`` (no work done: candidates are descriptions)."""
    return [{row_key(run.identity(unit, params, c, pool, unit.name, pair)) for pair in pool.eval_pairs(c.tasks)}
            for c in unit.candidates(pool, params)]


def _results(unit, params, pool: Pool) -> list:
    """What each candidate evaluates to: its merged weights, or its predictions and per-sample extras."""
    out, models = [], {"base": pool.base, **pool.finetuned}
    for c in unit.candidates(pool, params):
        if c.recipe is not None or c.build is not None:
            weights = c.recipe or c.build()
            out.append(to_numpy(weights.build(models) if isinstance(weights, Recipe) else weights))
        else:
            pred = c.predict(pool.eval_pairs(c.tasks))
            out.append({f"{p}": (pred.outputs[p], *pred.extras.get(p, {}).values()) for p in pred.outputs})
    return out


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return np.shape(a) == np.shape(b) and np.array_equal(a, b)


# Every declared parameter of every method, with the setting it acts in, the configuration it is changed from
# and the change. A parameter added to a unit without a line here fails test_the_table_covers_every_parameter.
CHANGES: dict[tuple[str, str], tuple[str, dict, dict]] = {
    ("wise_ft", "lambdas"): (ROBUST, {}, {"lambdas": [0.35]}),
    ("wise_ft", "model"): (ROBUST, {}, {"model": "ft2"}),
    ("task_arithmetic", "lambdas"): (MULTITASK, {}, {"lambdas": [0.45]}),
    ("ties", "lam"): (MULTITASK, {}, {"lam": 0.7}),
    ("ties", "density"): (MULTITASK, {}, {"density": 0.5}),
    ("cart", "rank_ratio"): (MULTITASK, {}, {"rank_ratio": 0.3}),
    ("cart", "lam"): (MULTITASK, {}, {"lam": 1.5}),
    ("cart", "svd"): (MULTITASK, {}, {"svd": "randomized"}),
    ("rank_sweep", "rank_ratios"): (MULTITASK, {}, {"rank_ratios": [0.3]}),
    ("rank_sweep", "cart_lam"): (MULTITASK, {"rank_ratios": [0.2]}, {"cart_lam": 1.5}),
    ("rank_sweep", "task_arithmetic_lam"): (MULTITASK, {"rank_ratios": [0.2]}, {"task_arithmetic_lam": 0.5}),
    ("rank_sweep", "svd"): (MULTITASK, {"rank_ratios": [0.2]}, {"svd": "randomized"}),
    ("dawin", "k"): (ROBUST, {}, {"k": 2}),
    ("dawin", "mixture"): (ROBUST, {}, {"mixture": "none"}),
    ("dawin", "offset"): (ROBUST, {}, {"offset": False}),
    ("dawin", "lam0"): (MULTITASK, {}, {"lam0": 0.5}),
    ("dawin", "scores"): (ROBUST, {"mixture": "none"}, {"scores": "oracle"}),
    ("dawin", "model"): (ROBUST, {}, {"model": "ft2"}),
    ("dawin_dcs", "offset"): (ROBUST, {}, {"offset": False}),
    ("dawin_dcs", "model"): (ROBUST, {}, {"model": "ft2"}),
    ("dawin_doe", "offset"): (ROBUST, {}, {"offset": False}),
    ("dawin_doe", "model"): (ROBUST, {}, {"model": "ft2"}),
    ("output_ensemble", "model"): (ROBUST, {}, {"model": "ft2"}),
    ("cart", "qkv"): (MULTITASK, {}, {"qkv": "split"}),
    ("rank_sweep", "qkv"): (MULTITASK, {"rank_ratios": [0.2]}, {"qkv": "split"}),
    ("tsv_merge", "lam"): (MULTITASK, {}, {"lam": 0.5}),
    ("tsv_merge", "qkv"): (MULTITASK, {}, {"qkv": "split"}),
    ("iso_c", "lam"): (MULTITASK, {}, {"lam": 0.5}),
    ("iso_c", "qkv"): (MULTITASK, {}, {"qkv": "split"}),
    ("iso_cts", "lam"): (MULTITASK, {}, {"lam": 0.5}),
    ("iso_cts", "common_space_fraction"): (MULTITASK, {}, {"common_space_fraction": 0.5}),
    ("iso_cts", "qkv"): (MULTITASK, {}, {"qkv": "split"}),
    **{("adamerging", name): (MULTITASK, {"steps": 3}, change) for name, change in (
        ("granularity", {"granularity": "task"}), ("steps", {"steps": 4}), ("lr", {"lr": 0.01}),
        ("batch_size", {"batch_size": 8}), ("batches_per_step", {"batches_per_step": 1}), ("init", {"init": 0.5}))},
    **{("cart_pp", name): (MULTITASK, {"steps": 2}, change) for name, change in (
        ("granularity", {"granularity": "task"}), ("steps", {"steps": 3}), ("lr", {"lr": 0.01}),
        ("batch_size", {"batch_size": 8}), ("batches_per_step", {"batches_per_step": 1}),
        ("rank_ratio", {"rank_ratio": 0.3}), ("lam", {"lam": 1.5}), ("svd", {"svd": "randomized"}),
        ("qkv", {"qkv": "split"}))},
}


def test_the_table_covers_every_parameter():
    declared = {(name, p) for name, unit in methods.all_methods().items() for p in unit.params.model_fields}
    assert declared == set(CHANGES)


@pytest.mark.parametrize("method, param", sorted(CHANGES))
def test_every_parameter_changes_the_key_and_the_result(worlds, method, param):
    setting, start, change = CHANGES[(method, param)]
    pool, run = worlds[setting]
    unit = methods.get(method)
    before, after = unit.params.model_validate(start), unit.params.model_validate(start | change)
    assert not unit.problems(before, setting) and not unit.problems(after, setting)
    keys_before, keys_after = _keys(run, unit, before, pool), _keys(run, unit, after, pool)
    assert set().union(*keys_after) - set().union(*keys_before), "no new row key"
    results_before, results_after = _results(unit, before, pool), _results(unit, after, pool)
    assert any(not _same(a, b) for a, b in zip(results_before, results_after)), "the math did not change"


def test_the_seed_is_in_the_key_exactly_when_a_method_is_random(worlds):
    pool, run = worlds[MULTITASK]
    for name, params, random in (("cart", {"svd": "randomized"}, True), ("cart", {}, False), ("ties", {}, False),
                                 ("dawin", {"mixture": "dirichlet"}, True), ("dawin", {}, False),
                                 ("adamerging", {}, True), ("tsv_merge", {}, False)):
        unit = methods.get(name)
        p = unit.params.model_validate(params)
        keys = _keys(run, unit, p, pool)
        run.exp.seed = 1
        try:
            reseeded = _keys(run, unit, p, pool)
        finally:
            run.exp.seed = 0
        assert (keys != reseeded) == random, (name, params)


# --- a toy method, added in one file -------------------------------------------------------------------------------


@pytest.fixture()
def toy_method():
    sys.path.insert(0, str(Path(__file__).parent))
    import toy_method

    yield toy_method
    methods.REGISTRY.pop("toy_blend")
    sys.modules.pop("toy_method")
    sys.path.remove(str(Path(__file__).parent))


def test_a_toy_method_runs_through_the_eval_job_and_a_sweep(toy_method, mini_pool, tiny_zoo, ray_local, tmp_path, capsys):
    raw = yaml.safe_load((mini_pool / "experiment.yaml").read_text())
    raw |= {"methods": {"toy_blend": [{}, {"alpha": 0.75}]}, "output_dir": str(tmp_path / "eval")}
    experiment = mini_pool / f"toy-{tmp_path.name}.yaml"  # beside the pool: its paths are relative to the file
    experiment.write_text(yaml.safe_dump(raw))
    assert _job("eval").main(["--config", str(experiment), "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = {(r["params"], r["split"]): r for r in ResultStore(tmp_path / "eval").rows()}
    base = models.load_encoder_weights(ARCH, mini_pool / "base.safetensors")
    fts = [models.load_encoder_weights(ARCH, mini_pool / f"ft{i}.safetensors") for i in (1, 2)]
    head = models.load_head(mini_pool / "head.safetensors")
    from raymerge.data import load_dataset

    for alpha in (0.25, 0.75):
        blend = {k: alpha * base[k] + (1 - alpha) * (fts[0][k] + fts[1][k]) / 2 for k in base}  # by hand
        for split in ("test", "rotate", "noise"):
            ds = load_dataset(mini_pool / split)
            expected = np.mean(evaluate_local(ARCH, to_numpy(blend), head, ds, 64).argmax(1) == ds.labels)
            assert rows[(f'{{"alpha": {alpha}}}', split)]["accuracy"] == pytest.approx(expected, abs=1e-9)

    settings = yaml.safe_load(tiny_zoo.read_text())["settings"]["multitask"]
    sweep = {"name": "toy-sweep", "zoo": str(tiny_zoo), "setting": "multitask", "methods": {},
             "sweep": {"tasks": list(settings["task_pool"])[:3], "methods": {"toy_blend": {"alpha": 0.5}}},
             "resources": {"num_actors": 2, "batch_size": 32}, "output_dir": str(tmp_path / "sweep")}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert _job("sweep").main(["--config", str(tmp_path / "sweep.yaml"), "--cache-dir", str(tmp_path / "cache")]) == 0
    swept = ResultStore(tmp_path / "sweep").rows()
    assert {r["method"] for r in swept} == {"sweep/toy_blend"}
    assert len(swept) == 3 * 2 + 3  # three pairs of two tasks and one triple, each row a (subset, task)


# --- docs and the bad-input path -----------------------------------------------------------------------------------


def test_the_cli_and_the_readme_table_list_every_method():
    listing = subprocess.run([sys.executable, "-m", "raymerge.cli", "methods"], capture_output=True, text=True, check=True).stdout
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- methods-table: begin -->\n", 1)[1].split("<!-- methods-table: end -->", 1)[0]
    assert table == methods.markdown_table(), "README's method table is stale: paste raymerge.methods.markdown_table()"
    for name, unit in methods.all_methods().items():
        assert f"\n{name}: {unit.summary}\n" in f"\n{listing}"
        assert f"| `{name}`: {unit.summary} |" in table
        for p in unit.params.model_fields:
            assert f"  {p}: " in f"\n{listing}".split(f"\n{name}: ", 1)[1].split("\n\n", 1)[0], (name, p)


def test_a_config_error_builds_no_zoo_and_starts_no_ray(tmp_path):
    """Run as a user would: a typo in a method parameter of an embedded-zoo experiment, in a fresh process."""
    experiment = tmp_path / "typo.yaml"
    experiment.write_text(yaml.safe_dump({"name": "typo", "zoo": "embedded", "setting": "multitask",
                                          "methods": {"cart": {"rank_ratio": "abc"}, "ties": {"densty": 0.2}}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYMERGE_CACHE": str(tmp_path / "cache"),
                                                                          "RAY_TMPDIR": str(tmp_path / "ray")}
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "eval.py"), "--config", str(experiment)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "methods.cart.rank_ratio: input should be a valid number, got str 'abc'" in done.stderr
    assert "methods.ties.densty: unknown key (known: lam, density)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # no zoo built, nothing cached
    assert not (tmp_path / "ray").exists()  # no Ray session started
