"""``rayfleet up`` / ``status`` / ``down`` as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from rayfleet.stack import pids_matching
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayfleet.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: none of the Serve settings this test session gave its own cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    return {**env, "RAYFLEET_HOME": str(home), "RAY_ADDRESS": ""}


def test_up_status_stream_down_leaves_nothing_behind(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "rayfleet.cli", "up", "--engines", "2", "--port", str(port), "--model", "demo",
         "--autoscale", "kpa", "--min", "2", "--max", "3", "--admin-token", "test-admin-token"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        for line in up.stdout:
            lines.append(line)
            if "rayfleet is up" in line:
                ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    try:
        assert ready.wait(180), "".join(lines)
        time.sleep(1)  # the rest of the summary
        summary = "".join(lines)
        assert f"http://127.0.0.1:{port}" in summary and summary.count("engine ") == 2
        assert "embedded store" in summary and "admin token: test-admin-token" in summary

        status = cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["gateway"] == f"http://127.0.0.1:{port}"
        (model,) = info["models"]
        assert model["name"] == "demo" and len(model["endpoints"]) == 2
        assert all(e["ready"] for e in model["endpoints"])
        (autoscaler,) = info["autoscalers"]
        assert (autoscaler["strategy"], autoscaler["target"], autoscaler["min"], autoscaler["max"]) == (
            "KPA", "EnginePool/demo", 2, 3)  # fmt: skip
        assert "autoscaler demo (KPA on EnginePool/demo, 2-3)" in cli("status", env=env).stdout

        # Users and limits on the embedded store: the user API on the gateway's port, then a
        # request on the user's budget carries the rate-limit headers.
        admin = {"authorization": "Bearer test-admin-token", "content-type": "application/json"}
        created = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/users", data=b'{"name": "alice", "rpm": 7}', headers=admin), timeout=10)
        assert created.status == 201
        limited = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                default_headers={"user": "alice"})  # fmt: skip
        reply = limited.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.headers["x-ratelimit-limit-requests"] == "7"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        engine_url = model["endpoints"][0]["url"]
        metrics = urllib.request.urlopen(f"{engine_url}/metrics", timeout=5).read().decode()
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"):
            assert name in metrics

        engine_ports = [e["url"].rsplit(":", 1)[1] for e in model["endpoints"]]
        engine_pids = set().union(*(pids_matching(f"--port {p} ") for p in engine_ports))
        gcs_port = info["ray_address"].rsplit(":", 1)[1]
        ray_pids = pids_matching(f"--gcs-address={info['ray_address']}") | pids_matching(f"--gcs_server_port={gcs_port}")
        assert engine_pids and ray_pids

        down = cli("down", env=env)
        assert down.returncode == 0, down.stderr
        up.wait(30)
        assert up.returncode == 0
        time.sleep(1)
        leftovers = {p for p in engine_pids | ray_pids if Path(f"/proc/{p}").exists()}
        assert not leftovers, f"processes left behind: {leftovers}"
        assert not (tmp_path / "up.json").exists()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if up.poll() is None:  # a failed assertion: still tear the stack down properly
            up.terminate()
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()


def test_the_deployed_config_holds_the_admin_tokens_digest_only(tmp_path: Path) -> None:
    """The Ray dashboard shows Serve configs to anyone who can open it: the admin token must
    not be in them, whether it came from the flag or from a config file."""
    from rayfleet.protocol.users import key_digest
    from rayfleet.stack import UpOptions, build_config

    users = build_config(UpOptions(admin_token="flag-admin-token"))["users"]
    assert users["admin_token"] is None and users["admin_token_sha256"] == key_digest("flag-admin-token")
    config_file = tmp_path / "app.json"
    config_file.write_text(json.dumps({"users": {"enabled": True, "admin_token": "file-admin-token"}, "models": []}))
    users = build_config(UpOptions(config_file=str(config_file)))["users"]
    assert users["admin_token"] is None and users["admin_token_sha256"] == key_digest("file-admin-token")
    assert "file-admin-token" not in json.dumps(build_config(UpOptions(config_file=str(config_file))))


def test_cli_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    result = cli("status", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "rayfleet up" in result.stderr
    result = cli("up", "--engines", "0", env=env)
    assert result.returncode == 2 and "--engines" in result.stderr
    result = cli("up", "--strategy", "nope", env=env)
    assert result.returncode == 2 and "least-request" in result.stderr
    result = cli("up", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "cannot reach Redis" in result.stderr and "--redis" in result.stderr
    result = cli("up", "--autoscale", "kpa", "--autoscale-option", "warp=9", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "no knob 'warp'" in result.stderr
    assert cli("down", env=env).stdout.strip() == "rayfleet is not running"


def test_the_stack_waits_until_the_ingress_routes_to_the_gateway() -> None:
    """An ingress that is not yet answering for the gateway (404, 503) is waited out, within a bound."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rayfleet.stack import wait_for_route

    answers = [404, 404, 503, 200]

    class Ingress(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(answers.pop(0) if len(answers) > 1 else answers[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ingress)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for_route(f"http://127.0.0.1:{server.server_port}", timeout_s=30)
        assert answers == [200]
        answers[0] = 404
        with pytest.raises(RuntimeError, match="did not answer /health"):
            wait_for_route(f"http://127.0.0.1:{server.server_port}", timeout_s=0.3)
    finally:
        server.shutdown()


def test_a_benchmark_stopped_with_sigterm_tears_its_stack_down(tmp_path: Path) -> None:
    """``kill`` on a running benchmark: the stack goes down in order and frees the gateway port
    (Ray's own SIGTERM handler would exit at once and leave Serve's HAProxy holding it)."""
    import signal

    from rayfleet.ports import port_in_use
    from tests.polling import eventually

    port = free_port()
    log = tmp_path / "bench.log"
    with log.open("w") as stderr:
        bench = subprocess.Popen(
            [sys.executable, "-m", "rayfleet.cli", "bench", "overhead", "--duration", "120", "--concurrency", "4",
             "--client", "python", "--port", str(port)],
            env=user_env(tmp_path), stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        eventually(lambda: port_in_use("127.0.0.1", port) or bench.poll() is not None, "the gateway's port", 120)
        assert bench.poll() is None, log.read_text()[-3000:]
        time.sleep(2)  # into the measurement
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 128 + signal.SIGTERM
        assert not port_in_use("127.0.0.1", port)
    finally:
        if bench.poll() is None:
            bench.kill()


def test_each_stack_takes_direct_ingress_ports_no_other_cluster_listens_on(gateway_port: int) -> None:
    """Serve binds ingress replicas with SO_REUSEPORT from one default port up, so two clusters
    on a machine would share a port and each other's traffic. This session's cluster runs a
    gateway replica on its block; a second stack's block must avoid it."""
    from rayfleet.ports import listening_ports
    from rayfleet.stack import serve_environment
    from tests.conftest import deploy_app, pool_config

    deploy_app(pool_config(replicas=1), gateway_port, expected_ready=1)
    low, high = (int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_{end}_HTTP_PORT"]) for end in ("MIN", "MAX"))
    assert low != 30000 and not listening_ports().isdisjoint(range(low, high + 1))  # our gateway's port
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_SERVE_DIRECT_INGRESS_")}
    try:
        other = serve_environment()
    finally:
        os.environ.update(saved)
    for protocol in ("HTTP", "GRPC"):
        low = int(other[f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT"])
        high = int(other[f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT"])
        assert high > low and listening_ports().isdisjoint(range(low, high + 1))
