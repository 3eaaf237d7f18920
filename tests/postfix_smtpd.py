"""Postfix's own ``smtpd`` as a next hop: a private instance on loopback (bench's layout).

The instance is the benchmark's (:mod:`postfix_instance`: own config, queue and data
folders, smtpd on one 127.0.0.1 port, relaying everything to a sink) with main.cf
settings on top, so a test can switch what smtpd offers and refuses: PIPELINING off
(``smtpd_discard_ehlo_keywords``), wrapper mode (``smtpd_tls_wrappermode``, TLS on
connect as on port 465), access maps that refuse chosen senders and recipients. It needs
root (Postfix runs its daemons as ``postfix``); without Postfix or root the test skips,
saying why (fails with CI=true, see :func:`peers.require`).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from peers import LOCALHOST, free_port, missing, require

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from postfix_instance import PostfixInstance, main_cf, master_cf  # noqa: E402

START_TIMEOUT = 15.0


class PostfixSmtpd(PostfixInstance):
    """A private Postfix whose smtpd listens on 127.0.0.1:``port`` with ``settings`` added."""

    def __init__(self, *, relay_port: int, settings: Mapping[str, str]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-postfix-")
        super().__init__(Path(self._tmp.name), port=free_port(), relay_port=relay_port)
        self.settings = dict(settings)

    def table(self, name: str, rows: Mapping[str, str]) -> str:
        """A ``texthash:`` lookup table (no postmap needed) with ``rows``; its map name."""
        path = self.folder / f"{name}.txt"
        path.write_text("".join(f"{key} {value}\n" for key, value in rows.items()))
        return f"texthash:{path}"

    def start(self) -> None:
        require("smtp-sink")  # the package that brings smtpd
        if os.geteuid() != 0:
            missing("postfix (as root)", "postfix")
        self.config_directory.mkdir(parents=True, exist_ok=True)
        for name in ("queue", "data"):
            (self.folder / name).mkdir(exist_ok=True)
        self.folder.chmod(0o755)
        (self.folder / "data").chmod(0o700)
        os.chown(self.folder / "data", _postfix_uid(), -1)
        base = main_cf(self.folder, relay_port=self.relay_port, connection_reuse=True, tls=False)
        # Postfix takes the last of two settings of one name: these win over the base.
        extra = "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        (self.config_directory / "main.cf").write_text(base + extra)
        (self.config_directory / "master.cf").write_text(master_cf(self.port))
        self._postfix("check")
        self._postfix("start")
        self._started = True
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection((LOCALHOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"Postfix smtpd did not listen on {self.port}:\n{self.log_tail()}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, traceback)
        finally:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self


def _postfix_uid() -> int:
    import pwd

    try:
        return pwd.getpwnam("postfix").pw_uid
    except KeyError:
        missing("the postfix user", "postfix")
