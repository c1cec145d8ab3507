"""Joining Ray safely: token authentication, and resource requests the cluster can meet.

- :func:`connect` joins a cluster (an address, or the ``RAY_ADDRESS`` that ``ray job submit`` sets) or starts a
  local Ray, and warns when the cluster accepts requests without a token.
- :func:`warn_if_unauthenticated` asks the cluster's GCS directly, before Ray is joined, so a job says so in
  its first lines: an unauthenticated gRPC call is answered ``UNAUTHENTICATED`` when token authentication is
  on, and served when it is off (checked on Ray 2.60). The driver's own ``RAY_AUTH_MODE`` cannot tell: it is
  the client's setting, not the cluster's.
- :func:`check_resources` refuses, before any actor is created, a request a fixed cluster can never place;
  :func:`wait_for_actors` waits for actors to start, reporting the pending demand (and, on an autoscaling
  cluster, the nodes being launched) every 30 s, and gives up after a set time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray
from ray.core.generated import autoscaler_pb2

from raymerge.errors import InputError

log = logging.getLogger(__name__)

# How often a wait for actors logs what it is waiting for.
REPORT_EVERY_S = 30.0

AUTH_FIX = (
    "Turn it on (README, 'Against a local Ray head'):\n"
    "    ray get-auth-token --generate > /dev/null && chmod 600 ~/.ray/auth_token\n"
    "    RAY_AUTH_MODE=token ray start --head ...        # restart the head (and every node) with this\n"
    "    RAY_AUTH_MODE=token ray job submit ...           # and submit with it"
)


class ClusterError(InputError):
    """The Ray cluster cannot be joined as asked (unreachable, token missing or wrong); the message says why."""


class ClusterResourceError(ClusterError):
    """The actors asked for cannot run on this cluster (never, or not within the time allowed)."""


# --- authentication ---------------------------------------------------------------------------------------

_warned: set[bytes] = set()  # ids of the clusters already warned about in this process


def _ask_gcs(gcs_address: str, timeout_s: float = 5.0, token: str | None = None) -> tuple[str, bytes]:
    """("served" | "refused" | "unknown", cluster id when served) for one ``GetClusterId`` call, which reveals
    nothing, sent with ``token`` or none. "unknown": unreachable, TLS, or not a GCS."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        with grpc.insecure_channel(gcs_address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            reply = stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as err:
        return ("refused" if err.code() == grpc.StatusCode.UNAUTHENTICATED else "unknown"), b""
    except ValueError:  # not a host:port
        return "unknown", b""
    return "served", reply.cluster_id


def gcs_auth_enabled(gcs_address: str, timeout_s: float = 5.0) -> bool | None:
    """Whether the GCS at ``host:port`` enforces token authentication: True, False, or None if it cannot be asked
    (unreachable, TLS, not a GCS). Sends one unauthenticated ``GetClusterId`` call."""
    return {"refused": True, "served": False}.get(_ask_gcs(gcs_address, timeout_s)[0])


def _gcs_address(address: str | None) -> str | None:
    """The GCS ``host:port`` that ``address`` (default ``RAY_ADDRESS``) names, if it names one directly."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("local", "auto") or "://" in address:  # Ray Client and dashboard URLs: no GCS
        return None
    return address


def warn_if_unauthenticated(address: str | None = None) -> bool | None:
    """Log a warning, with the commands that fix it, if the cluster at ``address`` (a GCS ``host:port``; default
    ``RAY_ADDRESS``) runs without token authentication (once per cluster and process). Returns what
    :func:`gcs_auth_enabled` found; None when there is no cluster address to ask (e.g. before a local start)."""
    gcs = _gcs_address(address)
    if gcs is None:
        return None
    answer, cluster_id = _ask_gcs(gcs)
    enabled = {"refused": True, "served": False}.get(answer)
    if enabled is False and cluster_id not in _warned:
        _warned.add(cluster_id)
        log.warning("SECURITY: the Ray cluster at %s runs WITHOUT token authentication: anyone who can reach its "
                    "ports can run code on it and read your checkpoints and data.\n%s", gcs, AUTH_FIX)
    return enabled


def _token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def make_token_private() -> None:
    """chmod 600 the token file a local ``ray.init()`` may just have written (Ray writes it 0644: readable by
    every user of the machine, who could then use any Ray started with it)."""
    path = _token_path()
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and info.st_uid == os.getuid():
            path.chmod(0o600)
            log.info("made the Ray token file %s private (mode 600)", path)
    except OSError:  # no token file
        pass


def _own_token() -> str | None:
    """The token a driver started here would present (Ray sends one unless RAY_AUTH_MODE=disabled), or None."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or not loader.has_token(ignore_auth_mode=True):
        return None
    return loader.get_raw_token(ignore_auth_mode=True)


# whether the Ray this process joined is a cluster (not a local Ray it started), by GCS address: a second experiment
# of the same job asks again, and must not take a cluster whose GPU nodes scaled to zero for a local Ray without GPUs
_JOINED_CLUSTER: dict[str, bool] = {}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True when the Ray in use runs on this machine only (started here, or already running).

    A cluster address (or RAY_ADDRESS, which ``ray job submit`` sets) joins that cluster; ``"local"`` always starts
    a fresh local Ray; nothing lets plain ``ray.init()`` decide (a recorded local head, else a new local Ray).
    ``num_cpus`` applies only to a local start (RAY-NOTES.md). Warns if the cluster runs without token
    authentication; :class:`ClusterError` if it cannot be joined (unreachable, token missing or wrong), at once
    when the cluster asks for a token this process does not have or has wrong.
    """
    if ray.is_initialized():
        local = not _JOINED_CLUSTER.get(ray.get_runtime_context().gcs_address, False)
    else:
        joining = address not in (None, "local") or (address is None and bool(os.environ.get("RAY_ADDRESS")))
        target = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
        gcs = _gcs_address(address) if joining else None
        need_token = (f"cannot join the Ray cluster at {target}: it requires token authentication, and this process "
                      f"has {{}}. Set RAY_AUTH_MODE=token and give it the cluster's token: the file ~/.ray/auth_token, "
                      f"or RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH.")
        if gcs is not None and gcs_auth_enabled(gcs):  # asked first: Ray would retry for ~20 s, then fail vaguely
            token = _own_token()
            if token is None:
                raise ClusterError(need_token.format("no token"))
            if _ask_gcs(gcs, token=token)[0] == "refused":
                raise ClusterError(need_token.format("a token the cluster refuses"))
        try:
            if joining:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        except ray.exceptions.AuthenticationError:
            raise ClusterError(need_token.format("no valid token")) from None
        except ConnectionError as err:
            raise ClusterError(f"cannot reach the Ray cluster at {target}: {err}") from None
        local = not joining
        _JOINED_CLUSTER[ray.get_runtime_context().gcs_address] = joining
        if local:
            make_token_private()
    warn_if_unauthenticated(ray.get_runtime_context().gcs_address)
    return local


# --- resources --------------------------------------------------------------------------------------------


def _fmt(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def actor_bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """What one actor asks Ray for (CPU always named, GPU when asked)."""
    return {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {})}


def fits(node: Mapping[str, float], bundle: Mapping[str, float]) -> float:
    """How many actors asking ``bundle`` one node with resources ``node`` holds at once (inf if it asks nothing)."""
    # Ray accounts resources in units of 1e-4; the epsilon keeps 2.0 / 0.1 (19.999999999999996) from flooring to 19
    counts = [math.floor(node.get(k, 0.0) / v + 1e-6) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else math.inf


def _status() -> dict:
    """The autoscaler's last report (``ray status`` reads the same key), {} when there is none yet."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else {}


def _cluster_config() -> autoscaler_pb2.ClusterConfig | None:
    """Node groups an autoscaler v2 / KubeRay reports to the GCS (ray.autoscaler.v2), None when none is."""
    from ray._private.state import state

    return state.get_cluster_config()


def is_autoscaling() -> bool:
    """Whether an autoscaler can add nodes to the connected cluster.

    Autoscaler v2 (KubeRay) reports its node groups to the GCS: autoscaling when a group's size may change.
    The v1 monitor runs on every head; without an autoscaling config it names each node ``node_<node id>``
    (its read-only provider), with one (``ray up``, ``--autoscaling-config``) it uses the config's node types.
    A cluster whose monitor has not reported yet (its first seconds) counts as fixed.
    """
    config = _cluster_config()
    if config is not None and any(g.max_count != g.min_count for g in config.node_group_configs):
        return True
    mapping = (_status().get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def _describe_nodes(nodes: Sequence[Mapping[str, float]]) -> str:
    shapes = Counter(_fmt({"CPU": n.get("CPU", 0.0), "GPU": n.get("GPU", 0.0)}) for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + ", ".join(f"{c} × {s}" for s, c in shapes.items())


def _max_actors_in_config(config, bundle: Mapping[str, float]) -> tuple[float, str]:
    """(most actors the node groups could hold at their maximum sizes, the groups described)."""
    total, parts = 0.0, []
    for group in config.node_group_configs:
        resources = {k: float(v) for k, v in group.resources.items()}
        count = math.inf if group.max_count == -1 else group.max_count
        per_node = fits(resources, bundle)
        total += 0 if per_node == 0 or count == 0 else per_node * count
        parts.append(f"{group.name or '?'} ≤{'∞' if count == math.inf else count} × "
                     f"{_fmt({'CPU': resources.get('CPU', 0.0), 'GPU': resources.get('GPU', 0.0)})}")
    return total, ", ".join(parts)


def check_resources(num_actors: int, num_cpus: float, num_gpus: float, *, task_cpus: float = 0.0,
                    autoscaling: bool | None = None) -> bool:
    """Refuse, before any actor is created, ``num_actors`` actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs that the
    connected cluster can never run at once; returns whether the cluster autoscales (then waiting is normal).

    A fixed cluster is checked node by node (an actor must fit on one node) against its total resources, not
    what is free now: work of other jobs ends, so a busy cluster is waited for (:func:`wait_for_actors`).
    ``task_cpus``: CPUs that tasks must still find beside the actors (CART's SVD tasks ask for 1 each), or
    they would wait forever behind actors that hold their CPUs for the whole run. An autoscaling cluster is
    checked against its node groups' maximum sizes when it reports them (autoscaler v2), and otherwise
    trusted: the autoscaler may add nodes, and :func:`wait_for_actors` gives up after a set time.
    ``autoscaling`` overrides the detection (:func:`is_autoscaling`).
    """
    bundle = actor_bundle(num_cpus, num_gpus)
    demand = (f"{num_actors} actor(s) × {_fmt(bundle)} (resources.num_actors, resources.num_cpus_per_actor, "
              f"resources.num_gpus_per_actor)")
    if autoscaling is None:
        autoscaling = is_autoscaling()
    if autoscaling:
        config = _cluster_config()
        if config is not None:
            most, groups = _max_actors_in_config(config, bundle)
            if most < num_actors:
                raise ClusterResourceError(
                    f"{demand} can never run on this autoscaling cluster: its node groups at their largest "
                    f"({groups}) hold {most:g} such actor(s). Ask for fewer or smaller actors.")
        return True
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most = sum(fits(n, bundle) for n in nodes)
    if most < num_actors:
        raise ClusterResourceError(
            f"{demand} can never run on this Ray cluster ({_describe_nodes(nodes)}): it holds at most {most:g} such "
            f"actor(s) at once. Ask for fewer or smaller actors, or use a bigger cluster.")
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    if task_cpus and total_cpus - num_actors * num_cpus < task_cpus - 1e-9:
        raise ClusterResourceError(
            f"{demand} would hold {num_actors * num_cpus:g} of the cluster's {total_cpus:g} CPUs for the whole run, "
            f"leaving less than the {task_cpus:g} CPU(s) that tasks beside them need (merges, SVD jobs); they would "
            f"wait forever. Lower resources.num_cpus_per_actor (fractions are fine) or resources.num_actors, or set "
            f"resources.merge_on: actor (the actors then make the merges themselves).")
    return False


def _autoscaler_activity() -> str:
    """What the autoscaler is doing about pending demand, in one line ('' when it reports nothing)."""
    report = _status()
    parts = []
    demand = (report.get("load_metrics_report") or {}).get("resource_demand") or []
    if demand:
        parts.append("pending demand (all jobs): " + ", ".join(f"{count} × {_fmt(bundle)}" for bundle, count in demand))
    auto = report.get("autoscaler_report") or {}
    if launches := {t: n for t, n in (auto.get("pending_launches") or {}).items() if n}:
        parts.append("launching " + ", ".join(f"{n} × {t}" for t, n in launches.items()))
    if pending := auto.get("pending_nodes"):
        parts.append("nodes starting: " + ", ".join(f"{node_type} ({status})" for _, node_type, status in pending))
    if failed := auto.get("failed_nodes"):
        parts.append("failed launches: " + ", ".join(str(node_type) for _, node_type in failed))
    return "; ".join(parts)


def _waiting(started: int, total: int, bundle: Mapping[str, float], elapsed: float) -> str:
    have, free = ray.cluster_resources(), ray.available_resources()
    offer = ", ".join(f"{k} {free.get(k, 0.0):g} of {have.get(k, 0.0):g} free" for k in ("CPU", "GPU"))
    line = (f"{total - started} of {total} actor(s) × {_fmt(bundle)} not started after {elapsed:.0f} s; "
            f"cluster: {offer}")
    activity = _autoscaler_activity()
    return f"{line}; {activity}" if activity else line


def wait_for_actors(actors: Sequence, bundle: Mapping[str, float], timeout_s: float | None = None,
                    report_every_s: float | None = None) -> None:
    """Wait until every actor in ``actors`` (each asking ``bundle``) runs, logging what is pending every
    ``report_every_s`` seconds (default :data:`REPORT_EVERY_S`). After ``timeout_s`` (None: no limit) the actors
    are killed, so that their demand stops asking the autoscaler for nodes, and :class:`ClusterResourceError`
    says what was pending. An actor whose constructor fails raises that error here."""
    report_every_s = REPORT_EVERY_S if report_every_s is None else report_every_s
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    pending = [actor.__ray_ready__.remote() for actor in actors]
    next_report = start + report_every_s
    while pending:
        until = next_report if deadline is None else min(next_report, deadline)
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, until - time.monotonic()))
        ray.get(ready)
        if not pending:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            message = _waiting(len(actors) - len(pending), len(actors), bundle, now - start)
            for actor in actors:
                ray.kill(actor)
            raise ClusterResourceError(
                f"gave up after {timeout_s:g} s (resources.start_timeout_s): {message}. The cluster could not "
                f"provide the resources asked for: ask for fewer or smaller actors, or allow more time.")
        if now >= next_report:
            log.info("start workers: %s", _waiting(len(actors) - len(pending), len(actors), bundle, now - start))
            next_report += report_every_s
