"""Validating objects against a CRD's structural schema, offline, as the API server would.

The CRDs in ``crds/`` are the one source of truth. This module reads their
``openAPIV3Schema`` and applies it the way kube-apiserver does for a custom resource:

1. defaults are filled in (recursively, also inside a default that was just applied);
2. the OpenAPI keywords a structural schema may use are checked (type, required,
   properties, items, enum, pattern, length/size/range limits, list types);
3. fields that the schema does not declare are reported (``kubectl apply`` rejects them
   with server-side field validation);
4. the CEL rules of ``x-kubernetes-validations`` run against each value that is present
   (``self`` bound to it), reported at their ``fieldPath`` with their ``message``.

Messages follow the API server's ``field.Error`` wording, so what ``mailflow validate``
prints is what ``kubectl apply`` would print. Only the subset of OpenAPI that our CRDs
use is implemented; an unknown keyword in a CRD is an error, not silently ignored.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import cel

from mailflow_compiler.errors import CrdError

__all__ = ["FieldError", "StructuralSchema"]

_KNOWN_KEYWORDS = frozenset(
    {
        "type",
        "description",
        "properties",
        "required",
        "items",
        "enum",
        "pattern",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "default",
        "format",
        "nullable",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-validations",
        "x-kubernetes-preserve-unknown-fields",
    }
)
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CEL_SKIPPED = (
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)
_CEL_REASONS = {
    "FieldValueRequired": "Required value",
    "FieldValueForbidden": "Forbidden",
    "FieldValueDuplicate": "Duplicate value",
}


@dataclass(frozen=True, order=True)
class FieldError:
    path: str
    message: str
    blocking: bool = field(default=False, compare=False)
    """A type error or unsupported value: CEL rules cannot meaningfully run after it."""


def _show(value: object) -> str:
    """A value as the API server quotes it in an error."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _escaped(pattern: str) -> str:
    """A pattern as written in the CRD: non-ASCII characters as \\uXXXX escapes."""
    return "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in pattern)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@cache
def _compiled_rule(rule: str) -> cel.Program:
    return cel.compile(rule)


@cache
def _compiled_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class StructuralSchema:
    """One CRD version's ``openAPIV3Schema``."""

    def __init__(self, raw: Mapping[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source
        self._check(raw, "openAPIV3Schema")

    def _check(self, node: Mapping[str, Any], where: str) -> None:
        """Refuse a CRD that uses what this validator does not implement, or bad CEL/regex."""
        unknown = set(node) - _KNOWN_KEYWORDS
        if unknown:
            raise CrdError(self.source, f"{where}: unsupported schema keywords {sorted(unknown)}")
        if "pattern" in node:
            try:
                _compiled_pattern(node["pattern"])
            except re.error as e:
                raise CrdError(self.source, f"{where}.pattern: {e}") from e
        for i, rule in enumerate(node.get("x-kubernetes-validations", [])):
            try:
                _compiled_rule(rule["rule"])
            except (ValueError, KeyError, TypeError) as e:
                raise CrdError(self.source, f"{where}.x-kubernetes-validations[{i}]: {e}") from e
        for name, child in node.get("properties", {}).items():
            if name != "metadata":
                self._check(child, f"{where}.properties.{name}")
        if "items" in node:
            self._check(node["items"], f"{where}.items")

    # --- defaulting --------------------------------------------------------------------

    def apply_defaults(self, value: Any) -> Any:
        """A copy of ``value`` with the schema's defaults filled in."""
        return self._default(self.raw, copy.deepcopy(value))

    def _default(self, node: Mapping[str, Any], value: Any) -> Any:
        if isinstance(value, dict):
            for name, child in node.get("properties", {}).items():
                if (name not in value or value[name] is None) and "default" in child:
                    value[name] = copy.deepcopy(child["default"])
                if name in value:
                    value[name] = self._default(child, value[name])
        elif isinstance(value, list) and "items" in node:
            return [self._default(node["items"], item) for item in value]
        return value

    # --- validation ---------------------------------------------------------------------

    def validate(self, value: Any) -> list[FieldError]:
        """Every schema and CEL violation in an already defaulted object."""
        errors = list(self._validate(self.raw, value, ""))
        # As kube-apiserver does: CEL rules run on the whole object unless a type error or
        # an unsupported enum value makes their input meaningless; then none runs, and
        # the user is told that more may follow once the existing errors are fixed.
        if any(e.blocking for e in errors):
            errors.append(FieldError("", _CEL_SKIPPED))
        else:
            errors += self._cel_walk(self.raw, value, "")
        return errors

    def _cel_walk(self, node: Mapping[str, Any], value: Any, path: str) -> Iterator[FieldError]:
        if path == "metadata" or value is None:
            return
        yield from self._cel(node, value, path)
        if isinstance(value, dict):
            for name, child in node.get("properties", {}).items():
                if name in value:
                    yield from self._cel_walk(child, value[name], _join(path, name))
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                yield from self._cel_walk(node["items"], item, f"{path}[{i}]")

    def _validate(self, node: Mapping[str, Any], value: Any, path: str) -> Iterator[FieldError]:
        expected = node.get("type")
        if value is None and not node.get("nullable", False):
            yield FieldError(path, f'Invalid value: "null": must be of type {expected}', True)
            return
        if expected is not None and not _has_type(value, expected):
            yield FieldError(
                path, f'Invalid value: "{_type_name(value)}": must be of type {expected}', True
            )
            return
        found: list[FieldError] = list(self._keywords(node, value, path))
        if path == "metadata":
            # The API server validates metadata itself; the CRD only says "object".
            found += _validate_metadata(value)
        elif isinstance(value, dict):
            found += self._object(node, value, path)
        elif isinstance(value, list):
            found += self._array(node, value, path)
        yield from found

    def _keywords(self, node: Mapping[str, Any], value: Any, path: str) -> Iterator[FieldError]:
        if "enum" in node and value not in node["enum"]:
            supported = ", ".join(_show(v) for v in node["enum"])
            yield FieldError(
                path, f"Unsupported value: {_show(value)}: supported values: {supported}", True
            )
        if isinstance(value, str):
            if "maxLength" in node and len(value) > node["maxLength"]:
                yield FieldError(path, f"Too long: may not be longer than {node['maxLength']}")
            if "minLength" in node and len(value) < node["minLength"]:
                yield FieldError(
                    path,
                    f"Invalid value: {_show(value)}: should be at least {node['minLength']} chars long",
                )
            if "pattern" in node and not _compiled_pattern(node["pattern"]).search(value):
                yield FieldError(
                    path,
                    f"Invalid value: {_show(value)}: should match '{_escaped(node['pattern'])}'",
                )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if "minimum" in node and value < node["minimum"]:
                yield FieldError(
                    path,
                    f"Invalid value: {_show(value)}: should be greater than or equal to {node['minimum']}",
                )
            if "maximum" in node and value > node["maximum"]:
                yield FieldError(
                    path,
                    f"Invalid value: {_show(value)}: should be less than or equal to {node['maximum']}",
                )
        if isinstance(value, list):
            if "minItems" in node and len(value) < node["minItems"]:
                yield FieldError(
                    path,
                    f"Invalid value: {len(value)}: should have at least {node['minItems']} items",
                )
            if "maxItems" in node and len(value) > node["maxItems"]:
                yield FieldError(
                    path, f"Too many: {len(value)}: must have at most {node['maxItems']} items"
                )

    def _object(
        self, node: Mapping[str, Any], value: dict[str, Any], path: str
    ) -> Iterator[FieldError]:
        properties: Mapping[str, Any] = node.get("properties", {})
        for name in node.get("required", []):
            if name not in value:
                yield FieldError(_join(path, name), "Required value")
        for name, child_value in value.items():
            child = properties.get(name)
            if child is None:
                if not node.get("x-kubernetes-preserve-unknown-fields", False):
                    yield FieldError(_join(path, name), "Unknown field: not declared in the schema")
                continue
            yield from self._validate(child, child_value, _join(path, name))

    def _array(self, node: Mapping[str, Any], value: list[Any], path: str) -> Iterator[FieldError]:
        items = node.get("items")
        if items is not None:
            for i, item in enumerate(value):
                yield from self._validate(items, item, f"{path}[{i}]")
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set":
            seen: set[str] = set()
            for i, item in enumerate(value):
                key = _show(item)
                if key in seen:
                    yield FieldError(f"{path}[{i}]", f"Duplicate value: {key}")
                seen.add(key)
        elif list_type == "map":
            keys = node.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = _show({k: item.get(k) for k in keys})
                if key in seen:
                    yield FieldError(f"{path}[{i}]", f"Duplicate value: {key}")
                seen.add(key)

    def _cel(self, node: Mapping[str, Any], value: Any, path: str) -> Iterator[FieldError]:
        for spec in node.get("x-kubernetes-validations", []):
            rule = spec["rule"]
            target = path + spec.get("fieldPath", "") if spec.get("fieldPath") else path
            try:
                result = _compiled_rule(rule).execute(cel.Context(variables={"self": value}))
            except Exception as e:  # any evaluation failure is a finding about the input
                yield FieldError(
                    target,
                    f"Invalid value: {_show(_type_name(value))}: rule {rule!r} failed to evaluate: {e}",
                )
                continue
            if result is True:
                continue
            message = spec.get("message") or f"failed rule: {rule}"
            prefix = _CEL_REASONS.get(spec.get("reason", ""))
            if prefix is None:
                yield FieldError(target, f"Invalid value: {_show(_type_name(value))}: {message}")
            else:
                yield FieldError(target, f"{prefix}: {message}")


def _has_type(value: object, expected: str) -> bool:
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return _type_name(value) == expected


def _validate_metadata(metadata: Mapping[str, Any]) -> Iterator[FieldError]:
    name = metadata.get("name")
    if not name:
        yield FieldError("metadata.name", "Required value: name is required")
    elif not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        yield FieldError(
            "metadata.name",
            f"Invalid value: {_show(name)}: a lowercase RFC 1123 subdomain must consist of lower "
            "case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character",
        )
    namespace = metadata.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)
    ):
        yield FieldError(
            "metadata.namespace",
            f"Invalid value: {_show(namespace)}: a lowercase RFC 1123 label must consist of lower "
            "case alphanumeric characters or '-', and must start and end with an alphanumeric "
            "character",
        )
