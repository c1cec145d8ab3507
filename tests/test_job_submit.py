"""`ray job submit` of jobs/eval.py to a real local head, the way a user runs raymerge on a cluster.

The head is started with `ray start --head --block` in its own process group, on free ports and its own
``--temp-dir``, with token authentication (RAY-NOTES.md) and a token of its own passed by environment, so it
neither touches ``~/.ray/auth_token`` nor meets any other Ray on the machine (this pytest process's
``ray_local``, other engineers' clusters). It is stopped by signalling only the processes it started: never
`ray stop`, which stops every Ray of the user on the machine.

Nothing here calls ``ray.init``: the job's driver and actors run in the head's processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")

REPO = Path(__file__).resolve().parents[1]
HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 300  # a bound for the failure case; the job itself takes ~30 s on 2 shared cores
STOP_TIMEOUT_S = 30
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Variables of this process that must not leak into the head or the job client: ray_local's ray.init sets
# RAY_AUTH_MODE here, and a RAY_ADDRESS would point the client (or a driver) at another cluster.
SCRUBBED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_JOB_ID", "RAY_RUNTIME_ENV_HOOK")


def ray_cli() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- the processes of one head ----------------------------------------------------------------------------
# Ray daemons stay in the process group of `ray start`; workers get a group of their own from the raylet but
# are its children. A process is identified by (pid, start time) so that a recycled pid is never signalled.


def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, pgid, start time, state) of a live process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0]


def _table() -> dict[int, tuple[int, int, int, str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def head_processes(pgid: int) -> set[tuple[int, int]]:
    """(pid, start time) of the processes in group ``pgid`` and of all their descendants, zombies excluded."""
    table = _table()
    found = {pid for pid, (_, group, _, _) in table.items() if group == pgid}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    return {(pid, table[pid][2]) for pid in found if table[pid][3] != "Z"}


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(pid, start) for pid, start in procs if (st := _stat(pid)) and st[2] == start and st[3] != "Z"}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if pytest dies, so a crashed test run does not leak a head."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Head:
    address: str  # the job API (dashboard) URL
    gcs_port: int
    env: dict[str, str]
    temp_dir: Path
    log: Path
    token: str

    def get(self, path: str, token: str | None = "self") -> tuple[int, bytes]:
        request = urllib.request.Request(self.address + path)
        if token:
            request.add_header("Authorization", f"Bearer {self.token if token == 'self' else token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*ray_cli(), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard, agent_http, agent_grpc, client, metrics, runtime_env = free_ports(7)
    # short, private temp dir: Ray's unix sockets live under it (path length limit ~107 characters)
    temp_dir = Path(tempfile.mkdtemp(prefix="rmjob-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               # SIGTERM to `ray start --block` would otherwise wait up to 30 s for a node drain
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = temp_dir / "ray-start.log"
    command = [*ray_cli(), "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0",
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
               "--runtime-env-agent-port", str(runtime_env), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)
    head = Head(f"http://127.0.0.1:{dashboard}", gcs, env, temp_dir, log, token)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if head.get("/api/version")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"head not up after {HEAD_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield head
    finally:
        stop_head(proc, temp_dir)


def stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop exactly the processes of this head: SIGTERM `ray start --block` (it kills its raylet first, which
    ends its workers, then GCS, dashboard and the rest), then SIGKILL whatever of that snapshot survived."""
    ours = head_processes(proc.pid)  # start_new_session: the group id is the pid of `ray start`
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    ours |= head_processes(proc.pid)
    deadline = time.monotonic() + 5
    while (left := alive(ours)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, _ in alive(ours):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    time.sleep(0.5)
    left = alive(ours)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test head survived SIGKILL: {sorted(left)}"


def wait_for_job(head: Head, submission_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status, body = head.get(f"/api/jobs/{submission_id}")
        info = json.loads(body) if status == 200 else {}
        if info.get("status") in TERMINAL:
            return info
        if time.monotonic() > deadline:
            logs = head.cli("job", "logs", submission_id, "--address", head.address).stdout
            pytest.fail(f"job {submission_id} not finished after {JOB_TIMEOUT_S} s ({info}):\n{logs[-6000:]}")
        time.sleep(1)


@pytest.mark.slow
def test_eval_job_via_ray_job_submit(ray_head, mini_pool, tmp_path):
    head = ray_head
    assert head.get("/api/version", token=None)[0] == 401, "the test head should enforce token authentication"
    out, cache = tmp_path / "out", tmp_path / "cache"
    submission_id = f"raymerge-test-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "jobs/eval.py", "--config", str(mini_pool / "experiment.yaml"),
                  "--set", f"output_dir={out}", "--cache-dir", str(cache)]
    # the working dir is uploaded; mini_pool's files stay outside it, named by absolute path (one machine)
    submit = head.cli("job", "submit", "--address", head.address, "--working-dir", str(REPO),
                      "--submission-id", submission_id, "--no-wait", "--", *entrypoint)
    assert submit.returncode == 0, f"{shlex.join(submit.args)}\n{submit.stdout}\n{submit.stderr}"

    info = wait_for_job(head, submission_id)
    logs = head.cli("job", "logs", submission_id, "--address", head.address)
    assert logs.returncode == 0, logs.stderr
    text = logs.stdout
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{text[-6000:]}"
    status = head.cli("job", "status", submission_id, "--address", head.address, "--log-color", "false")
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr

    # the driver joined this head (RAY_ADDRESS, set by the job supervisor to the head's GCS), not a new local Ray
    assert "set in the environment variable RAY_ADDRESS" in text
    assert "Connecting to existing Ray cluster at address" in text and f":{head.gcs_port}..." in text
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
