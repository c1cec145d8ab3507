"""A real local Ray head for tests, started with the README's own commands ("Against a local Ray head").

The README's code block is parsed, not copied, so the documentation and the tests cannot drift apart. Run beside
other engineers' Rays on one machine, the commands get only these substitutions, all outside what they secure:
- ``HOME`` is a scratch directory, so ``~/.ray/auth_token`` is the test's own token, not the user's;
- ``ray start`` gets ``--block`` (the test owns the process group and stops exactly it, never with `ray stop`,
  which stops every Ray of the user on the machine) and free ports plus a private ``--temp-dir`` (the defaults,
  6379 and 8265, may be someone else's);
- ``ray job submit`` gets the dashboard's free port in place of 8265, and the test's own entry point after ``--``.

:func:`start_worker_node` joins more nodes to a head the way cluster.yaml's workers join theirs (``RAY_AUTH_MODE=token
ray start --address HEAD``), each with its own raylet, object store, agents, ports and temp dir: a multi-node
cluster on one machine. :meth:`Head.state` reads nodes and actors from the dashboard without joining the cluster.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD_START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
# Variables of this process that must not leak into a head or a job client: ray_local's ray.init sets
# RAY_AUTH_MODE here, and a RAY_ADDRESS would point the client (or a driver) at another cluster.
SCRUBBED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_JOB_ID", "RAY_RUNTIME_ENV_HOOK")


def ray_cli() -> str:
    script = Path(sys.executable).with_name("ray")
    return str(script) if script.is_file() else f"{shlex.quote(sys.executable)} -m ray.scripts.scripts"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- the README's commands ---------------------------------------------------------------------------------


def readme_commands(section: str = "### Against a local Ray head") -> list[str]:
    """The shell commands of the first code block under ``section``: continuation lines joined, comments cut."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(section):]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split("#", 1)[0].split()) for line in lines if line.split("#", 1)[0].strip()]


def submitted_job_id(output: str) -> str:
    """The submission id that `ray job submit` prints."""
    found = re.search(r"Job '([^']+)' submitted successfully", output)
    assert found, output
    return found.group(1)


def command(commands: list[str], words: str) -> str:
    found = [c for c in commands if words in c]
    assert len(found) == 1, f"the README's block should have one `{words}` command: {commands}"
    return found[0]


def scrubbed_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               # SIGTERM to `ray start --block` would otherwise wait up to 30 s for a node drain
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_shell(line: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One README line through bash (``ray`` resolves to this interpreter's, first on PATH)."""
    return subprocess.run(["bash", "-c", line], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


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


def listening_addresses(port: int, pids: set[int]) -> set[str]:
    """Local addresses on which one of ``pids`` listens on TCP ``port`` (from /proc, like `ss -ltnp`)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            address, hex_port = cols[1].split(":")
            if cols[3] == "0A" and int(hex_port, 16) == port and cols[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = [raw[i:i + 4][::-1] for i in range(0, width, 4)]  # each 32-bit word is little-endian
                found.add(socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, b"".join(words)))
    return found


@dataclass
class Node:
    """One `ray start --block` and its process group: a raylet with its own object store and agents (on a head,
    also the GCS, dashboard and autoscaler monitor), its ports and private temp dir."""

    ports: dict[str, int]
    temp_dir: Path
    log: Path
    proc: subprocess.Popen


@dataclass
class Head(Node):
    address: str = ""  # the job API (dashboard) URL
    env: dict[str, str] = field(default_factory=dict)  # HOME (with its token file) and PATH the commands ran with
    home: Path = Path()
    submit: str = ""  # the README's `ray job submit` command, its address pointed at this head
    workers: list[Node] = field(default_factory=list)  # worker nodes joined with start_worker_node

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    @property
    def gcs(self) -> str:
        """The GCS as other nodes reach it: the machine's address, as on a real cluster."""
        return f"{node_ip()}:{self.ports['gcs']}"

    def request(self, path: str, token: str | None = None, method: str = "GET", base: str | None = None,
                body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request((base or self.address) + path, data=body, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def state(self, kind: str, **filters: str) -> list[dict]:
        """Rows of Ray's state API (``kind``: "nodes", "actors", ...; ``filters``: column=value), as `ray list
        KIND --detail` shows them, asked of the dashboard over HTTP with the token (no CLI, no driver)."""
        query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        status, body = self.request(f"/api/v0/{kind}?detail=1&limit=10000{query}", token=self.token)
        assert status == 200, body[-2000:]
        return json.loads(body)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray ARGS`` as the README's client runs it (RAY_AUTH_MODE=token, the token file in HOME)."""
        return subprocess.run(shlex.split(ray_cli()) + list(args), env=env or {**self.env, "RAY_AUTH_MODE": "token"},
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def submit_command(self, entrypoint: list[str]) -> str:
        """The README's `ray job submit` line with ``entrypoint`` after ``--``."""
        return f"{self.submit.split(' -- ')[0]} -- {shlex.join(entrypoint)}"

    def job_info(self, submission_id: str) -> dict:
        status, body = self.request(f"/api/jobs/{submission_id}", token=self.token)
        assert status == 200, body[-2000:]
        return json.loads(body)


def start_readme_head(authenticated: bool = True, **env: str) -> Head:
    """Start a head exactly as the README's block says (see the module docstring for the substitutions).

    ``authenticated=False`` drops the token steps and the ``RAY_AUTH_MODE=token`` of `ray start`: the head a user
    gets from a plain ``ray start --head``, to show what raymerge says on it. ``env``: variables of the head's
    environment (what its jobs' drivers inherit), e.g. a prebuilt zoo's ``RAYMERGE_CACHE``.
    """
    commands = readme_commands()
    home = Path(tempfile.mkdtemp(prefix="rmhome-", dir="/tmp"))
    start = command(commands, "ray start --head")
    submit = command(commands, "ray job submit")
    assert "--address http://127.0.0.1:8265" in submit, submit
    if authenticated:
        make_token(home, commands)
    else:
        start = start.replace("RAY_AUTH_MODE=token ", "")
    head = start_head(start, home, **env)
    head.submit = submit.replace(":8265", f":{head.ports['dashboard']}")
    return head


def make_token(home: Path, commands: list[str] | None = None) -> None:
    """Run the README's token commands (generate, chmod 600) with ``home`` as HOME."""
    commands = commands or readme_commands()
    for line in (command(commands, "ray get-auth-token --generate"), command(commands, "chmod 600 ~/.ray/auth_token")):
        done = run_shell(line, scrubbed_env(home))
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"


def _node_flags(ports: dict[str, int], temp_dir: Path) -> str:
    """What every node gets beside its command: --block, its own free ports and temp dir."""
    return (f"--block --node-manager-port {ports['node_manager']} --object-manager-port {ports['object_manager']} "
            f"--dashboard-agent-listen-port {ports['agent_http']} --dashboard-agent-grpc-port {ports['agent_grpc']} "
            f"--metrics-export-port {ports['metrics']} --runtime-env-agent-port {ports['runtime_env']} "
            f"--temp-dir {temp_dir} --disable-usage-stats")


NODE_PORTS = ("node_manager", "object_manager", "agent_http", "agent_grpc", "metrics", "runtime_env")


def _launch(line: str, env: dict[str, str], prefix: str) -> tuple[dict[str, int], Path, Path, subprocess.Popen]:
    """Start the `ray start` command ``line`` (its node flags added) in a process group of its own; returns its
    ports, temp dir, log and process."""
    # short, private temp dir: Ray's unix sockets live under it (path length limit ~107 characters)
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ports = dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS))))
    line = f"{line} {_node_flags(ports, temp_dir)}"  # bash -c execs a lone simple command: `ray start` leads the group
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", line], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    return ports, temp_dir, log, proc


def _wait_until_up(node: Node, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while not ready():
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray start ({what}) exited with {node.proc.returncode}:\n{node.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {HEAD_START_TIMEOUT_S} s:\n{node.log.read_text()[-4000:]}")
        time.sleep(0.5)


def start_head(start: str, home: Path, gcs_port: int | None = None, **env: str) -> Head:
    """Run the `ray start --head` command line ``start`` with HOME=``home`` (and ``env``), plus ``--block``, free
    ports (the GCS on ``gcs_port`` if given) and a private temp dir; return once its dashboard, agents and Ray
    Client server accept connections."""
    gcs, dashboard, client = free_ports(3)
    gcs = gcs_port or gcs
    full_env = scrubbed_env(home, **env)
    ports, temp_dir, log, proc = _launch(
        f"{start} --port {gcs} --dashboard-port {dashboard} --ray-client-server-port {client}", full_env, "rmhead-")
    ports.update(gcs=gcs, dashboard=dashboard, client=client)
    head = Head(ports, temp_dir, log, proc, address=f"http://127.0.0.1:{dashboard}", env=full_env, home=home)
    try:
        _wait_until_up(head, lambda: _answers(head.address) and all(
            _accepts(head.ports[p]) for p in ("agent_http", "runtime_env", "client")), "head")
    except BaseException:
        stop_head(head)
        raise
    return head


# a worker node's share of /dev/shm: Ray's default (30% of the machine's memory per node) is far more than the
# tests move, and the machine is shared
WORKER_OBJECT_STORE_BYTES = 512 * 1024 ** 2


def start_worker_node(head: Head, num_cpus: int, num_gpus: int = 0) -> Node:
    """Join ``head`` as another machine would (cluster.yaml's worker start: `RAY_AUTH_MODE=token ray start
    --address HEAD:GCS_PORT`, the head's token in HOME): a raylet with its own object store, agents, free ports
    and temp dir, and ``num_cpus`` CPUs and ``num_gpus`` GPUs (on a machine without GPUs, a GPU resource only).
    Returns once the head lists it alive; :func:`stop_head` stops it with the head."""
    line = (f"RAY_AUTH_MODE=token ray start --address {head.gcs} --num-cpus {num_cpus} --num-gpus {num_gpus} "
            f"--object-store-memory {WORKER_OBJECT_STORE_BYTES}")
    node = Node(*_launch(line, head.env, "rmnode-"))
    head.workers.append(node)
    expected = 1 + len(head.workers)
    try:
        _wait_until_up(node, lambda: len(head.alive_nodes()) >= expected and all(
            _accepts(node.ports[p]) for p in ("agent_http", "runtime_env")), "worker node")
    except BaseException:
        _stop_group(node)
        raise
    return node


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=5):
            return True
    except urllib.error.HTTPError as err:
        return err.code == 401  # up, and asking for the token
    except OSError:
        return False


def node_ip() -> str:
    """The machine's address, which Ray binds its nodes' services to."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _accepts(port: int) -> bool:
    """Whether something listens on ``port`` (the node's own address or loopback: agents bind either)."""
    for host in (node_ip(), "127.0.0.1"):
        try:
            socket.create_connection((host, port), timeout=2).close()
            return True
        except OSError:
            pass
    return False


def _stop_group(node: Node) -> set[tuple[int, int]]:
    """Stop exactly the processes of one node: SIGTERM `ray start --block` (it kills its raylet first, which
    ends its workers, then the rest), then SIGKILL whatever of that snapshot survived; returns what still lives."""
    proc = node.proc
    ours = head_processes(proc.pid)  # start_new_session: the group id is the pid of `ray start` (bash exec'd it)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    ours |= head_processes(proc.pid)
    deadline = time.monotonic() + 5
    while alive(ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, _ in alive(ours):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    time.sleep(0.5)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    return alive(ours)


def stop_head(head: Head) -> None:
    """Stop the head's worker nodes, then the head (GCS, dashboard, and any node its autoscaler launched: they
    are its monitor's children), each by its own process group; never `ray stop`."""
    left = set()
    for node in head.workers:  # first: a raylet that loses its GCS retries for a minute before it exits
        left |= _stop_group(node)
    left |= _stop_group(head)
    shutil.rmtree(head.home, ignore_errors=True)
    assert not left, f"processes of the test cluster survived SIGKILL: {sorted(left)}"
