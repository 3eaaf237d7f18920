"""The few Kubernetes API calls the reconciler makes itself, over kopf's credentials.

kopf watches the resources and feeds the reconciler's store; writes that are not a
reaction to one object (the routing Secret, the status of every connector after a
recompile, Events from the reconciler) go through this client. It uses the
:class:`kopf.ConnectionInfo` that kopf's login produced, so in-cluster service
accounts, kubeconfig files and test servers all work the same way, and it logs in
again once when the API server answers 401 (a rotated service-account token).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf

from mailflow_compiler.errors import MailflowError

__all__ = ["KubeClient", "KubeError", "Login"]

logger = logging.getLogger(__name__)

Login = Callable[[], Awaitable[kopf.ConnectionInfo]]
"""Returns fresh credentials; called at first use and after a 401."""

REQUEST_TIMEOUT = 30.0


class KubeError(MailflowError, ConnectionError):
    """The API server refused a request or could not be reached."""

    def __init__(self, method: str, path: str, status: int, reason: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}")
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason


def _resource_path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class KubeClient:
    def __init__(self, login: Login) -> None:
        self._login = login
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _connect(self, *, again: bool = False) -> tuple[aiohttp.ClientSession, str]:
        async with self._lock:
            if again or self._session is None or self._info is None:
                info = await self._login()
                if self._session is not None:
                    await self._session.close()
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                    headers=info.as_http_headers(),
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                    trust_env=info.trust_env,
                )
                self._info = info
            return self._session, self._info.server.rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """One API call; ``None`` for 404, the decoded object otherwise."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in (1, 2):
            session, server = await self._connect(again=attempt == 2)
            try:
                async with session.request(
                    method,
                    server + path,
                    data=data,
                    params=params,
                    headers={"Content-Type": content_type} if data is not None else None,
                ) as response:
                    if response.status == 401 and attempt == 1:
                        continue
                    if response.status == 404:
                        return None
                    text = await response.text()
                    if response.status >= 400:
                        raise KubeError(method, path, response.status, _reason(text))
                    result = json.loads(text) if text else {}
                    return result if isinstance(result, dict) else {}
            except (aiohttp.ClientError, TimeoutError) as e:
                raise KubeError(method, path, 0, f"{type(e).__name__}: {e}") from e
        raise KubeError(method, path, 401, "Unauthorized")  # pragma: no cover - loop returns

    # --- the calls the reconciler makes -----------------------------------------------------

    async def get(
        self, api_version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        return await self.request("GET", _resource_path(api_version, plural, namespace, name))

    async def create(
        self, api_version: str, plural: str, namespace: str, body: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        return await self.request("POST", _resource_path(api_version, plural, namespace), body=body)

    async def merge_patch(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        path = _resource_path(api_version, plural, namespace, name)
        if subresource:
            path += "/" + subresource
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def list(
        self, api_version: str, plural: str, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request(
            "GET", _resource_path(api_version, plural, namespace), params=params
        )
        items = (result or {}).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def post_event(
        self,
        involved: Mapping[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        component: str = "mailflow-operator",
    ) -> None:
        """A core/v1 Event about ``involved`` (a body with apiVersion, kind and metadata)."""
        metadata = involved.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            # A name of our own (as kubectl's recorder does): not every server honours generateName.
            "metadata": {
                "name": f"{metadata.get('name')}.{secrets.token_hex(8)}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.create("v1", "events", namespace, event)
        except KubeError as e:
            # An event is a courtesy: losing one must not stop reconciling.
            logger.warning("could not post event %s for %s: %s", reason, metadata.get("name"), e)


def _reason(text: str) -> str:
    try:
        status = json.loads(text)
    except ValueError:
        return text[:200]
    if isinstance(status, dict):
        return str(status.get("message") or status.get("reason") or text[:200])
    return text[:200]
