"""Loading the CRDs of ``crds/``: the one source of truth for the API schema.

A wheel carries them as ``mailflow_operator/_crds`` (see ``pyproject.toml``); a source
checkout or an editable install reads ``crds/`` at the top of the repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from mailflow_compiler.errors import CrdError
from mailflow_compiler.schema import StructuralSchema

__all__ = ["CrdKind", "crd_directory", "load_crds"]


@dataclass(frozen=True)
class CrdKind:
    group: str
    version: str
    kind: str
    plural: str
    schema: StructuralSchema
    file: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def crd_directory() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_crds", here.parent.parent / "crds"):
        if candidate.is_dir():
            return candidate
    raise CrdError(str(here), "no CRD folder found (neither _crds in the package nor crds/)")


@cache
def load_crds(directory: Path | None = None) -> Mapping[tuple[str, str], CrdKind]:
    """Every served version of every CRD in the folder, keyed by (apiVersion, kind)."""
    folder = directory or crd_directory()
    kinds: dict[tuple[str, str], CrdKind] = {}
    for file in sorted(folder.glob("*.yaml")):
        for crd in yaml.safe_load_all(file.read_text(encoding="utf-8")):
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            for kind in _kinds_of(crd, str(file)):
                kinds[(kind.api_version, kind.kind)] = kind
    if not kinds:
        raise CrdError(str(folder), "no CustomResourceDefinition found")
    return kinds


def _kinds_of(crd: Mapping[str, Any], file: str) -> list[CrdKind]:
    try:
        spec = crd["spec"]
        result = []
        for version in spec["versions"]:
            if not version.get("served", False):
                continue
            schema = StructuralSchema(version["schema"]["openAPIV3Schema"], file)
            result.append(
                CrdKind(
                    group=spec["group"],
                    version=version["name"],
                    kind=spec["names"]["kind"],
                    plural=spec["names"]["plural"],
                    schema=schema,
                    file=file,
                )
            )
    except (KeyError, TypeError) as e:
        raise CrdError(file, f"not a complete CustomResourceDefinition: missing {e}") from e
    return result
