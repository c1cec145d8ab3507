"""The benchmark harness end to end: ``python -m bench --quick`` on a tiny zoo writes a complete report.

No speed assertions: only that every section ran, every benchmark has its table, and the numbers are finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("mixture", "dawin", "cart", "adamerging", "ties", "evaluation", "precision", "sweep")
ROW_KEYS = ("benchmark", "case", "measured_s", "baseline_s", "baseline", "ratio", "ideal", "note")


@pytest.mark.slow
def test_quick_bench_writes_every_section(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYMERGE_BENCH_ZOO")}
    env["RAYMERGE_CACHE"] = str(cache)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--zoo", "tiny", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (cache / "bench-zoo-tiny" / "manifest.yaml").is_file()  # the tiny zoo, under RAYMERGE_CACHE
    assert not (cache / "zoo-seed0").exists()  # never the full embedded zoo
    assert "section sweep: done" in proc.stderr  # progress lines go to stderr

    result = json.loads((out / "results.json").read_text())
    markdown = (out / "BENCHMARKS.md").read_text()
    assert [s["key"] for s in result["sections"]] == list(SECTIONS)
    for field in ("cpu", "cores", "torch", "ray"):
        assert result["machine"][field]
    assert result["date"] in markdown and "python -m bench --quick" in markdown
    assert result["machine"]["cpu"] in markdown

    for number, section in enumerate(result["sections"], 1):
        assert not section.get("error"), section["error"]
        assert section["rows"], section["key"]
        assert f"## {number}. {section['title']}" in markdown
        assert section["meaning"] and section["meaning"] in markdown
        for row in section["rows"]:
            assert all(key in row for key in ROW_KEYS), row
            assert f"### {row['benchmark']}" in markdown
            assert row["case"] in markdown
            for key in ("measured_s", "baseline_s", "ratio"):
                assert math.isfinite(row[key]) and row[key] > 0, (row["case"], key, row[key])
            if "value" in row:
                assert math.isfinite(row["value"]) and row["value"] > 0, (row["case"], row["value"])
            for key, value in row.items():
                if isinstance(value, float):
                    assert math.isfinite(value), (row["case"], key)
