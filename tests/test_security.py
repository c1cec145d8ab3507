"""Token authentication, tried against a real head started exactly as the README says (tests/ray_head.py).

What a hostile neighbour on the network would try: submit a job with no token or a wrong one (through the job
API, and straight to the dashboard agent's job endpoint, which listens on the machine's address), call the GCS,
the runtime-env agent and the Ray Client server without a token. And what a careless user meets: a head started
without authentication, about which every raymerge job warns in its first lines.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import grpc
import pytest

from ray_head import (REPO, Head, command, head_processes, listening_addresses, node_ip, readme_commands,
                      run_shell, scrubbed_env, start_readme_head, stop_head, submitted_job_id)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")

JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def secure_head():
    head = start_readme_head(authenticated=True)
    yield head
    stop_head(head)


def test_readme_block_is_authenticated():
    """The block users copy generates a private token and sets RAY_AUTH_MODE=token on head and client alike."""
    commands = readme_commands()
    order = [command(commands, w) for w in ("ray get-auth-token --generate", "chmod 600 ~/.ray/auth_token",
                                            "ray start --head", "ray job submit")]
    assert [commands.index(c) for c in order] == sorted(commands.index(c) for c in order)
    for line in order[2:]:
        assert line.startswith("RAY_AUTH_MODE=token ray "), line
    assert "--dashboard-host 127.0.0.1" in order[2]
    assert "0.0.0.0" not in " ".join(commands)
    assert "> /dev/null" in order[0], "the token is a secret: the README should not print it to the terminal"


@pytest.mark.slow
def test_token_file_is_private(secure_head: Head):
    token_file = secure_head.home / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(secure_head.token) >= 32


@pytest.mark.slow
def test_http_endpoints_refuse_missing_and_wrong_tokens(secure_head: Head, tmp_path):
    head, token = secure_head, secure_head.token
    assert head.request("/api/jobs/")[0] == 401
    assert head.request("/api/jobs/", token="not-the-token")[0] == 403
    assert head.request("/api/jobs/", token=token)[0] == 200
    # the dashboard agent's job endpoint: one unauthenticated POST used to run a command (issue 15)
    marker = tmp_path / "pwned"
    body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": "intruder"}).encode()
    for host in (node_ip(), "127.0.0.1"):
        agent = f"http://{host}:{head.ports['agent_http']}"
        assert head.request("/api/job_agent/jobs/", method="POST", base=agent, body=body)[0] == 401, host
        assert head.request("/api/job_agent/jobs/", token="not-the-token", method="POST", base=agent, body=body)[0] == 403
    runtime_env = f"http://{node_ip()}:{head.ports['runtime_env']}"
    assert head.request("/", base=runtime_env)[0] == 401
    time.sleep(2)
    assert not marker.exists()


@pytest.mark.slow
def test_grpc_services_refuse_calls_without_the_token(secure_head: Head):
    from ray.core.generated import (node_manager_pb2, node_manager_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc,
                                    reporter_pb2, reporter_pb2_grpc)

    from raymerge import cluster

    for host in (node_ip(), "127.0.0.1"):
        assert cluster.gcs_auth_enabled(f"{host}:{secure_head.ports['gcs']}") is True
    calls = {  # one harmless call to each of the other gRPC servers the head runs on the machine's address
        "client": lambda ch: ray_client_pb2_grpc.RayletDriverStub(ch).ClusterInfo(
            ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=10),
        "node_manager": lambda ch: node_manager_pb2_grpc.NodeManagerServiceStub(ch).GetNodeStats(
            node_manager_pb2.GetNodeStatsRequest(), timeout=10),
        "agent_grpc": lambda ch: reporter_pb2_grpc.ReporterServiceStub(ch).GetTraceback(
            reporter_pb2.GetTracebackRequest(pid=1), timeout=10),
    }
    for port, call in calls.items():
        with grpc.insecure_channel(f"{node_ip()}:{secure_head.ports[port]}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, port


@pytest.mark.slow
def test_dashboard_listens_on_loopback_only(secure_head: Head):
    pids = {pid for pid, _ in head_processes(secure_head.proc.pid)}
    assert listening_addresses(secure_head.ports["dashboard"], pids) == {"127.0.0.1"}


@pytest.mark.slow
def test_submission_needs_the_token(secure_head: Head, tmp_path):
    head = secure_head
    probe = [sys.executable, "-c", "from raymerge import cluster; print('auth on:', cluster.warn_if_unauthenticated())"]
    line = head.submit_command(probe)
    assert line.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:")

    no_token_home = tmp_path / "home"
    no_token_home.mkdir()
    refused = {
        "no token file": (line, scrubbed_env(no_token_home), "couldn't find an authentication token"),
        "no token sent (401)": (line.replace("RAY_AUTH_MODE=token ", ""), scrubbed_env(no_token_home),
                                "Unauthorized: Missing authentication token"),
        "wrong token (403)": (line, scrubbed_env(no_token_home, RAY_AUTH_TOKEN="f" * 32),
                              "Forbidden: Invalid authentication token"),
    }
    for case, (command_line, env, message) in refused.items():
        done = run_shell(command_line, env)
        assert done.returncode != 0, case
        assert message in done.stdout + done.stderr, f"{case}:\n{done.stdout}\n{done.stderr}"

    done = run_shell(line, head.env, timeout=JOB_TIMEOUT_S)  # the README's own command, token file in HOME
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "auth on: True" in done.stdout
    assert f"Job '{submitted_job_id(done.stdout + done.stderr)}' succeeded" in done.stdout + done.stderr
    status, body = head.request("/api/jobs/", token=head.token)
    assert status == 200
    assert [job["entrypoint"] for job in json.loads(body)] == [line.split(" -- ", 1)[1]], "a refused job ran"


@pytest.mark.slow
def test_job_on_unauthenticated_head_warns_first():
    """A head started without the token steps (plain `ray start --head`): jobs still run there, and raymerge's
    job says so before anything else, with the commands that turn authentication on."""
    head = start_readme_head(authenticated=False)
    try:
        assert head.request("/api/version")[0] == 200  # open to anyone
        from raymerge import cluster

        assert cluster.gcs_auth_enabled(f"127.0.0.1:{head.ports['gcs']}") is False
        missing = REPO / "no-such-experiment.yaml"
        line = head.submit_command([sys.executable, "jobs/eval.py", "--config", str(missing)])
        done = run_shell(line.replace("RAY_AUTH_MODE=token ", ""), head.env, timeout=JOB_TIMEOUT_S)
        output = done.stdout + done.stderr
        submission = submitted_job_id(output)
        status, body = head.request(f"/api/jobs/{submission}/logs")
        assert status == 200
        logs = json.loads(body)["logs"].splitlines()
        logs = logs[next(i for i, text in enumerate(logs) if text.startswith("Running entrypoint for job")) + 1:]
        assert "WITHOUT token authentication" in logs[0], logs[:5]  # the driver's first line
        warning_end = next(i for i, text in enumerate(logs) if "ray job submit" in text)
        assert "ray get-auth-token --generate" in "\n".join(logs[:warning_end])
        assert "RAY_AUTH_MODE=token ray start --head" in "\n".join(logs[:warning_end])
        assert any(text.startswith("error: ") and "no-such-experiment.yaml" in text for text in logs), logs
        assert "Traceback" not in "\n".join(logs)
        info = json.loads(head.request(f"/api/jobs/{submission}")[1])
        assert info["status"] == "FAILED" and "exit code 2" in info["message"], info

        # a driver joining it directly is told once, though it names the GCS twice (as given, then as Ray reports it)
        joined = _python(f"from raymerge import cluster; cluster.warn_if_unauthenticated('127.0.0.1:{head.ports['gcs']}'); "
                         f"cluster.connect('127.0.0.1:{head.ports['gcs']}')", head.home)
        assert joined.returncode == 0, joined.stderr
        assert joined.stderr.count("WITHOUT token authentication") == 1, joined.stderr
    finally:
        stop_head(head)


def _python(code: str, home, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=scrubbed_env(home, PYTHONPATH=str(REPO), **env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("env, says", [
    ({}, "has no token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 32}, "has a token the cluster refuses"),
])
def test_joining_without_the_right_token_is_one_clear_error(secure_head: Head, tmp_path, env, says):
    """At once (Ray itself retries for ~20 s and then reports a connection failure), naming the fix."""
    code = ("import sys\nfrom raymerge import cluster\n"
            f"try:\n    cluster.connect('127.0.0.1:{secure_head.ports['gcs']}')\n"
            "except cluster.ClusterError as err:\n    print('refused:', err)\n    sys.exit(2)\n")
    done = _python(code, tmp_path, timeout=60, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "requires token authentication" in done.stdout and says in done.stdout, done.stdout
    assert "RAY_AUTH_MODE=token" in done.stdout


@pytest.mark.slow
def test_local_start_keeps_the_token_private(tmp_path):
    """An in-process local Ray turns token auth on and writes ~/.ray/auth_token world-readable; connect() fixes
    the mode, and finds the cluster authenticated."""
    code = ("import stat, pathlib, ray\nfrom raymerge import cluster\n"
            "cluster.connect('local', num_cpus=1)\n"
            "mode = stat.S_IMODE((pathlib.Path.home() / '.ray' / 'auth_token').stat().st_mode)\n"
            "print('mode', oct(mode), 'auth', cluster.warn_if_unauthenticated(ray.get_runtime_context().gcs_address))\n"
            "ray.shutdown()\n")
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mode 0o600 auth True" in done.stdout, done.stdout + done.stderr



def test_cloud_cluster_is_authenticated():
    """cluster.yaml (the other way the README starts Ray): every node starts with RAY_AUTH_MODE=token, gets the
    token, and keeps it private; the README's cloud block makes it private before `ray up` copies it."""
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]
    cloud = readme_commands("### On a cloud cluster")
    assert cloud.index("chmod 600 ~/.ray/auth_token") < cloud.index("ray up cluster.yaml")
    assert command(cloud, "ray job submit").startswith("RAY_AUTH_MODE=token ")
