"""The relay in a cluster: its routing document comes from the relay config Secret.

The operator writes the document into one Secret (key ``routing.json``). Each relay pod
reads that Secret — its service account may ``get`` exactly that one Secret, by
resource name — and loads every new version without a restart. A version that fails to
load (not JSON, wrong checksum) is refused with a log line and a metric, and the
previous document stays in force. After each load the pod's annotation
``mailflow.dev/config-generation`` says which generation it serves, which is what the
operator reads to report ``Programmed``.

Reading is a GET every few seconds rather than a watch: one small object, a bounded
delay, nothing to resynchronise after a dropped watch, and RBAC that names the Secret.
The Kubernetes client is the official synchronous one, called in threads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from mailflow_relay.engine.relay import Relay
from mailflow_relay.errors import RoutingDocumentError
from mailflow_relay.hosting.generations import PodGenerations
from mailflow_relay.routing.contract import (
    POD_BACKOFF_ANNOTATION,
    POD_GENERATION_ANNOTATION,
    POD_TRANSPORT_ANNOTATION,
    ROUTING_KEY,
)
from mailflow_relay.routing.document import RoutingDocument

__all__ = ["GENERATION_ANNOTATION", "ROUTING_KEY", "RoutingSecretSource", "kube_api"]

logger = logging.getLogger(__name__)

GENERATION_ANNOTATION = POD_GENERATION_ANNOTATION


def kube_api() -> kubernetes.client.CoreV1Api:
    """The in-cluster service account, or the kubeconfig outside a cluster."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.CoreV1Api()


class RoutingSecretSource:
    def __init__(
        self,
        namespace: str,
        name: str,
        *,
        api: kubernetes.client.CoreV1Api | None = None,
        pod_namespace: str | None = None,
        pod_name: str | None = None,
        poll_interval: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._api = api
        self.pod_namespace = pod_namespace or os.environ.get("POD_NAMESPACE") or namespace
        self.pod_name = pod_name or os.environ.get("POD_NAME")
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self._version: str | None = None
        """The document text last seen: a change of content, not of resourceVersion, is what
        matters (an update that rewrites the same bytes is no reload)."""
        self._annotated: int | None = None
        self._backoff_annotated = "{}"
        """A new pod has no backoff: nothing is written until there is one."""
        self._transport_annotated = "{}"
        """Nor any DANE / MTA-STS outcome."""
        self._pod = PodGenerations.from_environment()
        """With worker processes: the pod serves the lowest generation of them all."""

    @property
    def api(self) -> kubernetes.client.CoreV1Api:
        if self._api is None:
            self._api = kube_api()
        return self._api

    def _read(self) -> tuple[str, str] | None:
        """(resourceVersion, document text), or None when the Secret or its key is missing."""
        try:
            secret: Any = self.api.read_namespaced_secret(
                self.name, self.namespace, _request_timeout=self.request_timeout
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        data = secret.data or {}
        if ROUTING_KEY not in data:
            return None
        try:
            text = base64.b64decode(data[ROUTING_KEY], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise RoutingDocumentError(ROUTING_KEY, f"not base64-encoded UTF-8: {e}") from e
        return str(secret.metadata.resource_version or ""), text

    def _annotate(self, generation: int) -> None:
        if self.pod_name is None:
            return
        self.api.patch_namespaced_pod(
            self.pod_name,
            self.pod_namespace,
            {"metadata": {"annotations": {GENERATION_ANNOTATION: str(generation)}}},
            _request_timeout=self.request_timeout,
        )
        self._annotated = generation
        logger.info(
            "pod %s/%s annotated: serves generation %d",
            self.pod_namespace,
            self.pod_name,
            generation,
        )

    def _annotate_transport(self, outcomes: dict[str, dict[str, str]]) -> None:
        """Tell the operator the last DANE / MTA-STS outcome per connector (transport_status.py)."""
        text = json.dumps(outcomes, sort_keys=True, separators=(",", ":"))
        if self.pod_name is None or text == self._transport_annotated:
            return
        self.api.patch_namespaced_pod(
            self.pod_name,
            self.pod_namespace,
            {"metadata": {"annotations": {POD_TRANSPORT_ANNOTATION: text}}},
            _request_timeout=self.request_timeout,
        )
        self._transport_annotated = text
        logger.info(
            "pod %s/%s annotated: transport security %s", self.pod_namespace, self.pod_name, text
        )

    def _annotate_backoff(self, factors: dict[str, float]) -> None:
        """Tell the operator which connectors this relay slowed down (engine/throttles.py)."""
        text = json.dumps(factors, sort_keys=True, separators=(",", ":"))
        if self.pod_name is None or text == self._backoff_annotated:
            return
        self.api.patch_namespaced_pod(
            self.pod_name,
            self.pod_namespace,
            {"metadata": {"annotations": {POD_BACKOFF_ANNOTATION: text}}},
            _request_timeout=self.request_timeout,
        )
        self._backoff_annotated = text
        logger.info("pod %s/%s annotated: backoff %s", self.pod_namespace, self.pod_name, text)

    async def first(self) -> RoutingDocument:
        where = f"Secret {self.namespace}/{self.name} key {ROUTING_KEY}"
        while True:
            try:
                found = await asyncio.to_thread(self._read)
                if found is not None:
                    _, text = found
                    document = RoutingDocument.from_json(text)
                    self._version = text
                    logger.info(
                        "routing document generation %d read from %s", document.generation, where
                    )
                    return document
                logger.warning("waiting for the routing document: no %s yet", where)
            except RoutingDocumentError as e:
                logger.error(
                    "the routing document in %s cannot be loaded: %s; waiting for a good one",
                    where,
                    e,
                )
            except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:
                logger.warning("cannot read %s: %s; retrying", where, _short(e))
            await asyncio.sleep(self.poll_interval)

    async def follow(self, relay: Relay) -> None:
        where = f"Secret {self.namespace}/{self.name}"
        while True:
            try:
                serving = self._pod.serving(relay.document.generation)
                if serving is not None and self._annotated != serving:
                    await asyncio.to_thread(self._annotate, serving)
                # With worker processes only the annotating one writes it: its own backoff.
                await asyncio.to_thread(self._annotate_backoff, relay.gate.reported_backoff())
                await asyncio.to_thread(self._annotate_transport, relay.transport_status.reported())
                found = await asyncio.to_thread(self._read)
                if found is None:
                    logger.warning(
                        "%s or its key %s is gone; the current document stays", where, ROUTING_KEY
                    )
                elif found[1] != self._version:
                    _, text = found
                    self._version = text
                    loaded = relay.load_document_json(text)
                    serving = self._pod.serving(relay.document.generation)
                    if loaded and serving is not None and self._annotated != serving:
                        await asyncio.to_thread(self._annotate, serving)
            except RoutingDocumentError as e:
                relay.refuse_document(str(e))
            except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:
                logger.warning(
                    "cannot read or annotate through the Kubernetes API: %s; retrying", _short(e)
                )
            await asyncio.sleep(self.poll_interval)


def _short(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return str(error)
