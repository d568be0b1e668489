"""The RayClusterFleet and RayCluster CRDs on the shared test apiserver (``tests/kube_fixtures.py``),
installed once per session. Installing replaces whatever an earlier install left, so any module may
ask for them in any order."""

from __future__ import annotations

import pytest

from tests.kube_env import KubeTestEnv
from tests.kuberay import fleet_crd, raycluster_crd


@pytest.fixture(scope="session")
def fleet_crd_installed(kube: KubeTestEnv) -> KubeTestEnv:
    """Our CRD from ``manifests/crd``, Established."""
    kube.load_crd(fleet_crd())
    return kube


@pytest.fixture(scope="session")
def raycluster_crd_installed(kube: KubeTestEnv) -> KubeTestEnv:
    """KubeRay's RayCluster CRD (or the minimal stand-in, ``tests/kuberay.py``), Established."""
    kube.load_crd(raycluster_crd())
    return kube
