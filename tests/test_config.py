"""Experiment-file validation: every problem listed at once, with its dotted path, before any work."""

from __future__ import annotations

import pytest
import yaml

from raymerge import config, methods


def _raw(mini_pool):
    return yaml.safe_load((mini_pool / "experiment.yaml").read_text())


def _problems(raw: dict, mini_pool) -> str:
    """The one message validating ``raw`` must fail with."""
    with pytest.raises(config.ConfigError) as info:
        config.validate(raw, "exp.yaml", mini_pool)
    return str(info.value)


def test_valid_file_loads_with_defaults(mini_pool):
    exp = config.load(mini_pool / "experiment.yaml")
    assert exp.setting == "robust"
    [wise] = exp.methods["wise_ft"]
    assert wise.lambdas == [0.0, 0.5, 1.0] and wise.model is None
    assert exp.tasks["digits"].eval_sets() == {"test": mini_pool / "test", "rotate": mini_pool / "rotate", "noise": mini_pool / "noise"}
    assert exp.resources.num_gpus_per_actor == 0.0 and exp.resources.batch_size == 64


def test_every_problem_is_listed(mini_pool):
    raw = _raw(mini_pool)
    raw["methods"]["wise_ft"]["lambda"] = [0.5]             # unknown key (typo)
    raw["methods"]["tiess"] = {}                           # unknown method
    raw["resources"]["batch_size"] = "big"                 # wrong type
    raw["model_pool"]["finetuned"]["ft3"] = "missing.safetensors"  # missing file
    raw["methods"]["ties"] = {"density": 0}                # out of range
    raw["bogus"] = 1                                       # unknown top-level key
    text = _problems(raw, mini_pool)
    assert "6 problem(s)" in text
    assert "resources.batch_size: input should be a valid integer, got str 'big'" in text
    assert "bogus: unknown key (known: name, seed, zoo" in text
    assert "methods.wise_ft.lambda: unknown key (known: lambdas, model)" in text
    assert "methods.tiess: unknown method (known: " in text
    assert "methods.ties.density: input should be greater than 0, got int 0" in text
    assert "model_pool.finetuned.ft3:" in text and "missing.safetensors does not exist" in text


def test_value_checks(mini_pool):
    raw = _raw(mini_pool) | {"methods": {
        "wise_ft": {"lambdas": [0.1, "x"], "model": "ft9"},
        "dawin": [{"k": 0}, {"mixture": "gauss"}, {"scores": "oracle"}],
        "ties": {"lam": float("nan")},
    }}
    raw["model_pool"]["architecture"] = "ViT-Q-99"
    text = _problems(raw, mini_pool)
    assert "methods.wise_ft.lambdas.1: input should be a valid number, got str 'x'" in text
    assert "methods.dawin.0.k: input should be greater than or equal to 1, got int 0" in text
    assert "methods.dawin.1.mixture: input should be 'auto', 'beta', 'dirichlet', 'mean' or 'none', got str 'gauss'" in text
    assert "methods.dawin.2: scores: the oracle is a per-sample upper bound; use it with mixture: none" in text
    assert "methods.ties.lam: input should be a finite number, got float nan" in text
    assert "model_pool.architecture: unknown model name 'ViT-Q-99'" in text
    raw["methods"] = {"wise_ft": {"model": "ft9"}}
    with pytest.raises(config.ConfigError, match=r"methods.wise_ft.model: 'ft9' is not in model_pool.finetuned \(ft1, ft2\)"):
        config.validate(raw, "exp.yaml", mini_pool)


def test_settings_are_checked(mini_pool):
    raw = _raw(mini_pool) | {"methods": {"rank_sweep": {}, "dawin": {"mixture": "dirichlet"}}}
    text = _problems(raw, mini_pool)
    assert "methods.rank_sweep: applies to the multitask setting(s), not to robust" in text
    raw["sweep"] = {"methods": {"wise_ft": {}}}
    text = _problems(raw, mini_pool)
    assert "sweep: needs a multi-task pool" in text
    assert "sweep.methods.wise_ft: applies to the robust setting(s), not to a sweep" in text


def test_overrides(mini_pool):
    exp = config.load(mini_pool / "experiment.yaml", ["methods.wise_ft.lambdas=[0.25]", "resources.num_actors=1"])
    assert exp.methods["wise_ft"][0].lambdas == [0.25] and exp.resources.num_actors == 1
    exp = config.load(mini_pool / "experiment.yaml", ["methods.ties=[{lam: 0.5}, {lam: 1.0}]", "methods.ties.1.density=0.5"])
    assert [(p.lam, p.density) for p in exp.methods["ties"]] == [(0.5, 0.2), (1.0, 0.5)]
    with pytest.raises(config.ConfigError, match="expected KEY.PATH=VALUE"):
        config.load(mini_pool / "experiment.yaml", ["methods.wise_ft.lambdas"])
    with pytest.raises(config.ConfigError, match="methods.cart.rank_ratio: input should be a valid number, got str 'abc'"):
        config.load(mini_pool / "experiment.yaml", ["methods.cart.rank_ratio=abc"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(mini_pool / "nope.yaml")


def test_a_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    with pytest.raises(config.ConfigError, match="an experiment must be a mapping of keys, got list"):
        config.load(path, ["seed=1"])
    with pytest.raises(config.ConfigError, match="file: an experiment must be a mapping of keys, got list"):
        config.load(path)


def test_relative_output_dir(mini_pool, monkeypatch, tmp_path):
    raw = _raw(mini_pool) | {"output_dir": "results/x"}
    monkeypatch.delenv("RAYMERGE_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.validate(raw, "exp.yaml", mini_pool).output_dir == tmp_path / "results" / "x"
    # a submitted job runs in a temporary copy of its working dir: results go to a durable place instead
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.validate(raw, "exp.yaml", mini_pool).output_dir == tmp_path / "home" / "raymerge-results" / "results" / "x"
    monkeypatch.setenv("RAYMERGE_RESULTS", str(tmp_path / "shared"))
    assert config.validate(raw, "exp.yaml", mini_pool).output_dir == tmp_path / "shared" / "results" / "x"


def test_every_method_validates_its_defaults_and_rejects_unknown_keys():
    for name, unit in methods.all_methods().items():
        params = unit.params.model_validate({})
        record = params.record()
        assert set(record) == set(unit.params.model_fields), name
        with pytest.raises(Exception, match="Extra inputs are not permitted"):
            unit.params.model_validate({"no_such_parameter": 1})


def test_defaults_are_the_math_functions_own():
    import inspect

    from raymerge import cart, merge

    [ties] = [methods.get("ties").params()]
    signature = inspect.signature(merge.ties).parameters
    assert (ties.lam, ties.density) == (signature["lam"].default, signature["density"].default)
    c = methods.get("cart").params()
    signature = inspect.signature(cart.cart).parameters
    assert (c.rank_ratio, c.lam, c.svd) == (signature["rank_ratio"].default, signature["lam"].default, signature["svd"].default)
    from raymerge.workers import Resources

    assert Resources is config.Resources  # one definition of the resources and their defaults


def test_adaptation_and_low_rank_parameters_are_checked(mini_pool):
    raw = _raw(mini_pool)
    raw["model_pool"]["finetuned"] = {"ft1": "ft1.safetensors"}
    raw["task_pool"]["digits"]["finetuned"] = "ft1"  # a (one-task) multi-task pool
    raw["methods"] = {"adamerging": {"lr": 0, "steps": 0}, "cart_pp": {"batch_size": -1}, "iso_cts": {"common_space_fraction": 0}}
    text = _problems(raw, mini_pool)
    assert "methods.adamerging.lr: input should be greater than 0, got int 0" in text
    assert "methods.adamerging.steps: input should be greater than or equal to 1, got int 0" in text
    assert "methods.cart_pp.batch_size: input should be greater than or equal to 1, got int -1" in text
    assert "methods.iso_cts.common_space_fraction: input should be greater than 0, got int 0" in text
    # a ResNet's attention pool keeps q, k and v apart: there is nothing to split
    raw["model_pool"]["architecture"] = "RN50"
    raw["methods"] = {"cart": {"qkv": "split"}, "tsv_merge": {"qkv": "fused"}}
    text = _problems(raw, mini_pool)
    assert "methods.cart.qkv: split needs fused attention weights (attn.in_proj_weight), which RN50 does not have" in text
    assert "tsv_merge" not in text.split("RN50 does not have")[1]


def test_names_counts_and_seeds_that_would_fail_later_are_refused_now(mini_pool):
    raw = _raw(mini_pool)
    raw["task_pool"]["Cars"] = {"head": "head.safetensors", "tset": "test"}  # a benchmark-style capitalized name
    raw["task_pool"]["digits"]["shifts"]["test"] = "rotate"
    raw["seed"] = -1
    text = _problems(raw, mini_pool)
    assert "task_pool.Cars.test: required key is missing" in text
    assert "task_pool.Cars.tset: unknown key (known: head, finetuned, validation, test, classes, shifts)" in text
    assert "seed: input should be greater than or equal to 0, got int -1" in text
    raw = _raw(mini_pool)
    raw["task_pool"]["digits"]["shifts"]["validation"] = "rotate"
    raw["methods"] = {"model_stock": {}}
    raw["model_pool"]["finetuned"] = {"ft1": "ft1.safetensors"}
    text = _problems(raw, mini_pool)
    assert "task_pool.digits.shifts.validation: a shift may not be called test, validation" in text
    assert "methods.model_stock: merges at least 2 fine-tuned models, the pool has 1" in text


def test_sweep_tasks_need_their_models_and_enough_of_them(mini_pool):
    raw = _raw(mini_pool)
    raw["task_pool"]["digits"]["finetuned"] = "ft1"
    raw["task_pool"]["other"] = {"head": "head.safetensors", "test": "test"}  # no fine-tuned model of its own
    raw["methods"] = {}
    raw["sweep"] = {"tasks": ["digits", "other", "digits"], "min_size": 1, "methods": {"cart": {}, "ties": {}}}
    text = _problems(raw, mini_pool)
    assert "sweep.tasks: lists a task twice" in text
    assert "sweep.tasks: ['other'] have no fine-tuned model" in text
    assert "sweep.methods.cart: merges at least 2 fine-tuned models, sweep.min_size is 1" in text
    assert "sweep.methods.ties" not in text
