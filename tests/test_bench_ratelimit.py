"""``rayfleet bench ratelimit`` end to end on short runs, in a subprocess with its own Ray cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_stack import cli, user_env

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("store", ["redis", "embedded"])
def test_command_reports_limiter_cost_and_throughput_with_limits_on_and_off(tmp_path: Path, store: str) -> None:
    if store == "redis" and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    out = tmp_path / "ratelimit.json"
    result = cli(
        "bench", "ratelimit", "--store", store, "--duration", "1.5", "--warmup", "0.2", "--repeat", "1",
        "--samples", "100", "--handle-samples", "10", "--client", "python", "--port", str(free_port()),
        "--out", str(out), env=user_env(tmp_path), timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    throughput = {row["limits"]: row for row in rows if row["workload"] != "admission"}
    assert set(throughput) == {"on", "off"}
    assert all(row["achieved_rps"] > 0 and row["errors"] == 0 for row in throughput.values())
    assert throughput["off"]["limiter_p50_s"] == 0 and throughput["on"]["limiter_p50_s"] > 0
    limiter = {row["path"]: row for row in rows if row["workload"] == "admission"}
    assert set(limiter) == {"direct", "handle"}
    assert all(0 < row["limiter_p50_s"] <= row["limiter_p99_s"] for row in limiter.values())
    assert "limits on" in result.stdout and "DeploymentHandle" in result.stdout


def test_busy_port_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        result = cli("bench", "ratelimit", "--port", str(held.getsockname()[1]), env=user_env(tmp_path))
    assert result.returncode == 2 and "is in use" in result.stderr and len(result.stderr.strip().splitlines()) == 1
