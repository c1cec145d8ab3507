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
import sys

import pyarrow.parquet as pq
import pytest

from ray_head import run_shell, start_readme_head, stop_head, submitted_job_id

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")

JOB_TIMEOUT_S = 300  # a bound for the failure case; the job itself takes ~30 s on 2 shared cores
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def ray_head():
    head = start_readme_head(authenticated=True)
    yield head
    stop_head(head)


@pytest.mark.slow
def test_eval_job_via_ray_job_submit(ray_head, mini_pool, tmp_path):
    head = ray_head
    assert head.request("/api/version")[0] == 401, "the test head should enforce token authentication"
    out, cache = tmp_path / "out", tmp_path / "cache"
    entrypoint = [sys.executable, "jobs/eval.py", "--config", str(mini_pool / "experiment.yaml"),
                  "--set", f"output_dir={out}", "--cache-dir", str(cache)]
    # the README's command, which waits for the job; the working dir is uploaded, mini_pool's files stay
    # outside it (absolute paths, one machine)
    line = head.submit_command(entrypoint)
    submit = run_shell(line, head.env, timeout=JOB_TIMEOUT_S)
    submission_id = submitted_job_id(f"{line}\n{submit.stdout}\n{submit.stderr}")
    info = json.loads(head.request(f"/api/jobs/{submission_id}", token=head.token)[1])
    assert info["status"] in TERMINAL, info

    logs = head.cli("job", "logs", submission_id, "--address", head.address)
    assert logs.returncode == 0, logs.stderr
    text = logs.stdout
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
