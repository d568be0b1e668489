"""A real Kubernetes control plane for tests: etcd, kube-apiserver v1.20.2 and the garbage-collector
and namespace controllers of kube-controller-manager, on loopback with throwaway state.

No registry ships kube-apiserver, so ``.ci/kube-build`` builds it from Debian's source package and
caches it (``../shared/reference/kubernetes.md`` §1). There is no scheduler, kubelet or KubeRay
operator: no pod ever runs, and tests write RayCluster ``/status`` themselves.

``python3 -m tests.kube_env serve --state-file F`` runs one for a whole test session (``.ci/run``
does): it writes ``{"kubeconfig", "server", "token", "pid"}`` to F once ready and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from engines.launcher import spawn_child, stop_child
from rayfleet.ports import free_port
from tests.polling import eventually

REPO = Path(__file__).resolve().parents[1]
KUBE_BUILD = REPO / ".ci" / "kube-build"
BINARIES = ("kube-apiserver", "kube-controller-manager")
START_TIMEOUT_S = 120.0  # the apiserver is ready in ~4 s alone; leave room for a busy 2-core box
CRD_TIMEOUT_S = 60.0
CEL_KEY = "x-kubernetes-validations"  # CEL arrived in 1.25; the 1.20 server rejects or drops it
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KubeRay CRD is ~930 KB


class KubeBinariesMissing(RuntimeError):
    """The control plane cannot start on this machine; the message says how to fix that."""


def find_binaries() -> Path:
    """The directory holding kube-apiserver and kube-controller-manager: ``RAYFLEET_KUBE_BIN``, else
    the cache of ``.ci/kube-build`` (asked with ``--cached-only``: a test never starts a build)."""
    configured = os.environ.get("RAYFLEET_KUBE_BIN")
    if configured:
        directory = Path(configured)
    else:
        found = subprocess.run([str(KUBE_BUILD), "--cached-only"], capture_output=True, text=True, check=False)
        if found.returncode != 0:
            raise KubeBinariesMissing(
                "kube-apiserver is not built: run .ci/kube-build once (about 7 minutes), or set RAYFLEET_KUBE_BIN"
            )
        directory = Path(found.stdout.strip().splitlines()[-1])
    missing = [name for name in BINARIES if not (directory / name).is_file()]
    if missing:
        raise KubeBinariesMissing(f"{', '.join(missing)} missing from {directory}: run .ci/kube-build")
    if shutil.which("etcd") is None:
        raise KubeBinariesMissing("etcd is not installed: apt-get install etcd-server (.ci/kube-build does)")
    return directory


def without_cel(node: Any) -> Any:
    """A copy of ``node`` with every ``x-kubernetes-validations`` key removed, at any depth."""
    if isinstance(node, dict):
        return {key: without_cel(value) for key, value in node.items() if key != CEL_KEY}
    if isinstance(node, list):
        return [without_cel(value) for value in node]
    return node


def _write_service_account_keys(private: Path, public: Path) -> None:
    """The RSA pair the apiserver signs and checks service-account tokens with."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public)], check=True, capture_output=True
        )
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _answers(url: str, token: str | None = None) -> bool:
    """Whether ``url`` answers 200 (TLS unverified: the apiserver's certificate is self-signed)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


class KubeTestEnv:
    """A control plane this process started (``start``) or one started elsewhere (``attach``)."""

    def __init__(self, kubeconfig_path: Path, server_url: str, token: str, workdir: Path | None = None) -> None:
        self.kubeconfig_path = kubeconfig_path
        self.server_url = server_url
        self.token = token
        self._workdir = workdir  # owned (removed by stop) only when this process started the servers
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    @classmethod
    def start(cls, bin_dir: Path | None = None) -> KubeTestEnv:
        """etcd, then kube-apiserver (waiting for ``/readyz``), then kube-controller-manager."""
        binaries = bin_dir or find_binaries()
        workdir = Path(tempfile.mkdtemp(prefix="rayfleet-kube-"))
        env = cls(workdir / "kubeconfig", f"https://127.0.0.1:{free_port()}", secrets.token_hex(16), workdir)
        try:
            env._write_kubeconfig()
            etcd_url = env._start_etcd()
            env._start_apiserver(binaries / "kube-apiserver", etcd_url)
            env._spawn(
                "kube-controller-manager",
                [str(binaries / "kube-controller-manager"), f"--kubeconfig={env.kubeconfig_path}",
                 "--controllers=garbagecollector,namespace", "--leader-elect=false", "--port=0", "--secure-port=0"],
            )  # fmt: skip
        except BaseException:
            env.stop()
            raise
        return env

    @classmethod
    def attach(cls, kubeconfig_path: Path) -> KubeTestEnv:
        """The control plane a kubeconfig written by ``start`` points at; ``stop`` leaves it running."""
        config = yaml.safe_load(kubeconfig_path.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        return cls(kubeconfig_path, cluster["server"], user["token"])

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        assert self._workdir is not None
        process = spawn_child(command, self._workdir / f"{name}.log")
        self._processes.append((name, process))
        return process

    def _wait_for(self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
        """Wait until ``ready`` holds; fail early if the process exits, and show its log either way."""
        assert self._workdir is not None
        log = self._workdir / f"{name}.log"

        def tail() -> str:
            return log.read_text(errors="replace")[-3000:]

        def alive_and_ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; log tail:\n{tail()}")
            return ready()

        try:
            eventually(alive_and_ready, f"{name} to be ready", START_TIMEOUT_S)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; log tail:\n{tail()}") from None

    def _start_etcd(self) -> str:
        assert self._workdir is not None
        client_url, peer_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
        process = self._spawn(
            "etcd",
            ["etcd", "--name=default", f"--data-dir={self._workdir / 'etcd'}",
             f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
             f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
             f"--initial-cluster=default={peer_url}", "--logger=zap", "--log-level=warn"],
        )  # fmt: skip
        self._wait_for("etcd", process, lambda: _answers(f"{client_url}/health"))
        return client_url

    def _start_apiserver(self, binary: Path, etcd_url: str) -> None:
        """The flags of kubernetes.md §1.3 step 5: loopback only, token auth as system:masters, RBAC."""
        assert self._workdir is not None
        private_key, public_key = self._workdir / "sa.key", self._workdir / "sa.pub"
        _write_service_account_keys(private_key, public_key)
        tokens = self._workdir / "tokens.csv"
        tokens.write_text(f"{self.token},admin,admin,system:masters\n")
        port = self.server_url.rsplit(":", 1)[1]
        process = self._spawn(
            "kube-apiserver",
            [str(binary), f"--etcd-servers={etcd_url}",
             "--bind-address=127.0.0.1", f"--secure-port={port}", "--insecure-port=0",
             f"--cert-dir={self._workdir / 'certs'}", f"--token-auth-file={tokens}",
             "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
             f"--service-account-key-file={public_key}", f"--service-account-signing-key-file={private_key}",
             "--service-cluster-ip-range=10.96.0.0/24",
             "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
             "--disable-admission-plugins=ServiceAccount"],
        )  # fmt: skip
        self._wait_for("kube-apiserver", process, lambda: _answers(f"{self.server_url}/readyz", self.token))

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "rayfleet-test", "cluster": {"server": self.server_url, "insecure-skip-tls-verify": True}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "rayfleet-test", "context": {"cluster": "rayfleet-test", "user": "admin"}}],
            "current-context": "rayfleet-test",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this server, built from the kubeconfig like any client's."""
        import urllib3
        from kubernetes import config

        # The kubeconfig skips TLS verification on purpose (a self-signed loopback server); without
        # this, every request of every test would warn about it.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        return config.new_client_from_config(config_file=str(self.kubeconfig_path))

    def load_crd(self, crd: str | Path | dict) -> None:
        """Create, or replace, a CustomResourceDefinition (a YAML path or a dict) without its CEL rules,
        and wait until it is Established.

        Not client-side apply: its last-applied annotation cannot hold the ~930 KB KubeRay CRD."""
        from kubernetes.client import ApiextensionsV1Api
        from kubernetes.client.exceptions import ApiException

        body = without_cel(crd if isinstance(crd, dict) else yaml.load(Path(crd).read_text(), Loader=_YAML_LOADER))
        name = body["metadata"]["name"]
        with self.api_client() as client:
            # Raw responses: the typed models only slow down (de)serializing a CRD this large.
            api = ApiextensionsV1Api(client)
            try:
                api.create_custom_resource_definition(body, _preload_content=False)
            except ApiException as error:
                if error.status != 409:
                    raise
                stored = json.loads(api.read_custom_resource_definition(name, _preload_content=False).data)
                body["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
                api.replace_custom_resource_definition(name, body, _preload_content=False)

            def established() -> bool:
                stored = json.loads(api.read_custom_resource_definition(name, _preload_content=False).data)
                conditions = stored.get("status", {}).get("conditions") or []
                return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

            eventually(established, f"CRD {name} to be Established", CRD_TIMEOUT_S)

    def stop(self) -> None:
        """Stop what ``start`` started (newest first) and remove its files; an attached env stays up."""
        for _, process in reversed(self._processes):
            stop_child(process, grace_s=10.0)
        self._processes.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _serve(state_file: Path) -> None:
    """Run one control plane until SIGTERM or SIGINT, announcing it through ``state_file``."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    env = KubeTestEnv.start()
    try:
        state = {
            "kubeconfig": str(env.kubeconfig_path),
            "server": env.server_url,
            "token": env.token,
            "pid": os.getpid(),
        }
        partial = state_file.with_name(state_file.name + ".partial")
        partial.write_text(json.dumps(state))
        partial.replace(state_file)  # readers never see half a file
        while True:
            signal.pause()
    finally:
        state_file.unlink(missing_ok=True)
        env.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m tests.kube_env", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run etcd, kube-apiserver and kube-controller-manager until SIGTERM")
    serve.add_argument(
        "--state-file", type=Path, required=True, help="where to write kubeconfig/server/token once ready"
    )
    _serve(parser.parse_args().state_file)


if __name__ == "__main__":
    main()
