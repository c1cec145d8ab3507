"""Experiment-file validation: every problem listed at once, before Ray starts."""

from __future__ import annotations

import pytest
import yaml

from raymerge import config


def _raw(mini_pool):
    return yaml.safe_load((mini_pool / "experiment.yaml").read_text())


def test_valid_file_loads_with_defaults(mini_pool):
    exp = config.load(mini_pool / "experiment.yaml")
    assert exp.setting == "robust"
    assert exp.methods["wise_ft"]["lambdas"] == [0.0, 0.5, 1.0]
    assert exp.tasks["digits"].eval_sets() == {"test": mini_pool / "test", "rotate": mini_pool / "rotate", "noise": mini_pool / "noise"}
    assert exp.resources["num_gpus_per_actor"] == 0.0


def test_every_problem_is_listed(mini_pool):
    raw = _raw(mini_pool)
    raw["methods"]["wise_ft"]["lambda"] = [0.5]             # unknown key (typo)
    raw["methods"]["tiess"] = {}                           # unknown method
    raw["resources"]["batch_size"] = "big"                 # wrong type
    raw["model_pool"]["finetuned"]["ft3"] = "missing.safetensors"  # missing file
    raw["bogus"] = 1                                       # unknown top-level key
    with pytest.raises(config.ConfigError) as info:
        config.validate(raw, "exp.yaml", mini_pool)
    text = str(info.value)
    assert "5 problem(s)" in text
    assert "methods.wise_ft.lambda: unknown key" in text
    assert "methods.tiess: unknown method" in text
    assert "resources.batch_size: must be int, got str 'big'" in text
    assert "model_pool.finetuned.ft3:" in text and "missing.safetensors does not exist" in text
    assert "bogus: unknown key" in text


def test_value_checks(mini_pool):
    raw = _raw(mini_pool)
    raw["methods"]["cart"] = {"configs": [{"rank_ratio": 1.5}]}
    raw["methods"]["ties"] = {"density": 0}
    raw["model_pool"]["architecture"] = "ViT-Q-99"
    with pytest.raises(config.ConfigError) as info:
        config.validate(raw, "exp.yaml", mini_pool)
    text = str(info.value)
    assert "methods.cart.configs: entry 0: rank_ratio must be in [0, 1], got 1.5" in text
    assert "methods.ties.density: must be in (0, 1], got 0" in text
    assert "model_pool.architecture: unknown model name 'ViT-Q-99'" in text


def test_overrides(mini_pool):
    exp = config.load(mini_pool / "experiment.yaml", ["methods.wise_ft.lambdas=[0.25]", "resources.num_actors=1"])
    assert exp.methods["wise_ft"]["lambdas"] == [0.25] and exp.resources["num_actors"] == 1
    with pytest.raises(config.ConfigError, match="expected KEY.PATH=VALUE"):
        config.load(mini_pool / "experiment.yaml", ["methods.wise_ft.lambdas"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(mini_pool / "nope.yaml")


def test_relative_output_dir_under_a_submitted_job(mini_pool, monkeypatch, tmp_path):
    raw = _raw(mini_pool) | {"output_dir": "results/x"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(config.ConfigError, match="output_dir: results/x is relative, and under `ray job submit`"):
        config.validate(raw, "exp.yaml", mini_pool)
    monkeypatch.setenv("RAYMERGE_RESULTS", str(tmp_path))
    assert config.validate(raw, "exp.yaml", mini_pool).output_dir == tmp_path / "results" / "x"


def test_svd_is_checked_wherever_it_appears(mini_pool):
    raw = _raw(mini_pool)
    raw["methods"]["rank_sweep"] = {"svd": "fast"}
    with pytest.raises(config.ConfigError, match="methods.rank_sweep.svd: must be exact or randomized, got 'fast'"):
        config.validate(raw, "exp.yaml", mini_pool)
