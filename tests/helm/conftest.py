"""Fixtures of the chart tests: Helm's binary, and the chart rendered per set of values.

Helm comes from `scripts/install-helm.sh` (run by `make test`) into `.tools/bin/helm`; without
it the tests that need it are skipped with that reason, and with CI=true they fail instead.
Rendering is cached per set of values, so the whole suite runs `helm template` a handful of
times.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from helm.chart import HELM, ROOT, Rendered, helm, parse, template_args

_cache: dict[tuple[str, ...], Rendered] = {}


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    if not HELM.exists():
        reason = f"{HELM.relative_to(ROOT)} is missing: run `bash scripts/install-helm.sh`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # in CI a missing tool is a broken pipeline, not a pass
        pytest.skip(reason)
    return HELM


@pytest.fixture(scope="session")
def render(helm_binary: Path) -> Callable[..., Rendered]:
    """render("production-values.yaml", "--set", "a=b") -> the objects, CRDs included."""

    def _render(values: str = "default", *extra: str) -> Rendered:
        key = (values, *extra)
        if key not in _cache:
            result = helm(*template_args(values, "--include-crds", *extra))
            assert result.returncode == 0, result.stderr
            _cache[key] = parse(result.stdout)
        return _cache[key]

    return _render


@pytest.fixture(scope="session")
def default(render: Callable[..., Rendered]) -> Rendered:
    return render()


@pytest.fixture(scope="session")
def production(render: Callable[..., Rendered]) -> Rendered:
    return render("production-values.yaml")


@pytest.fixture(scope="session")
def loadbalancer(render: Callable[..., Rendered]) -> Rendered:
    return render("loadbalancer-values.yaml")
