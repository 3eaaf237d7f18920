"""Which routing generation every worker process of a pod serves (``--processes N``).

The pod annotation ``mailflow.dev/config-generation`` tells the operator that the pod
routes with generation N (``Programmed``). With several worker processes each reads the
routing Secret on its own schedule, so one worker's load is not the pod's: every worker
writes the generation it serves into a file of a folder its supervisor gives it
(:data:`FOLDER_ENV`), and the worker that annotates the pod annotates the lowest
generation of all the listening workers (:data:`WORKERS_ENV`), once each has written one.
Without those variables (one process) the worker's own generation is the pod's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["FOLDER_ENV", "NAME_ENV", "WORKERS_ENV", "PodGenerations"]

FOLDER_ENV: Final = "MAILFLOW_WORKER_GENERATIONS"
NAME_ENV: Final = "MAILFLOW_WORKER_NAME"
WORKERS_ENV: Final = "MAILFLOW_WORKERS"
"""Comma-separated names of the listening workers whose generations make the pod's."""


@dataclass(frozen=True)
class PodGenerations:
    folder: Path | None = None
    name: str = ""
    workers: Sequence[str] = ()

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> PodGenerations:
        env = os.environ if env is None else env
        folder, name = env.get(FOLDER_ENV), env.get(NAME_ENV, "")
        if not folder or not name:
            return cls()
        workers = tuple(w for w in env.get(WORKERS_ENV, name).split(",") if w)
        return cls(Path(folder), name, workers)

    def serving(self, own: int) -> int | None:
        """Record that this worker serves ``own``; the generation the whole pod serves (None
        while a worker has not said yet)."""
        if self.folder is None:
            return own
        path = self.folder / self.name
        temporary = path.with_name(f".{self.name}.tmp")
        temporary.write_text(f"{own}\n", encoding="ascii")
        temporary.replace(path)
        generations = []
        for worker in self.workers:
            text = ""
            with contextlib.suppress(OSError):
                text = (self.folder / worker).read_text(encoding="ascii").strip()
            if not text.isdigit():
                return None
            generations.append(int(text))
        return min(generations, default=own)
