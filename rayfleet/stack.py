"""The local stack behind ``rayfleet up``, ``down`` and ``status``.

``up`` starts (or joins) Ray with the Serve settings the gateway needs, deploys the same
application a Serve config file would, waits for the engines, prints where everything
runs and stays in the foreground. A small state file lets ``down`` and ``status`` find it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel

from rayfleet.ports import free_port, port_in_use, unused_port_block

APP_NAME = "rayfleet"
ROUTE_TIMEOUT_S = 60.0
# Per protocol. Serve gives a replaced replica's port back only after HAProxy's hard stop
# (150 s), so a block must outlast many redeploys, not just hold the replicas of one.
DIRECT_INGRESS_PORTS = 256

# Serve settings the gateway depends on (measurements.md §2): the HAProxy ingress does not
# collapse at 64 clients where the Python proxy does, and the throughput-optimised mode runs
# user code on the replica's main loop, without a thread hop per request. HAProxy's
# per-request metrics log is parsed by a Python actor that cost a seventh of a core at
# 3,000 req/s here; the gateway exports its own request metrics instead. One HAProxy
# thread is plenty for a few thousand req/s and leaves the cores to Python.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def serve_environment() -> dict[str, str]:
    """``SERVE_ENV`` plus ports of our own for the listeners Serve would put on fixed ports.

    HAProxy's stats and metrics listeners default to 8404 and 9101: a second Serve cluster
    on the same machine (a test cluster beside ``rayfleet up``, two users on one host) would
    fail to start HAProxy. Worse, every cluster gives its ingress replicas direct-ingress
    ports counted up from 30000 (HTTP) and 40000 (gRPC), bound with SO_REUSEPORT: the
    second cluster's gateway binds the very port of the first one's, and the kernel then
    spreads HAProxy's connections over both gateways. So each stack takes a block of ports
    nothing listens on. Ports the user set explicitly are kept.
    """
    env = dict(SERVE_ENV)
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        env[name] = os.environ.get(name) or str(free_port("0.0.0.0"))
    block = unused_port_block(2 * DIRECT_INGRESS_PORTS)
    for offset, protocol in enumerate(("HTTP", "GRPC")):
        low, high = f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT", f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT"
        if os.environ.get(low) or os.environ.get(high):
            continue
        first = block + offset * DIRECT_INGRESS_PORTS
        env[low], env[high] = str(first), str(first + DIRECT_INGRESS_PORTS)  # Serve's upper bound is exclusive
    return env


class StackState(BaseModel):
    """What ``rayfleet up`` leaves in the state file for ``down`` and ``status``."""

    pid: int
    ray_address: str
    gateway_url: str
    dashboard_url: str | None = None
    started_ray: bool
    node_id: str


def rayfleet_home() -> Path:
    """Where rayfleet keeps its state: ``$RAYFLEET_HOME``, else ``~/.rayfleet``."""
    return Path(os.environ.get("RAYFLEET_HOME", Path.home() / ".rayfleet"))


def state_path() -> Path:
    return rayfleet_home() / "up.json"


def read_state() -> StackState | None:
    try:
        return StackState.model_validate_json(state_path().read_text())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs here: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class UsageError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits 2."""


@dataclass
class UpOptions:
    engines: int = 2
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    gpu: str = "h100"
    port: int = 8000
    host: str = "127.0.0.1"
    address: str | None = None
    engine: str = "sim"
    time_scale: float = 1.0
    strategy: str = "least-request"
    prefix_index: str = "approximate"
    redis: str | None = None
    admin_token: str | None = None
    require_api_keys: bool = False
    anonymous: str = "allow"
    autoscale: str | None = None
    min_replicas: int = 1
    max_replicas: int = 8
    autoscale_target: float = 32.0
    autoscale_options: tuple[str, ...] = ()
    config_file: str | None = None
    ready_timeout_s: float = 120.0


def build_config(options: UpOptions) -> dict:
    """The application config for these flags, or the file's when ``--config`` is given."""
    from pydantic import ValidationError

    from serve_apps.config import AppConfig

    if options.config_file:
        try:
            import yaml  # shipped with ray

            raw = yaml.safe_load(Path(options.config_file).read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {options.config_file} not found: pass --config PATH to an existing file")
        raw = raw.get("args", raw) if isinstance(raw, dict) else raw
    else:
        raw = {
            "gateway": {"default_strategy": options.strategy},
            "users": {
                "enabled": True,
                "store": options.redis or "embedded",
                "admin_token": options.admin_token,
                "require_api_keys": options.require_api_keys,
                "anonymous": options.anonymous,
            },
            "models": [
                {
                    "name": options.model,
                    "prefix_index": options.prefix_index,
                    "autoscaling": _autoscaling(options),
                    "pool": {
                        "replicas": _initial_engines(options),
                        "engine": options.engine,
                        "engine_config": {"model": options.model, "sim": {"gpu": options.gpu, "time_scale": options.time_scale}},
                    },
                }
            ],
        }
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise UsageError(f"invalid configuration at {where}: {first['msg']}") from None
    # Serve stores the application's arguments in the cluster (and the dashboard shows config
    # files): they get the admin token's digest only.
    users = config.users.model_copy(update={"admin_token": None, "admin_token_sha256": config.users.admin_digest()})
    return config.model_copy(update={"users": users}).model_dump(mode="json")


@contextlib.contextmanager
def running_stack(
    config: dict, host: str, port: int, address: str | None = None, include_dashboard: bool | None = None
) -> Iterator[StackState]:
    """Start (or join) Ray and deploy the application; tear everything down on exit.

    It yields as soon as the application is deployed; ``wait_for_engines`` then waits for
    the engines, which for real vLLM can take minutes.

    ``rayfleet up`` and ``rayfleet bench overhead`` both run through here, so a benchmark
    measures exactly the stack users run.
    """
    import ray
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.registry import NAMESPACE

    os.environ.update(serve_environment())
    context = ray.init(
        address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False,
        include_dashboard=include_dashboard,
    )  # fmt: skip
    started_ray = address is None
    if threading.current_thread() is threading.main_thread():
        # After ray.init, whose own handler ends the process on the spot: a benchmark stopped
        # with `kill` must still tear down, or an orphaned HAProxy keeps the gateway's port.
        # `up` replaces this with its orderly stop.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        gateway_url = f"http://{host}:{port}"
        wait_for_route(gateway_url, ROUTE_TIMEOUT_S)
        yield StackState(
            pid=os.getpid(),
            gateway_url=gateway_url,
            ray_address=context.address_info["address"],
            dashboard_url=f"http://{context.dashboard_url}" if context.dashboard_url else None,
            started_ray=started_ray,
            node_id=ray.get_runtime_context().get_node_id(),
        )
    finally:
        _teardown(started_ray)


def up(options: UpOptions) -> int:
    """Start the stack and block until Ctrl-C, SIGTERM or ``rayfleet down``."""
    existing = read_state()
    if existing and pid_alive(existing.pid):
        raise UsageError(f"rayfleet is already up (pid {existing.pid}, {existing.gateway_url}): run `rayfleet down` first")
    if existing:
        _clean_up_after(existing)
    if port_in_use(options.host, options.port):
        raise UsageError(f"port {options.port} is in use: pass --port N or stop whatever holds it")
    if options.engine == "vllm" and not _vllm_installed():
        raise UsageError("--engine vllm needs vLLM on this machine: pip install 'rayfleet[vllm]' (GPU nodes only)")
    if not options.config_file and not options.admin_token:
        options = replace(options, admin_token=secrets.token_urlsafe(24))
    config = build_config(options)
    _check_redis(config["users"])
    stop = threading.Event()
    state_path().parent.mkdir(parents=True, exist_ok=True)
    with running_stack(config, options.host, options.port, options.address) as state:
        # After ray.init, which installs its own SIGTERM handler: ours must win, so that
        # `rayfleet down` gets the orderly teardown instead of an abrupt exit.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        # Written before the engines are ready, so `rayfleet down` works during a slow start.
        state_path().write_text(state.model_dump_json())
        endpoints = wait_for_engines(config, options.ready_timeout_s, stop)
        if not stop.is_set():
            _print_summary(state, endpoints, config["users"], options.admin_token)
        while not stop.wait(0.5):
            pass
        print("rayfleet: shutting down ...", file=sys.stderr, flush=True)
    return 0


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(128 + signal.SIGTERM)


def wait_for_route(gateway_url: str, timeout_s: float) -> None:
    """Wait until the URL the stack hands out answers the gateway's own ``/health``.

    Serve calling the application running says nothing about the ingress (HAProxy here)
    in front of it, which starts and reloads on its own; whoever calls the gateway next (a
    user after ``rayfleet up``, a benchmark creating its user) should find it answering.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{gateway_url}/health", timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError:  # URLError and HTTPError (Serve's 404) are both OSErrors
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway at {gateway_url} did not answer /health within {timeout_s:.0f}s")
        time.sleep(0.1)


def wait_for_engines(config: dict, timeout_s: float, stop: threading.Event) -> list:
    """Poll the registry until every pooled engine is ready (or the timeout: then say which are not)."""
    import ray

    from serve_apps.registry import get_registry

    expected = sum(m["pool"]["replicas"] for m in config["models"] if m.get("pool"))
    deadline = time.monotonic() + timeout_s
    registry = get_registry()
    endpoints: list = []
    while not stop.is_set():
        endpoints = ray.get(registry.snapshot.remote()).endpoints
        if sum(e.ready for e in endpoints if e.source == "pool") >= expected:
            return endpoints
        if time.monotonic() > deadline:
            print(f"rayfleet: warning: only {sum(e.ready for e in endpoints)} of {expected} engines ready after "
                  f"{timeout_s:.0f}s; see logs under /tmp/rayfleet/logs", file=sys.stderr)  # fmt: skip
            return endpoints
        time.sleep(0.2)
    return endpoints


def _initial_engines(options: UpOptions) -> int:
    if options.autoscale is None:
        return options.engines
    return min(max(options.engines, options.min_replicas), options.max_replicas)


def _autoscaling(options: UpOptions) -> dict | None:
    """``--autoscale kpa --min 1 --max 8 --autoscale-target 32 --autoscale-option stable-window=60s``."""
    if options.autoscale is None:
        return None
    annotations = {}
    for option in options.autoscale_options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise UsageError(f"--autoscale-option takes KNOB=VALUE (e.g. stable-window=60s), not {option!r}")
        annotations[key if "/" in key else f"autoscaling.rayfleet.io/{key}"] = value
    metric = {"metricSourceType": "gateway", "targetMetric": "in_flight", "targetValue": options.autoscale_target}
    return {"strategy": options.autoscale.upper(), "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas, "metrics": [metric], "annotations": annotations}  # fmt: skip


def _check_redis(users: dict) -> None:
    """Refuse to start on a Redis that does not answer: limits would silently fail open."""
    if not users["enabled"] or users["store"] == "embedded":
        return
    import redis

    try:
        redis.Redis.from_url(users["store"], socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise UsageError(f"cannot reach Redis at {users['store']} ({exc}): start redis-server there, or drop --redis "
                         "to use the embedded store") from None  # fmt: skip


def _print_summary(state: StackState, endpoints: list, users: dict, admin_token: str | None) -> None:
    lines = [f"rayfleet is up (pid {state.pid})", f"  gateway    {state.gateway_url}  (OpenAI API: {state.gateway_url}/v1)"]
    if users["enabled"]:
        where = "embedded store" if users["store"] == "embedded" else users["store"]
        token = admin_token or ("the one in your config" if users["admin_token_sha256"] else "none (user API closed)")
        lines.append(f"  users      {state.gateway_url}/v1/users ({where}); admin token: {token}")
    if state.dashboard_url:
        lines.append(f"  dashboard  {state.dashboard_url}")
        if os.environ.get("RAY_AUTH_MODE") == "token":  # set by ray.init when it turned token auth on
            lines.append("             (Ray token auth: `ray get-auth-token` prints the token the dashboard asks for; "
                         "prefix `ray job` and `serve` commands with RAY_AUTH_MODE=token)")  # fmt: skip
    lines.append(f"  ray        {state.ray_address}")
    for e in sorted(endpoints, key=lambda e: e.name):
        lines.append(f"  engine     {e.name:<28} {e.url:<24} model={e.model} ready={str(e.ready).lower()}")
    lines.append("Press Ctrl-C or run `rayfleet down` to stop.")
    print("\n".join(lines), flush=True)


DELETE_GRACE_S = 15.0


def _teardown(started_ray: bool) -> None:
    """Delete the app (its engine manager stops the engines), the registry, then Ray if ours.

    Serve's own delete waits until HAProxy has drained every client connection, idle
    keep-alive ones included, which can take minutes; in-flight requests get
    ``DELETE_GRACE_S`` instead. On our own cluster, ``ray.shutdown`` then ends whatever
    is left: engines die with their actors, and HAProxy is stopped by hand.
    """
    import ray
    from ray import serve

    from serve_apps.registry import get_registry

    node_id = ray.get_runtime_context().get_node_id()
    try:
        serve.delete(APP_NAME, _blocking=False)
        deadline = time.monotonic() + DELETE_GRACE_S
        while APP_NAME in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)
        ray.kill(get_registry(create=False))
    except Exception as exc:  # already gone, or Ray itself is going down
        print(f"rayfleet: cleanup: {exc}", file=sys.stderr)
    ray.shutdown()
    if started_ray:
        kill_haproxy(node_id)
    state = read_state()
    if state and state.pid == os.getpid():
        state_path().unlink(missing_ok=True)


def _clean_up_after(state: StackState) -> None:
    """A ``rayfleet up`` that was killed outright leaves its state file and HAProxy behind."""
    if state.started_ray:
        kill_haproxy(state.node_id)
    state_path().unlink(missing_ok=True)


def kill_haproxy(node_id: str) -> None:
    """Stop HAProxy processes Serve left behind on our node.

    Serve 2.60 starts a new HAProxy on every route change (``-sf`` reload) and does not
    always reap them when the cluster goes down; an orphan keeps the gateway port bound.
    Serve keeps each node's HAProxy files under a directory named after the node id,
    which is how ours are told apart from any other cluster's.
    """
    for pid in pids_matching("haproxy", f"/haproxy-serve/{node_id}/"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pids_matching(*fragments: str) -> set[int]:
    """PIDs whose command line (arguments joined by spaces) contains every fragment."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(fragment in cmdline for fragment in fragments):
            found.add(int(entry.name))
    return found


def down(timeout_s: float = 90.0) -> int:
    """Signal the running ``rayfleet up`` and wait until it has cleaned up."""
    state = read_state()
    if state is None or not pid_alive(state.pid):
        if state is not None:
            _clean_up_after(state)
        print("rayfleet is not running")
        return 0
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(state.pid):
        if time.monotonic() > deadline:
            raise UsageError(f"rayfleet (pid {state.pid}) did not stop in {timeout_s:.0f}s: kill it and run `ray stop`")
        time.sleep(0.2)
    print(f"rayfleet stopped (pid {state.pid})")
    return 0


def status() -> dict:
    """Models, their endpoints and the gateway address, read live from the registry."""
    state = read_state()
    if state is None or not pid_alive(state.pid):
        raise UsageError("rayfleet is not running: start it with `rayfleet up`")
    import ray

    from serve_apps.registry import NAMESPACE, get_registry

    _use_ray_token_if_present()
    ray.init(address=state.ray_address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    try:
        snapshot = ray.get(get_registry(create=False).snapshot.remote())
        autoscalers = _autoscaler_status()
    finally:
        ray.shutdown()
    models: dict[str, list[dict]] = {}
    for e in sorted(snapshot.endpoints, key=lambda e: e.name):
        for name in e.served_names():
            models.setdefault(name, []).append({"name": e.name, "url": e.url, "ready": e.ready})
    return {
        "gateway": state.gateway_url,
        "dashboard": state.dashboard_url,
        "ray_address": state.ray_address,
        "models": [{"name": name, "endpoints": eps} for name, eps in sorted(models.items())],
        "autoscalers": autoscalers,
    }


def _autoscaler_status() -> list[dict]:
    """Every rayfleet autoscaler's status (none when the application has no autoscaling)."""
    import ray

    from serve_apps.autoscalers import ACTOR_PREFIX

    named = ray.util.list_named_actors(all_namespaces=True)
    actors = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named if a["name"].startswith(ACTOR_PREFIX)]
    return ray.get([actor.status.remote() for actor in actors], timeout=10)


def _use_ray_token_if_present() -> None:
    """Send the cluster's auth token, as ``ray.init()`` does when it starts a cluster.

    Ray 2.60 turns token auth on for a new local cluster, but a client connecting to an
    explicit address only sends the token if RAY_AUTH_MODE=token was set before Ray
    loaded. Ray's own helper for that decision is private; it is the exact rule we want.
    """
    from ray._private.authentication import authentication_token_setup as token_setup

    logging.getLogger(token_setup.__name__).setLevel(logging.ERROR)  # its notice is for cluster owners
    token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def format_status(info: dict) -> str:
    lines = [f"gateway  {info['gateway']}"]
    for model in info["models"]:
        ready = sum(e["ready"] for e in model["endpoints"])
        lines.append(f"model    {model['name']}  ({ready}/{len(model['endpoints'])} ready)")
        lines.extend(f"  {e['name']:<28} {e['url']:<24} ready={str(e['ready']).lower()}" for e in model["endpoints"])
    for a in info.get("autoscalers", []):
        lines.append(f"autoscaler {a['name']} ({a['strategy']} on {a['target']}, {a['min']}-{a['max']}): "
                     f"{a['current']} replicas, {a['ready']} ready, desired {a['desired']}, {a['scale_events']} scale events")  # fmt: skip
        lines.append(f"  last decision: {a['reason']}")
    return "\n".join(lines)
