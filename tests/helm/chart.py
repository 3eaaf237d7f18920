"""Helm's own binary on the chart: the paths, the command line and the parsed output."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mailflow"
HELM = ROOT / ".tools" / "bin" / "helm"
RELEASE = "mailflow"
NAMESPACE = "mail"

# Every values file of the chart's ci/ folder, plus the defaults (no file).
CI_FILES = sorted(path.name for path in (CHART / "ci").glob("*.yaml"))
VALUES_SETS = ["default", *CI_FILES]

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """The objects of one `helm template` run, with lookups by kind and name."""

    objects: list[Manifest]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Manifest:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.of_kind(kind))


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def template_args(values: str, *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values != "default":
        args += ["--values", str(CHART / "ci" / values)]
    return [*args, *extra]


def parse(stdout: str) -> Rendered:
    return Rendered([doc for doc in yaml.safe_load_all(stdout) if doc])
