"""Fixtures of the image tests: the archives of `make images` loaded into a throwaway podman
store, and the chart's pod specs (`helm template`), whose security context and mounts the
containers get."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from helm.chart import HELM, ROOT, helm, parse, template_args
from imagerun import COMPONENTS, OUT, Podman, archive, image_name, missing


@pytest.fixture(scope="session")
def archives() -> dict[str, str]:
    """component -> the image name, after checking that `make images` wrote its archive."""
    for component in COMPONENTS:
        if not archive(component).exists():
            missing(f"{archive(component).relative_to(ROOT)} is missing: run `make images`")
    if not (OUT / "digests.txt").exists():
        missing(f"{(OUT / 'digests.txt').relative_to(ROOT)} is missing: run `make images`")
    return {component: image_name(component) for component in COMPONENTS}


@pytest.fixture(scope="session")
def podman(archives: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        for component in COMPONENTS:
            engine.load(archive(component))
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def pod_specs() -> dict[str, dict[str, Any]]:
    """component -> the pod spec the chart renders with its default values."""
    if not HELM.exists():
        missing(f"{HELM.relative_to(ROOT)} is missing: run `bash scripts/install-helm.sh`")
    result = helm(*template_args("default"))
    assert result.returncode == 0, result.stderr
    rendered = parse(result.stdout)
    specs: dict[str, dict[str, Any]] = {}
    for kind in ("Deployment", "StatefulSet"):
        for workload in rendered.of_kind(kind):
            component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
            specs[component] = workload["spec"]["template"]["spec"]
    assert set(COMPONENTS) <= set(specs), specs.keys()
    return specs
