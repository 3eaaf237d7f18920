"""The RFC 8460 report schema (tests/fixtures/tlsrpt), as a validator the tests share."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

SCHEMA = json.loads(
    (Path(__file__).parent / "fixtures" / "tlsrpt" / "rfc8460-report.schema.json").read_text()
)


def validate_report(report: object) -> None:
    """Raise jsonschema.ValidationError unless ``report`` is an RFC 8460 aggregate report."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
