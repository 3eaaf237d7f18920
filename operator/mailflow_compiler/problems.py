"""A problem found in user input, with everything needed to point at it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Problem"]


@dataclass(frozen=True, order=True)
class Problem:
    """One precise finding: which file, line and column, which object, which field, and what."""

    file: str
    document: int
    """1-based position of the document in its file."""
    kind: str
    namespace: str
    name: str
    path: str
    """Field path in kubectl's notation: ``spec.tls.certificateName``, ``spec.servers[1].port``."""
    message: str
    line: int = 0
    """1-based line of the field (of its nearest written parent when the field is missing)."""
    column: int = 0

    def format(self) -> str:
        """``FILE:LINE:COL: Kind/namespace/name: path: message``, as editors and CI read it."""
        location = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        if not self.kind:
            return f"{location}: {self.message}"
        ident = (
            f"{self.kind}/{self.namespace}/{self.name}"
            if self.namespace
            else f"{self.kind}/{self.name}"
        )
        if not self.path:
            return f"{location}: {ident}: {self.message}"
        return f"{location}: {ident}: {self.path}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)
