"""Kubernetes label selectors (``app=relay,tier in (mail, edge),!canary``), parsed once.

The operator lists relay pods with the selector (the API server filters), and matches
watched pods with the same parsed selector (kopf's watch is not filtered by it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mailflow_compiler.errors import UsageError

__all__ = ["LabelSelector"]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(([^)]*)\)$")
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str
    """``in``, ``notin``, ``exists`` or ``!exists``."""
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values


@dataclass(frozen=True)
class LabelSelector:
    text: str
    requirements: tuple[_Requirement, ...]

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        requirements = []
        for part in _split(text):
            if match := _SET.match(part):
                values = frozenset(v.strip() for v in match.group(4).split(",") if v.strip())
                requirements.append(_Requirement(match.group(1), match.group(3), values))
            elif match := _EQUALITY.match(part):
                operator = "notin" if match.group(3) == "!=" else "in"
                requirements.append(
                    _Requirement(match.group(1), operator, frozenset({match.group(4)}))
                )
            elif match := _EXISTS.match(part):
                operator = "!exists" if match.group(1) else "exists"
                requirements.append(_Requirement(match.group(2), operator))
            else:
                raise UsageError(f"label selector {text!r}: cannot parse {part!r}")
        if not requirements:
            raise UsageError("label selector is empty: it would select every pod")
        return cls(text, tuple(requirements))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return self.text


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts
