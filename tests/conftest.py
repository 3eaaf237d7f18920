"""Fixtures shared by every suite."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import Binaries, ControlPlane, ControlPlaneUnavailable, build_binaries
from pki import Pki
from support import checked_run


@pytest.fixture(autouse=True)
def no_leaked_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``asyncio.run`` in a test fails if its main coroutine leaves tasks running."""
    monkeypatch.setattr(asyncio, "run", checked_run)


KEPT_LOGS = pytest.StashKey[list[str]]()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def k8s_binaries() -> Binaries:
    """kube-apiserver, kube-controller-manager, kubectl and etcd, built (or reused) from the
    pins in tools/. With CI=true a missing toolchain or a failed build fails the run."""
    try:
        return build_binaries()
    except ControlPlaneUnavailable as error:
        if _in_ci():
            pytest.fail(f"CI=true and the control plane is unavailable: {error}")
        pytest.skip(f"no real control plane: {error}")


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, k8s_binaries: Binaries) -> Iterator[ControlPlane]:
    """One real control plane (etcd, kube-apiserver, kube-controller-manager) per test run,
    on 127.0.0.1. Its logs are removed after a green run and kept (path printed) otherwise."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-controlplane-"))
    plane = ControlPlane(k8s_binaries, folder)
    failed_before = request.session.testsfailed
    try:
        plane.start()
    except BaseException:
        plane.stop()
        request.config.stash.setdefault(KEPT_LOGS, []).append(str(plane.logs))
        raise
    try:
        yield plane
    finally:
        crashed = plane.failed_processes()
        plane.stop()
        if request.session.testsfailed > failed_before or crashed:
            request.config.stash.setdefault(KEPT_LOGS, []).append(str(plane.logs))
        else:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for logs in terminalreporter.config.stash.get(KEPT_LOGS, []):
        terminalreporter.write_line(f"control plane logs kept: {logs}", yellow=True)
