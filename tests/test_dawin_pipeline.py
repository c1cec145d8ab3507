"""DaWin's two-phase pipeline on Ray actors gives the same predictions as a single-process reference."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ARCH
from raymerge import config, models, pipeline
from raymerge.data import load_dataset
from raymerge.dawin_pipeline import DawinRunner, LocalEvaluator, phase1
from raymerge.merge import interpolate
from raymerge.statedict import to_numpy


@pytest.fixture(scope="module")
def dawin_store(mini_pool, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("dawin")
    exp = config.load(mini_pool / "experiment.yaml",
                      [f"output_dir={out}", "methods={dawin: [{k: 2, offset: true}, {k: 2, offset: false}], dawin_dcs: {}, dawin_doe: {}}"])
    return pipeline.run_experiment(exp, cache_dir=out / "cache")


def test_distributed_equals_single_process(mini_pool, dawin_store):
    base = models.load_encoder_weights(ARCH, mini_pool / "base.safetensors")
    ft = models.load_encoder_weights(ARCH, mini_pool / "ft1.safetensors")
    head = models.load_head(mini_pool / "head.safetensors")
    splits = ("test", "rotate", "noise", "validation")
    sets = {("digits", s): load_dataset(mini_pool / s) for s in splits}
    local = LocalEvaluator(ARCH, {"digits": head}, sets, batch_size=64)
    pairs = [("digits", s) for s in splits[:3]]
    p1 = phase1(local, [to_numpy(base), to_numpy(ft)], pairs, {"digits": ("digits", "validation")})
    runner = DawinRunner(local, p1, lambda c: interpolate(base, ft, float(c[1])), seed=0)
    rows = {(r["method"], r["params"], r["split"]): r for r in dawin_store.rows()}
    for offset in (True, False):
        reference = runner.mixture(pairs, k=2, offset=offset)
        for pair in pairs:
            (row,) = [r for (m, p, s), r in rows.items() if m == "dawin" and f'"offset": {str(offset).lower()}' in p and s == pair[1]]
            samples = dawin_store.samples(row["key"]).to_pydict()
            assert np.array_equal(samples["prediction"], reference.predictions[pair]), (offset, pair)
            assert np.array_equal(samples["component"], reference.extras[pair]["component"])
            assert row["merges"] == len(np.unique(reference.extras[pair]["component"]))


def test_dcs_and_doe_rows_match_formulas(mini_pool, dawin_store):
    rows = dawin_store.rows()
    dcs = {r["split"]: r for r in rows if r["method"] == "dawin_dcs"}
    (mix,) = [r for r in rows if r["method"] == "dawin" and r["split"] == "test" and '"offset": true' in r["params"]]
    coeffs = np.array(dawin_store.samples(mix["key"]).to_pydict()["coefficients"])
    assert np.allclose(coeffs.sum(1), 1.0)
    assert set(dcs) == {"test", "rotate", "noise"} and all(r["merges"] == 0 for r in dcs.values())
