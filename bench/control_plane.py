"""The control plane at scale: compile time, router lookups, operator latency.

- **compile**: :func:`compile_routing` over 10, 1,000 and 10,000 connectors (the one
  compiler the operator, the CLI and the standalone relay share), plus serialising the
  routing document to JSON (what the operator writes into the Secret). Best of a few
  repetitions, so that a stray pause of the machine does not count.
- **route_for**: :meth:`Router.route_for` lookups per second with 10, 1,000 and 100,000
  connectors. The recipients mix exact matches, wildcard matches two labels down, and
  misses that fall to the catch-all; the same recipient list at every scale. DESIGN.md
  asks that lookups do not slow down as connectors grow: the figures must stay flat.
- **operator**: the real operator (kopf + reconciler, in its own thread and event loop,
  as ``tests/kube_emulator.py`` runs it) against kmock's Kubernetes emulator over HTTP;
  time from a connector's change (the PATCH returned) to the routing Secret holding a
  document with that change. With the default debounce (0.2 s) and probes off (the
  destinations do not exist). kmock is not an API server (no watch bookmarks, no
  conflicts), so this is the operator's own latency, not a cluster's. At 10 and 100
  connectors only: kmock matches every request against every stored object
  (``kmock/_internal/filtering.py``, ``K8sCriteria.__call__`` under ``View.__contains__``),
  so with 1,000 connectors the emulator, not the operator, takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import ControlPlaneResult, format_control_plane

from mailflow_compiler.compiler import compile_routing
from mailflow_compiler.manifests import RawConnector
from mailflow_relay.routing.document import ObjectRef, RoutingDocument
from mailflow_relay.routing.router import Router

__all__ = [
    "compile_times",
    "connector_bodies",
    "lookup_rates",
    "operator_latency",
    "run_all",
]

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"
COMPILE_SCALES = (10, 1_000, 10_000)
LOOKUP_SCALES = (10, 1_000, 100_000)
OPERATOR_SCALES = (10, 100)
LOOKUPS = 100_000
LOOKUP_SECONDS = 10.0
"""Upper bound on the time spent looking up, per scale."""
OPERATOR_CHANGES = 10
OPERATOR_TIMEOUT = 60.0

Progress = Callable[[str], None]


def connector_bodies(count: int) -> list[RawConnector]:
    """``count`` defaulted OutboundConnector bodies: one catch-all, then alternately an
    exact domain and a wildcard, some scoped to a sender domain, all to smart hosts."""
    bodies: list[dict[str, Any]] = []
    for i in range(count):
        if i == 0:
            domains = ["*"]
        elif i % 2:
            domains = [f"d{i}.example"]
        else:
            domains = [f"*.d{i}.example"]
        senders = [f"s{i}.example"] if i % 7 == 3 else []
        bodies.append(
            {
                "apiVersion": "mailflow.dev/v1alpha1",
                "kind": "OutboundConnector",
                "metadata": {
                    "name": f"connector-{i}",
                    "namespace": NAMESPACE,
                    "generation": 1,
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                },
                "spec": {
                    "description": f"benchmark connector {i}",
                    "enabled": True,
                    "recipientDomains": domains,
                    "senderDomains": senders,
                    "destination": {
                        "smartHost": {"host": f"10.0.{i // 250 % 256}.{i % 250 + 1}", "port": 25}
                    },
                    "tls": {"mode": "Opportunistic"},
                },
            }
        )
    return bodies  # type: ignore[return-value]


def _document(count: int) -> RoutingDocument:
    compiled = compile_routing(connector_bodies(count), [], {}, default_namespace=NAMESPACE)
    return compiled.document


def compile_times(progress: Progress, repeats: int = 3) -> list[ControlPlaneResult]:
    results = []
    for count in COMPILE_SCALES:
        bodies = connector_bodies(count)
        best = best_json = float("inf")
        size = 0
        rounds = repeats if count < 10_000 else 2
        for _ in range(rounds):
            started = time.perf_counter()
            compiled = compile_routing(bodies, [], {}, default_namespace=NAMESPACE)
            best = min(best, time.perf_counter() - started)
            started = time.perf_counter()
            text = compiled.document.to_json()
            best_json = min(best_json, time.perf_counter() - started)
            size = len(text)
        assert not compiled.findings, compiled.findings[:3]
        progress(
            f"  compile {count:,} connectors: {best * 1000:.1f} ms (+ {best_json * 1000:.1f} ms JSON)"
        )
        results.append(
            ControlPlaneResult(
                "compile",
                count,
                round(best * 1000, 2),
                "ms",
                f"+ {best_json * 1000:.1f} ms to_json ({size / 1024:.0f} KiB)",
            )
        )
    return results


def lookup_recipients(count: int = 1000, seed: int = 7) -> list[tuple[str, str]]:
    """(recipient, sender) pairs: a third exact hits, a third wildcard hits, a third misses.

    Only domains that exist at the smallest scale (10 connectors), so the same list routes
    the same way at every scale, and the work per lookup cannot shrink as connectors grow.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible mix, not a secret
    pairs = []
    for n in range(count):
        kind = n % 3
        if kind == 0:
            domain = f"d{rng.choice([1, 3, 5, 7, 9])}.example"
        elif kind == 1:
            domain = f"mail.eu.d{rng.choice([2, 4, 6, 8])}.example"
        else:
            domain = f"nowhere{n}.example.org"
        sender = "alice@s3.example" if n % 5 == 0 else "alice@contoso.example"
        pairs.append((f"user{n}@{domain}", sender))
    return pairs


def lookup_rates(progress: Progress) -> list[ControlPlaneResult]:
    pairs = lookup_recipients()
    results = []
    for count in LOOKUP_SCALES:
        started = time.perf_counter()
        router = Router(_document(count))
        built = time.perf_counter() - started
        # A relay loads a document once and then routes for hours: time the steady state,
        # not the one full garbage collection that follows building 100,000 connectors.
        gc.collect()
        done = 0
        started = time.perf_counter()
        deadline = started + LOOKUP_SECONDS
        while done < LOOKUPS and time.perf_counter() < deadline:
            for recipient, sender in pairs:
                router.route_for(recipient, sender)
            done += len(pairs)
        elapsed = time.perf_counter() - started
        rate = done / elapsed
        progress(f"  route_for with {count:,} connectors: {rate:,.0f} lookups/s")
        results.append(
            ControlPlaneResult(
                "route_for",
                count,
                round(rate, 0),
                "lookups/s",
                f"{elapsed / done * 1e6:.2f} µs each; compile + Router() {built:.1f} s",
            )
        )
    return results


async def _operator_latency(
    count: int, changes: int, progress: Progress
) -> tuple[float, list[float]]:
    """(seconds from the operator's start to the first complete Secret, change latencies)."""
    sys.path.insert(0, str(REPO / "tests"))
    from kube_emulator import OperatorThread, cluster
    from mailflow_operator.reconcile import ReconcileSettings
    from mailflow_operator.runner import OperatorConfig
    from mailflow_operator.selectors import LabelSelector

    secret = ObjectRef("mailflow-system", "mailflow-routing")

    async with cluster() as api:

        def published() -> dict[str, Any] | None:
            stored = api.stored("Secret", secret.namespace, secret.name)
            if stored is None:
                return None
            text = base64.b64decode(stored["data"]["routing.json"]).decode()
            document: dict[str, Any] = json.loads(text)
            return document

        bodies = connector_bodies(count)
        for body in bodies:
            metadata = dict(body["metadata"])
            del metadata["generation"], metadata["creationTimestamp"]
            await api.apply({**body, "metadata": metadata})
        config = OperatorConfig(
            reconcile=ReconcileSettings(
                namespaces=(NAMESPACE,),
                routing_secret=secret,
                relay_selector=LabelSelector.parse("app.kubernetes.io/name=mailflow-relay"),
                probe_interval=0,
            ),
            api_server=api.url,
        )
        latencies: list[float] = []
        started = time.perf_counter()
        async with OperatorThread(config):
            await _until(lambda: _connectors_in(published()) == count, OPERATOR_TIMEOUT)
            initial = time.perf_counter() - started
            target = bodies[1]
            for change in range(changes):
                port = 2000 + change
                metadata = {"name": target["metadata"]["name"], "namespace": NAMESPACE}
                spec = dict(target["spec"])
                spec["destination"] = {"smartHost": {"host": "10.9.9.9", "port": port}}
                started = time.perf_counter()
                await api.apply({**target, "metadata": metadata, "spec": spec})
                await _until(
                    lambda port=port: _port_of(published(), target["metadata"]["name"]) == port,  # type: ignore[misc]
                    OPERATOR_TIMEOUT,
                )
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.3)  # a change at a time, past the debounce window
        progress(
            f"  operator with {count:,} connectors: change → Secret "
            f"median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms"
        )
        return initial, latencies


def _connectors_in(document: dict[str, Any] | None) -> int:
    return -1 if document is None else len(document.get("connectors", []))


def _port_of(document: dict[str, Any] | None, name: str) -> int | None:
    if document is None:
        return None
    for connector in document.get("connectors", []):
        if connector.get("ref") == f"{NAMESPACE}/{name}":
            destination = connector.get("destination", {})
            port = destination.get("port")
            return port if isinstance(port, int) else None
    return None


async def _until(check: Callable[[], bool], within: float) -> None:
    """Poll ``check`` every 5 ms (the resolution of the latency figures) for ``within`` s."""
    deadline = time.perf_counter() + within
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not done within {within}s")
        await asyncio.sleep(0.005)


def operator_latency(progress: Progress) -> list[ControlPlaneResult]:
    results = []
    for count in OPERATOR_SCALES:
        try:
            initial, latencies = asyncio.run(_operator_latency(count, OPERATOR_CHANGES, progress))
        except (TimeoutError, RuntimeError, OSError, AssertionError) as e:
            progress(f"  operator with {count:,} connectors: failed: {e}")
            results.append(
                ControlPlaneResult("operator", count, float("nan"), "ms", f"failed: {e}")
            )
            continue
        ordered = sorted(latencies)
        median = ordered[len(ordered) // 2]
        results.append(
            ControlPlaneResult(
                "operator",
                count,
                round(median * 1000, 1),
                "ms",
                f"change → Secret, median of {len(ordered)}, max {ordered[-1] * 1000:.0f} ms "
                f"(debounce 0.2 s included); first Secret {initial:.1f} s after start",
            )
        )
    return results


def run_all(progress: Progress = print) -> list[ControlPlaneResult]:
    return [*compile_times(progress), *lookup_rates(progress), *operator_latency(progress)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/control_plane.py", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures to this file as JSON")
    args = parser.parse_args(argv)
    results = run_all()
    print(format_control_plane(results))
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
