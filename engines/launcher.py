"""Run one engine (the simulator or ``vllm serve``) as a child process of a Ray actor.

The actor is the engine's handle in Ray: it reserves the GPUs, builds the command line from
``EngineConfig``, waits for ``/health``, registers the endpoint and takes it down again.
The engine itself stays an ordinary HTTP server process, exactly as vLLM ships it, so the
simulator and the real engine are started, probed and stopped by the same code.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import ray

from engines.config import EngineConfig, EngineKind
from rayfleet.ports import free_port

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = {"sim": 60.0, "vllm": 1800.0}  # vLLM may download and compile for many minutes


def _die_with_parent() -> None:
    """Runs in the child before exec: if the parent dies (even by SIGKILL), so does the child."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_child(command: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a helper process (an engine, a peer router) that logs to ``log_path``, runs in
    its own session (a Ctrl-C aimed at us is ours to handle) and dies with its parent.
    ``env`` is added to (or overrides) our own environment."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def stop_child(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: the child gets a chance to finish cleanly."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


DEFAULT_KV_EVENTS_ENDPOINT = "tcp://*:5557"  # vLLM's default


def _with_free_ports(kv_events_config: dict, host: str) -> dict:
    """``tcp://*:0`` endpoints get a free port here, on the engine's node: several engines
    on one machine cannot all bind vLLM's default 5557."""
    resolved = dict(kv_events_config)
    for key in ("endpoint", "replay_endpoint"):
        endpoint = resolved.get(key)
        if isinstance(endpoint, str) and endpoint.startswith("tcp://*:") and endpoint.endswith(":0"):
            resolved[key] = f"tcp://*:{free_port(host)}"
    return resolved


def _with_ports(config: EngineConfig) -> EngineConfig:
    """``config`` with port 0 (the HTTP port, ``tcp://*:0`` KV-event sockets) resolved to
    ports free right now. Every start resolves afresh: a port picked for an earlier start
    may have been taken since, and an engine that kept it could never start again."""
    if config.port == 0:
        config = config.model_copy(update={"port": free_port(config.host)})
    if config.kv_events_config is not None:
        config = config.model_copy(update={"kv_events_config": _with_free_ports(config.kv_events_config, config.host)})
    return config


def log_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "rayfleet" / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


class EngineProcess:
    """One engine process: start, wait until healthy, stop. Not a Ray actor by itself.

    ``EngineActor`` wraps it for Ray; tests and benchmarks use it directly when they need
    an engine without a cluster. ``requested`` is the configuration as given; ``config``
    is the one the current (or last) start ran with, its ports resolved, and ``url`` and
    ``kv_event_endpoints`` describe that start.
    """

    def __init__(self, name: str, config: EngineConfig, kind: EngineKind = "sim") -> None:
        self.name = name
        self.requested = config
        self.config = config
        self.kind = kind
        self.process: subprocess.Popen | None = None
        self.log_path = log_dir() / f"{name}.log"

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        return f"http://{host}:{self.config.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kv_event_endpoints(self) -> tuple[str, str | None] | None:
        """Where a subscriber connects for this engine's KV events (and their replay), or
        None when it publishes none: the bound ``tcp://*:PORT`` as ``tcp://HOST:PORT``."""
        events = self.config.kv_events_config
        if not events or not events.get("enable_kv_cache_events"):
            return None
        host = self.url.removeprefix("http://").rsplit(":", 1)[0]

        def connectable(endpoint: str | None) -> str | None:
            return endpoint.replace("*", host, 1) if endpoint else None

        return connectable(events.get("endpoint", DEFAULT_KV_EVENTS_ENDPOINT)), connectable(events.get("replay_endpoint"))

    async def start(self) -> None:
        """Start the process and return once ``/health`` answers 200."""
        if self.alive():
            return
        self.config = _with_ports(self.requested)
        command = self.config.command(self.kind)
        logger.info("starting engine %s: %s", self.name, " ".join(command))
        self.process = spawn_child(command, self.log_path, self.config.environment())
        await self._wait_healthy(START_TIMEOUT_S[self.kind])

    async def _wait_healthy(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while True:
                if not self.alive():
                    raise RuntimeError(f"engine {self.name} exited with {self.process.returncode}; log: {self.log_path}")
                try:
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    self.stop()
                    raise TimeoutError(f"engine {self.name} not healthy after {timeout_s:.0f}s; log: {self.log_path}")
                await asyncio.sleep(0.1)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: the engine gets a chance to finish cleanly."""
        if self.process is not None:
            stop_child(self.process, grace_s)
        self.process = None
