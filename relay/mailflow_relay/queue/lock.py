"""One relay per spool folder: an advisory lock that the kernel releases with the process.

Two relays on one spool would both rescan it and both deliver every message (and race on
its state files). So a relay takes an exclusive ``flock`` on ``<spool>/.relay.lock`` before
it rescans, holds it for its whole life, and writes its PID into the file so that a second
relay can say whom it collides with. ``flock`` (not a PID file alone) because the lock
dies with the process: a relay killed with SIGKILL leaves a file with a stale PID but no
lock, and the next start takes it at once. ``mailflow queue`` does not take the lock: it
reads the spool and changes single messages the way a relay tolerates (see
:mod:`.admin`), so it keeps working beside a running relay.

A spool on a network file system may not honour ``flock``; DESIGN.md puts the spool on
each pod's own volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Final

from mailflow_relay.queue.spool import SpoolError

__all__ = ["LOCK_FILE", "SpoolInUseError", "SpoolLock"]

LOCK_FILE: Final = ".relay.lock"


class SpoolInUseError(SpoolError, BlockingIOError):
    """Another process (``pid``, 0 when it could not be read) holds the spool's lock."""

    def __init__(self, directory: Path, pid: int) -> None:
        holder = f"the relay with PID {pid}" if pid else "another process"
        super().__init__(f"spool {directory} is in use by {holder}")
        self.directory = directory
        self.pid = pid


logger = logging.getLogger(__name__)


class SpoolLock:
    """The exclusive lock on one spool folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, directory: Path, name: str = LOCK_FILE) -> None:
        self.directory = directory
        self.path = directory / name
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`SpoolInUseError` at once (never waits)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise SpoolInUseError(self.directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # The PID only names the holder for a second relay's error message; the flock is the
        # lock. A full spool disk must not keep the relay from starting (it is the relay
        # that delivers the queue and frees the space), so a refused write is only logged.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            logger.warning("spool lock %s: could not record this relay's PID: %s", self.path, e)

    def release(self) -> None:
        """Let the next relay have the spool; the file stays (removing it would race a
        relay that opened it and is waiting for the lock)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0
