"""`make demo` must keep working: it delivers through every example connector."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_demo_delivers_through_every_example_connector() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("demo OK")
    table = [line for line in lines if line.startswith("mail/")]
    assert len(table) == 10
    assert sum("delivered" in line for line in table) == 9
    assert any(
        line.startswith("mail/tls-domain-match") and "name_mismatch" in line for line in table
    )
    assert any(line.startswith("mail/tls-opportunistic") and " none " in line for line in table)
