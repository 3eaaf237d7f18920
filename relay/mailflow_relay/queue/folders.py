"""The spool folders of one relay pod: the pod's spool, and one folder per worker process.

With ``mailflow relay --processes N`` (N > 1) every worker process owns
``<spool>/worker-<i>`` (its own lock, its own files), because two processes on one spool
folder would both deliver every message. A pod that ran one process before keeps mail in
``<spool>`` itself, and one that ran more workers than it now does keeps mail in
``worker-<i>`` folders no worker owns: those are *orphans*, delivered by a worker that
accepts no new mail (:mod:`mailflow_relay.hosting.workers`). ``mailflow queue`` sees them
all, so an administrator never has to know which process took a message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from mailflow_relay.queue.spool import (
    MessageNotFoundError,
    RecipientState,
    Spool,
    SpooledMessage,
)

__all__ = ["WORKER_PREFIX", "SpoolSet", "spool_folders", "worker_folder"]

WORKER_PREFIX: Final = "worker-"
_WORKER_NAME = re.compile(r"worker-(0|[1-9][0-9]{0,3})")


def worker_folder(root: Path, index: int) -> Path:
    """Where worker ``index`` of a multi-process relay keeps its spool."""
    return root / f"{WORKER_PREFIX}{index}"


def worker_index(folder: Path) -> int | None:
    """The worker number of a ``worker-<i>`` folder, None for any other name."""
    match = _WORKER_NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def spool_folders(root: Path) -> list[Path]:
    """``root`` and its ``worker-<i>`` folders, in worker order (the root first)."""
    workers = [p for p in root.iterdir() if worker_index(p) is not None and p.is_dir()]
    return [root, *sorted(workers, key=lambda p: worker_index(p) or 0)]


class SpoolSet:
    """Every spool folder of a pod read as one queue (for ``mailflow queue``).

    Queue ids are unique across folders (time and 64 random bits), so an id names one
    message wherever it is; the folder is found by looking, never guessed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spools = [Spool(folder) for folder in spool_folders(root)]

    def scan(self, *, repair: bool = False) -> list[SpooledMessage]:
        messages = [m for spool in self.spools for m in spool.scan(repair=repair)]
        return sorted(messages, key=lambda m: m.queue_id)

    def holder(self, queue_id: str) -> Spool:
        """The spool holding ``queue_id``; :class:`MessageNotFoundError` when none does."""
        for spool in self.spools:
            if spool.contains(queue_id):
                return spool
        raise MessageNotFoundError(queue_id)

    def load(self, queue_id: str) -> SpooledMessage:
        return self.holder(queue_id).load(queue_id)

    def make_due(self, queue_id: str) -> int:
        return self.holder(queue_id).make_due(queue_id)

    def amend(
        self, queue_id: str, change: Callable[[RecipientState], RecipientState]
    ) -> tuple[RecipientState, ...]:
        return self.holder(queue_id).amend(queue_id, change)

    def remove(self, queue_id: str, *, force: bool = False) -> None:
        self.holder(queue_id).remove(queue_id, force=force)

    def touch_all(self, name: str) -> None:
        """Leave the file ``name`` in every folder (a request each worker's relay reads)."""
        for spool in self.spools:
            (spool.directory / name).touch()

    @property
    def directories(self) -> Sequence[Path]:
        return [spool.directory for spool in self.spools]
