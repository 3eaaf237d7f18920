"""Fixtures of the suites on the real control plane (see tests/controlplane.py)."""

from __future__ import annotations

import kubernetes
import pytest

from controlplane import ControlPlane
from kube.cluster import api_client, install_crds


@pytest.fixture(scope="session")
def admin(control_plane: ControlPlane) -> kubernetes.client.ApiClient:
    """A client of the real API server as a member of system:masters."""
    return api_client(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def crds(admin: kubernetes.client.ApiClient) -> list[str]:
    """Both CRDs of crds/, applied and Established."""
    return install_crds(admin)
