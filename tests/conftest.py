"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)
