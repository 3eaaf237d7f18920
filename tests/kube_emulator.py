"""A Kubernetes API for the operator tests: kmock's KubernetesEmulator over real HTTP.

kmock stores objects and serves list/watch/get/create/patch/delete, but it is not an API
server: it validates no schema, raises no resourceVersion conflicts, replays existing
objects to every new watch, filters no label selectors and leaves metadata alone.
:class:`Cluster` adds what the tests rely on an API server for: ``uid``,
``creationTimestamp``, ``resourceVersion`` and a ``generation`` that grows when the spec
changes. The operator runs in a thread of its own (its own event loop, as in a pod),
so that kopf's shutdown only waits for its own tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import kmock

from mailflow_operator.reconcile import Reconciler
from mailflow_operator.runner import OperatorConfig, run_operator

__all__ = ["Cluster", "OperatorThread", "cluster"]

CRD_RESOURCES = {
    "mailflow.dev/v1alpha1/outboundconnectors": ("OutboundConnector", "outboundconnector"),
    "mailflow.dev/v1alpha1/multismtpprofiles": ("MultiSmtpProfile", "multismtpprofile"),
    "mailflow.dev/v1alpha1/dkimkeys": ("DkimKey", "dkimkey"),
}
PLURALS = {
    "OutboundConnector": "mailflow.dev/v1alpha1/outboundconnectors",
    "MultiSmtpProfile": "mailflow.dev/v1alpha1/multismtpprofiles",
    "DkimKey": "mailflow.dev/v1alpha1/dkimkeys",
    "Secret": "v1/secrets",
    "Pod": "v1/pods",
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def _path(resource: str, namespace: str, name: str | None = None) -> str:
    group_version, plural = resource.rsplit("/", 1)
    base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class Cluster:
    def __init__(self, emulator: kmock.KubernetesEmulator, url: str) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession()
        self._versions = itertools.count(1000)
        self._clock = itertools.count(0)

    async def close(self) -> None:
        await self.session.close()

    def stored(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the emulator holds it now (None when absent or deleted)."""
        key = (kmock.resource(PLURALS[kind]), namespace, name)
        if key not in self.emulator.objects:  # NB: only a parsed resource works with "in"
            return None
        obj = self.emulator.objects[key]
        if obj.deleted:
            return None
        return copy.deepcopy(dict(obj.raw))

    def events(self, reason: str, involved: str | None = None) -> list[dict[str, Any]]:
        """The Events posted with ``reason`` (about the object named ``involved``, if given)."""
        return [
            copy.deepcopy(dict(obj.raw))
            for key, obj in list(self.emulator.objects.items())
            if key[0].plural == "events"
            and not obj.deleted
            and obj.raw.get("reason") == reason
            and involved in (None, obj.raw.get("involvedObject", {}).get("name"))
        ]

    def history(self, kind: str, namespace: str, name: str) -> list[dict[str, Any] | None]:
        versions = self.emulator.objects[PLURALS[kind], namespace, name].history
        return [None if v is None else copy.deepcopy(dict(v.raw)) for v in versions]

    async def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update as an API server would: metadata filled, generation on spec change."""
        body = dict(copy.deepcopy(dict(body)))
        kind = body["kind"]
        metadata = body.setdefault("metadata", {})
        namespace, name = metadata["namespace"], metadata["name"]
        current = self.stored(kind, namespace, name)
        metadata["resourceVersion"] = str(next(self._versions))
        if current is None:
            # Distinct, ordered creation times, as a real cluster's would be.
            created = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
                seconds=next(self._clock)
            )
            metadata.setdefault("creationTimestamp", created.strftime("%Y-%m-%dT%H:%M:%SZ"))
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata["generation"] = 1
            return await self._call("POST", _path(PLURALS[kind], namespace), body)
        changed = {k: v for k, v in body.items() if k not in ("metadata", "status")} != {
            k: v for k, v in current.items() if k not in ("metadata", "status")
        }
        old_generation = int(current["metadata"].get("generation", 1))
        metadata["generation"] = old_generation + 1 if changed else old_generation
        patch = dict(body)
        # A full replacement: keys that the new body drops are removed.
        for key in current:
            if key not in body and key not in ("metadata", "status"):
                patch[key] = None
        if "spec" in current and "spec" in body:
            patch["spec"] = _replacing(current["spec"], body["spec"])
        return await self._call("PATCH", _path(PLURALS[kind], namespace, name), patch)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        await self._call("DELETE", _path(PLURALS[kind], namespace, name), None)

    async def _call(self, method: str, path: str, body: Any) -> dict[str, Any]:
        async with self.session.request(
            method,
            self.url + path,
            json=body,
            headers={"Content-Type": "application/merge-patch+json"} if method == "PATCH" else None,
        ) as response:
            data = await response.json()
            assert response.status < 400, f"{method} {path}: {response.status} {data}"
            return dict(data)


def _replacing(old: Any, new: Any) -> Any:
    """A merge patch that turns ``old`` into ``new`` (None for every key that goes away)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {k: _replacing(old.get(k), v) for k, v in new.items()}
    patch.update({k: None for k in old if k not in new})
    return patch


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        with warnings.catch_warnings():
            # kmock 0.8 reads its bundled resource list with importlib.resources.read_binary,
            # deprecated since Python 3.11; nothing we can change, and harmless.
            warnings.filterwarnings("ignore", "read_binary is deprecated", DeprecationWarning)
            emulator.resources.load_bundled()
        for resource, (kind, singular) in CRD_RESOURCES.items():
            emulator.resources[resource] = kmock.ResourceInfo(
                kind=kind,
                singular=singular,
                namespaced=True,
                verbs=VERBS,
                subresources={"status"},
            )
        api = Cluster(emulator, str(server.url))
        try:
            yield api
        finally:
            await api.close()


class OperatorThread:
    """``run_operator`` in its own thread and event loop, as it runs in its pod."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.reconciler: Reconciler | None = None
        self.thread = threading.Thread(target=self._main, name="mailflow-operator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(
                run_operator(
                    self.config,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                    reconciler_ready=self._remember,
                )
            )
        except BaseException as e:  # reported by stop()
            self.error = e

    def _remember(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler

    @property
    def passes(self) -> int:
        """Reconcile passes done so far (read across threads: an int is atomic enough)."""
        return 0 if self.reconciler is None else self.reconciler.passes

    async def __aenter__(self) -> OperatorThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.ready_flag.is_set():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start: {self.error!r}")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop"
        if self.error is not None:
            raise self.error
