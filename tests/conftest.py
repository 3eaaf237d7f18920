"""Fixtures shared by every suite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pki import Pki
from support import checked_run


@pytest.fixture(autouse=True)
def no_leaked_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``asyncio.run`` in a test fails if its main coroutine leaves tasks running."""
    monkeypatch.setattr(asyncio, "run", checked_run)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)
