"""`ray job submit` of jobs/eval.py to a real local head, the way a user runs raymerge on a cluster.

The head is started with the README's own commands (tests/ray_head.py: token generated into a scratch HOME,
`RAY_AUTH_MODE=token ray start --head ...`, only ports, temp dir and `--block` added), so it neither touches the
user's ``~/.ray/auth_token`` nor meets any other Ray on the machine (this pytest process's ``ray_local``, other
engineers' clusters). It is stopped by signalling only the processes it started: never `ray stop`, which stops
every Ray of the user on the machine. The job is submitted with the README's `ray job submit` command.

Nothing here calls ``ray.init``: the job's driver and actors run in the head's processes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_head import run_shell, start_readme_head, stop_head, submitted_job_id
from raymerge.results import ResultStore
from raymerge.zoo import build_zoo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")

JOB_TIMEOUT_S = 600  # a bound for the failure case; the jobs take 30-120 s on 2 shared cores
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """The README's head. Its environment points RAYMERGE_CACHE at a prebuilt embedded zoo at its tiny scale (seconds
    to build, same structure), where `python jobs/eval.py` looks for the zoo, so a job with no arguments runs the
    packaged experiments without minutes of zoo building."""
    cache = tmp_path_factory.mktemp("zoo-cache")
    build_zoo(cache / "zoo-seed0", seed=0, scale="tiny")
    head = start_readme_head(authenticated=True, RAYMERGE_CACHE=str(cache))
    yield head
    stop_head(head)


def _submit(head, line: str) -> tuple[str, dict, str]:
    """Run a `ray job submit` line; the submission id, its final info and its logs."""
    submit = run_shell(line, head.env, timeout=JOB_TIMEOUT_S)
    submission_id = submitted_job_id(f"{line}\n{submit.stdout}\n{submit.stderr}")
    info = json.loads(head.request(f"/api/jobs/{submission_id}", token=head.token)[1])
    logs = head.cli("job", "logs", submission_id, "--address", head.address)
    assert logs.returncode == 0, logs.stderr
    return submission_id, info, logs.stdout


@pytest.mark.slow
def test_the_readme_command_exactly_as_typed(ray_head):
    """`ray job submit ... -- python jobs/eval.py` with no argument: the packaged experiments run, and the rows are
    where the job's last lines say, in a durable place (not the job's temporary working directory)."""
    assert ray_head.submit.split(" -- ", 1)[1] == "python jobs/eval.py"
    _, info, text = _submit(ray_head, ray_head.submit)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{text[-6000:]}"
    located = dict(re.findall(r"^(\w+): rows in (\S+), report in \S+$", text, flags=re.M))
    assert set(located) == {"robust", "multitask"}, text[-3000:]
    expected = ray_head.home / "raymerge-results" / "results" / "default"
    assert {Path(p) for p in located.values()} == {expected / "rows"}
    assert f"ray rsync-down cluster.yaml {expected}/" in text
    rows = ResultStore(expected).rows()
    assert {r["experiment"] for r in rows} == {"robust", "multitask"}
    assert {"zeroshot", "wise_ft", "dawin", "cart", "rank_sweep"} <= {r["method"] for r in rows}
    assert (expected / "REPORT.md").is_file()


@pytest.mark.slow
def test_eval_job_via_ray_job_submit(ray_head, mini_pool, tmp_path):
    head = ray_head
    assert head.request("/api/version")[0] == 401, "the test head should enforce token authentication"
    out, cache = tmp_path / "out", tmp_path / "cache"
    entrypoint = [sys.executable, "jobs/eval.py", "--config", str(mini_pool / "experiment.yaml"),
                  "--set", f"output_dir={out}", "--cache-dir", str(cache)]
    # the README's command, which waits for the job; the working dir is uploaded, mini_pool's files stay
    # outside it (absolute paths, one machine)
    submission_id, info, text = _submit(head, head.submit_command(entrypoint))
    assert info["status"] in TERMINAL, info
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{text[-6000:]}"
    status = head.cli("job", "status", submission_id, "--address", head.address, "--log-color", "false")
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr

    # the driver joined this head (RAY_ADDRESS, set by the job supervisor to the head's GCS), not a new local Ray
    assert "set in the environment variable RAY_ADDRESS" in text
    assert "Connecting to existing Ray cluster at address" in text and f":{head.ports['gcs']}..." in text
    assert "WITHOUT token authentication" not in text  # the head is authenticated: no warning
    # the table jobs/eval.py prints
    assert "== mini (robust)" in text
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.split()[:4] == ["method", "ID", "noise", "rotate"]
    for row in ("zeroshot", "finetuned model=ft1", "finetuned model=ft2", "wise_ft lam=0.5"):
        assert any(line.startswith(row) for line in text.splitlines()), row

    rows = pq.read_table(out / "rows").to_pylist()
    assert {r["method"] for r in rows} == {"zeroshot", "finetuned", "wise_ft"}
    assert {r["split"] for r in rows} == {"test", "rotate", "noise"}
    assert len(rows) == (1 + 2 + 3) * 3  # zeroshot, 2 fine-tuned, 3 WiSE-FT lambdas; each on 3 sets
    assert all(r["experiment"] == "mini" and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (out / "REPORT.md").is_file()
