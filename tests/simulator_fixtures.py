"""Real simulator subprocesses for tests: start one, wait until it serves, stop it after.

The simulator is started with ``--port 0`` and its ready line says which port the OS gave
it, so parallel tests never race for a "free" port. Fixtures:

- ``simulator_factory``: a function ``start(*flags) -> SimulatorProcess``; every process it
  started is stopped when the test ends.
- ``simulator``: one instant-GPU, time-scale-0 simulator shared by a whole test module.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_READY = re.compile(r"simulator ready on (http://\S+)")


@dataclass
class SimulatorProcess:
    process: subprocess.Popen[bytes]
    url: str  # http://host:port, without a trailing slash
    log_path: Path

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_simulator(*flags: str, model: str = DEFAULT_MODEL, log_dir: Path | None = None) -> SimulatorProcess:
    """Start ``python -m engines.simulator serve`` and return once ``/health`` answers 200."""
    log_file = tempfile.NamedTemporaryFile(prefix="simulator-", suffix=".log", dir=log_dir, delete=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "engines.simulator", "serve", model, "--host", "127.0.0.1", "--port", "0", *flags]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    simulator = SimulatorProcess(process=process, url="", log_path=Path(log_file.name))
    try:
        simulator.url = _wait_until_ready(simulator)
    except BaseException:
        simulator.stop()
        raise
    return simulator


def _wait_until_ready(simulator: SimulatorProcess) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if simulator.process.poll() is not None:
            raise RuntimeError(f"simulator exited with {simulator.process.returncode}:\n{simulator.log()}")
        match = _READY.search(simulator.log())
        if match and _healthy(match.group(1)):
            return match.group(1)
        time.sleep(0.05)
    raise TimeoutError(f"simulator not ready after {START_TIMEOUT_S}s:\n{simulator.log()}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture
def simulator_factory(tmp_path: Path) -> Iterator[Callable[..., SimulatorProcess]]:
    started: list[SimulatorProcess] = []

    def start(*flags: str, model: str = DEFAULT_MODEL) -> SimulatorProcess:
        simulator = start_simulator(*flags, model=model, log_dir=tmp_path)
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    process = start_simulator("--gpu", "instant", "--time-scale", "0", log_dir=tmp_path_factory.mktemp("simulator"))
    yield process
    process.stop()
