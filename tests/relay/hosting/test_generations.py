"""The generation a pod of several worker processes serves: the lowest of its workers'."""

from __future__ import annotations

from pathlib import Path

from mailflow_relay.hosting.generations import (
    FOLDER_ENV,
    NAME_ENV,
    WORKERS_ENV,
    PodGenerations,
)


def test_one_process_serves_its_own_generation() -> None:
    pod = PodGenerations.from_environment({})
    assert pod.serving(7) == 7


def test_the_pod_serves_the_lowest_generation_once_every_worker_said(tmp_path: Path) -> None:
    def worker(name: str) -> PodGenerations:
        env = {FOLDER_ENV: str(tmp_path), NAME_ENV: name, WORKERS_ENV: "worker-0,worker-1"}
        return PodGenerations.from_environment(env)

    first, second = worker("worker-0"), worker("worker-1")
    assert first.serving(3) is None  # worker-1 has not said yet: no annotation
    assert second.serving(2) == 2
    assert first.serving(3) == 2  # worker-1 still routes with generation 2
    assert second.serving(3) == 3
    assert first.serving(3) == 3
    assert not list(tmp_path.glob(".*.tmp"))
