"""The test kube-apiserver (``tests/kube_env.py``): the one ``.ci/run`` serves for the session
(``RAYFLEET_TEST_KUBECONFIG``), else one started here. Tests share it, so each works in its own
namespace."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube_env import KubeBinariesMissing, KubeTestEnv


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeTestEnv]:
    """Skips where kube-apiserver is not built, except in CI (``CI=true``), where that is a failure."""
    kubeconfig = os.environ.get("RAYFLEET_TEST_KUBECONFIG")
    if kubeconfig:
        yield KubeTestEnv.attach(Path(kubeconfig))
        return
    try:
        env = KubeTestEnv.start()
    except KubeBinariesMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the test kube-apiserver: {missing}")
        pytest.skip(str(missing))
    yield env
    env.stop()


@pytest.fixture
def kube_namespace(kube: KubeTestEnv) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (the namespace controller then removes what is in it)."""
    from kubernetes import client

    name = f"rf-test-{secrets.token_hex(4)}"
    with kube.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.create_namespace({"metadata": {"name": name}})
        yield name
        core.delete_namespace(name)
