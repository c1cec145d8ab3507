"""Both jobs turn every error a user can fix into one line on stderr and exit code 2, never a traceback; others
(bugs) still raise with their traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raymerge import cluster, pipeline, sweep
from raymerge.config import ConfigError
from raymerge.data import DatasetError
from raymerge.errors import input_errors

REPO = Path(__file__).resolve().parents[1]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instance(cls: type[Exception]) -> Exception:
    return cls("f.yaml", ["x.y: bad value 7"]) if cls is ConfigError else cls("bad value 7 in f.yaml")


USER_ERRORS = sorted({*input_errors(), DatasetError, cluster.ClusterError, cluster.ClusterResourceError},
                     key=lambda c: c.__name__)


@pytest.mark.parametrize("job, target", [("eval", (pipeline, "run_experiment")), ("sweep", (sweep, "run_sweep"))])
@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda c: c.__name__)
def test_user_errors_exit_2_with_one_message(mini_pool, monkeypatch, capsys, job, target, error):
    def fail(*args, **kwargs):
        raise _instance(error)

    monkeypatch.setattr(*target, fail)
    assert _job(job).main(["--config", str(mini_pool / "experiment.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad value 7" in err and "Traceback" not in err
    assert err.count("error: ") == 1


def test_a_bug_is_not_hidden(mini_pool, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(pipeline, "run_experiment", bug)
    with pytest.raises(KeyError):
        _job("eval").main(["--config", str(mini_pool / "experiment.yaml")])
