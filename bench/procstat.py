"""CPU seconds and peak memory of a process tree, read from /proc (no psutil needed).

A relay may be one process (``mailflow relay``) or a family (Postfix's ``master`` and the
daemons it spawns and reaps). So the sampler walks the tree under one root pid:

- **CPU seconds** = user + system time of every live process in the tree, plus the
  ``cutime``/``cstime`` of each (the CPU of children it already reaped: Postfix's
  ``smtpd`` and ``cleanup`` processes come and go). The figure reported is the growth
  between :meth:`TreeSampler.start` and :meth:`TreeSampler.stop`; a child that was reaped
  by a process outside the tree would be missed, which cannot happen here (the root is
  the only parent).
- **Peak RSS** = the largest sum of ``VmRSS`` over the tree seen by a sampling thread
  (every ``interval`` seconds), and for a single process its kernel-kept ``VmHWM`` too
  (the high-water mark, which no sampling can miss). Summed RSS counts shared pages
  (libraries, Postfix's shared code) once per process, which overstates a family of
  processes; so the sampler also keeps the peak sum of **PSS** (proportional set size,
  ``/proc/<pid>/smaps_rollup``: each shared page divided among its sharers), the fair
  figure to compare one process with a family.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessUsage",
    "TreeSampler",
    "tree_cpu_seconds",
    "tree_pids",
    "tree_pss_bytes",
    "tree_rss_bytes",
]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessUsage:
    cpu_seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    processes: int
    """The most processes seen in the tree at once."""


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return text.rpartition(")")[2].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or len(fields) < 2:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root] if Path(f"/proc/{root}").exists() else []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of the processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 15:
            continue
        # After the ")": state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / _TICKS


def tree_rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def tree_pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def _hwm_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """Samples a process tree from :meth:`start` to :meth:`stop` in a daemon thread."""

    def __init__(self, root: int, *, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-procstat", daemon=True)
        self._lock = threading.Lock()
        self._cpu_start = 0.0
        self._cpu_last = 0.0
        self._peak_rss = 0
        self._peak_pss = 0
        self._processes = 0

    def _sample(self) -> None:
        pids = tree_pids(self.root)
        if not pids:
            return
        cpu = tree_cpu_seconds(pids)
        rss = tree_rss_bytes(pids)
        pss = tree_pss_bytes(pids)
        with self._lock:
            # The root's cutime only grows, and live children only add: never below the last.
            self._cpu_last = max(self._cpu_last, cpu)
            self._peak_rss = max(self._peak_rss, rss)
            self._peak_pss = max(self._peak_pss, pss)
            self._processes = max(self._processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        pids = tree_pids(self.root)
        self._cpu_start = self._cpu_last = tree_cpu_seconds(pids)
        self._sample()
        self._thread.start()

    def stop(self) -> ProcessUsage:
        """Stop sampling (take a last sample first); the tree must still be running."""
        self._sample()
        self._stop.set()
        self._thread.join(timeout=5)
        peak = self._peak_rss
        if self._processes == 1:
            peak = max(peak, _hwm_bytes(self.root))
        return ProcessUsage(
            cpu_seconds=round(self._cpu_last - self._cpu_start, 3),
            peak_rss_bytes=peak,
            peak_pss_bytes=self._peak_pss,
            processes=self._processes,
        )
