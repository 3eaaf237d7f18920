"""A problem found in user input, with everything needed to point at it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Problem"]


@dataclass(frozen=True, order=True)
class Problem:
    """One precise finding: which file and document, which object, which field, and what."""

    file: str
    document: int
    kind: str
    namespace: str
    name: str
    path: str
    """Field path in kubectl's notation: ``spec.tls.certificateName``, ``spec.servers[1].port``."""
    message: str
    line: int = 0

    def format(self) -> str:
        location = f"{self.file}:{self.document}"
        if self.kind:
            ident = (
                f"{self.kind}/{self.namespace}/{self.name}"
                if self.namespace
                else f"{self.kind}/{self.name}"
            )
        else:
            ident = "-"
        path = self.path or "-"
        return f"{location}: {ident}: {path}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)
