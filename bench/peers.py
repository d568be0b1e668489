"""Peer routers (``sglang-router``, ``vllm-router``) in front of our engines, for side-by-side benchmarks.

Each peer is installed from PyPI at a pinned version into its own venv under
``<rayfleet home>/peers/<name>-<version>/``, so its dependencies never meet ours, and run
as a child process on a free loopback port with ``--worker-urls`` pointing at the engines.
``running_peer`` yields the router's base URL, which plugs into ``bench.loadgen.Target``
as ``base_url`` unchanged (the load generator appends ``/v1/...``).

What the routers ask of a worker (observed against the simulator): both probe ``/health``.
``sglang-router`` 0.3.2 also tries an HTTP/2 (gRPC) handshake and SGLang-only metadata
endpoints once at registration (``/server_info``, ``/model_info`` and their ``/get_*``
fallbacks); a 404 leaves the model id ``unknown``, as in front of a real vLLM. With
``power_of_two`` both poll SGLang's ``/get_load`` every 30 s; vLLM has no such endpoint,
so they fall back to their own in-flight counts, again as in front of a real vLLM.
``vllm-router``'s ``cache_aware`` and ``kv_aware`` ask every worker for the prompt's
tokens on every request (``/v1/chat/completions/render`` or ``/v1/completions/render``,
then ``/tokenize`` when that answers 404).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchUsageError
from engines.launcher import log_dir, spawn_child, stop_child
from rayfleet.ports import free_port
from rayfleet.stack import rayfleet_home

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
_POLL_S = 0.1
_MARKER = ".rayfleet-installed"


@dataclass(frozen=True, slots=True)
class PeerRouter:
    """What we know about one peer router package: how to install, start and quiet it."""

    name: str
    version: str
    script: str  # the console script the package installs
    subcommand: tuple[str, ...]  # arguments before the flags
    policies: tuple[str, ...]
    quiet_log_level: str  # the level name this router's --log-level accepts for "warnings only"


ROUTERS: dict[str, PeerRouter] = {
    router.name: router
    for router in (
        # 0.3.2's console scripts (sglang-router, smg, amg) are one CLI with subcommands
        # `launch` (router only) and `server` (router plus SGLang engines).
        PeerRouter(
            name="sglang-router",
            version="0.3.2",
            script="sglang-router",
            subcommand=("launch",),
            policies=("random", "round_robin", "cache_aware", "power_of_two"),
            quiet_log_level="warn",
        ),
        PeerRouter(
            name="vllm-router",
            version="0.1.17",
            script="vllm-router",
            subcommand=(),
            policies=("random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash"),
            quiet_log_level="warning",
        ),
    )
}


class PeerLabelError(BenchUsageError, ValueError):
    """A peer label or spec we do not know; a ``ValueError`` that the bench CLI prints as one line."""


class PeerInstallError(BenchUsageError):
    """Installing a peer failed; the message names the step, the fix and the log, on one line."""


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One peer configuration in a benchmark: which router, at which version, with which policy.

    ``version`` defaults to the pinned one, so benchmark rows stay comparable across runs.
    """

    name: str
    policy: str
    version: str = ""

    def __post_init__(self) -> None:
        router = ROUTERS.get(self.name)
        if router is None:
            raise PeerLabelError(f"unknown peer router {self.name!r}: choose one of {', '.join(ROUTERS)}")
        if self.policy not in router.policies:
            raise PeerLabelError(
                f"{self.name} has no policy {self.policy!r}: choose one of {', '.join(router.policies)}"
            )
        if not self.version:
            object.__setattr__(self, "version", router.version)

    @property
    def router(self) -> PeerRouter:
        return ROUTERS[self.name]

    @property
    def label(self) -> str:
        """``name:policy``, as benchmark rows show it."""
        return f"{self.name}:{self.policy}"

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @classmethod
    def parse(cls, label: str) -> PeerSpec:
        """The spec for a label such as ``sglang-router:cache_aware``, at the pinned version."""
        name, sep, policy = label.strip().partition(":")
        if not sep or not name or not policy:
            raise PeerLabelError(f"peer label {label!r} is not NAME:POLICY: write e.g. sglang-router:cache_aware")
        return cls(name=name, policy=policy)


def peer_dir(spec: PeerSpec, home: Path | None = None) -> Path:
    return (home or rayfleet_home()) / "peers" / f"{spec.name}-{spec.version}"


def ensure_installed(spec: PeerSpec, home: Path | None = None) -> Path:
    """Install ``spec``'s router into its own venv unless it is there, and return its executable.

    A finished install leaves a marker naming the requirement, so a venv that an
    interrupted install left half-built is rebuilt instead of trusted. Two processes
    installing at once serialise on a lock file; the second finds the work done.
    """
    venv = peer_dir(spec, home)
    executable = venv / "bin" / spec.router.script
    if _installed(venv, executable, spec):
        return executable
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.with_name(f"{venv.name}.lock")):
        if _installed(venv, executable, spec):
            return executable
        shutil.rmtree(venv, ignore_errors=True)
        log_path = log_dir() / f"install-{spec.name}-{spec.version}.log"
        log_path.unlink(missing_ok=True)
        logger.info("installing %s into %s (log: %s)", spec.requirement, venv, log_path)
        _run_step(
            [sys.executable, "-m", "venv", str(venv)],
            log_path,
            failed=f"creating a venv for {spec.requirement} at {venv}",
            fix="install Python's venv module (Debian: apt-get install python3-venv) and retry",
        )
        _run_step(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
             spec.requirement],
            log_path,
            failed=f"pip install {spec.requirement} into {venv}",
            fix=f"check that PyPI is reachable from here and that {spec.requirement} exists there, then retry",
        )
        if not executable.is_file():
            raise PeerInstallError(
                f"{spec.requirement} installed but has no {executable.name} script; "
                f"fix: pin a version that ships it (see {spec.router.name} on PyPI); log: {log_path}"
            )
        (venv / _MARKER).write_text(spec.requirement + "\n")
    return executable


def _installed(venv: Path, executable: Path, spec: PeerSpec) -> bool:
    try:
        return executable.is_file() and (venv / _MARKER).read_text().strip() == spec.requirement
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_step(command: list[str], log_path: Path, failed: str, fix: str) -> None:
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if returncode != 0:
        detail = _last_error(log_path)
        raise PeerInstallError(f"{failed} failed (exit {returncode}){detail}; fix: {fix}; log: {log_path}")


def _last_error(log_path: Path) -> str:
    """pip's last ``ERROR:`` line, which usually says what went wrong (no matching version, no network)."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("ERROR:")]
    return f": {lines[-1][len('ERROR:'):].strip()}" if lines else ""


def router_command(
    spec: PeerSpec, executable: Path, worker_urls: Sequence[str], port: int, metrics_port: int
) -> list[str]:
    """The command line for a benchmark run: the router's defaults, except where it listens and logs.

    Kept at their defaults on purpose, since they are what a user of the peer gets:
    the policy's own parameters (cache_aware: cache threshold 0.3, balance thresholds
    64 / 1.5), retries (5, only on failed upstream requests), the circuit breaker, health
    checks (every 60 s) and admission (sglang-router: none; vllm-router: a 32,768 token
    bucket that does not bind at our rates). Changed: both bind to loopback, the
    Prometheus listener gets a free port (sglang-router's default is 0.0.0.0:29000,
    which a second router would collide with), and the log level is warnings only,
    because at the default INFO both write two lines per request, a cost on a shared
    2-core machine that our own gateway does not pay either.
    """
    router = spec.router
    return [
        str(executable),
        *router.subcommand,
        "--host", HOST,
        "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", spec.policy,
        "--prometheus-host", HOST,
        "--prometheus-port", str(metrics_port),
        "--log-level", router.quiet_log_level,
    ]  # fmt: skip


@contextlib.contextmanager
def running_peer(
    spec: PeerSpec,
    worker_urls: Sequence[str],
    home: Path | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[str]:
    """Run the peer router in front of ``worker_urls`` and yield its base URL (``http://127.0.0.1:PORT``).

    Returns only once the router answers ``/readiness`` with every worker healthy: both
    routers expose it, and sglang-router listens before it has registered its workers
    (it does that in the background), so answering alone is not enough. vllm-router
    counts a worker healthy until its first health check (60 s in), so the workers are
    checked here first: a dead one fails now, not as a lopsided benchmark. ``extra_args``
    go after ours, e.g. vllm-router's ``--kv-event-source`` flags for ``kv_aware``.
    The router dies with this process (PDEATHSIG) and is stopped on exit: SIGTERM, then
    SIGKILL after ``STOP_GRACE_S``.
    """
    urls = [url.rstrip("/") for url in worker_urls]
    if not urls or len(set(urls)) != len(urls):
        raise ValueError(f"worker_urls must be distinct and non-empty, got {list(worker_urls)}")
    for url in urls:
        if _get(f"{url}/health") is None:
            raise RuntimeError(f"worker {url} does not answer /health: start the engines before {spec.label}")
    executable = ensure_installed(spec, home)
    port = free_port(HOST)
    command = [*router_command(spec, executable, urls, port, free_port(HOST)), *extra_args]
    log_path = log_dir() / f"peer-{spec.name}-{spec.policy}-{port}.log"
    logger.info("starting %s: %s (log: %s)", spec.label, " ".join(command), log_path)
    process = spawn_child(command, log_path)
    base_url = f"http://{HOST}:{port}"
    try:
        _wait_ready(spec, process, base_url, len(urls), ready_timeout_s, log_path)
        yield base_url
    finally:
        stop_child(process, STOP_GRACE_S)


def _wait_ready(
    spec: PeerSpec, process: subprocess.Popen[bytes], base_url: str, workers: int, timeout_s: float, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    seen = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{spec.label} exited with {process.returncode} while starting; log: {log_path}")
        readiness = _json(_get(f"{base_url}/readiness"))
        if readiness is not None:
            healthy = readiness.get("healthy_workers")
            if healthy == workers and readiness.get("total_workers") == workers:
                return
            seen = f"{healthy} of {workers} workers healthy"
        time.sleep(_POLL_S)
    raise TimeoutError(f"{spec.label} not ready after {timeout_s:.0f}s ({seen}); log: {log_path}")


def _get(url: str) -> bytes | None:
    """The body of a 200 answer to GET ``url``, or None for any other answer or none."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read() if response.status == 200 else None
    except OSError:  # URLError and HTTPError are OSErrors
        return None


def _json(body: bytes | None) -> dict | None:
    try:
        value = json.loads(body) if body is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
