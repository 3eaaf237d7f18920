"""The figures of a benchmark run: values, percentiles, ratios, tables and JSON.

Pure functions only (no processes, no clock), so that the harness's arithmetic and its
output have fast tests of their own (tests/bench).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ControlPlaneResult",
    "RunResult",
    "Table",
    "format_control_plane",
    "format_table",
    "percentile",
    "ratio",
    "to_json",
]

MIB = 1024 * 1024


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1] of ``samples``; None when empty."""
    if not samples:
        return None
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


@dataclass(frozen=True)
class RunResult:
    """One load through one relay (or none: the floor), timed until the sink counted all."""

    relay: str
    """``floor`` (smtp-source straight to the sink), ``postfix`` or ``mailflow``."""
    messages: int
    """Messages the sink counted in the timed part (smtp-source's and the probe's)."""
    expected: int
    seconds: float
    """From smtp-source's start until the sink counted the last message."""
    inject_seconds: float
    """From smtp-source's start until it exited (every message answered 250)."""
    latency_ms: tuple[float, ...] = field(default=(), repr=False)
    """The probe's acceptance latencies (MAIL FROM → 250 after the final dot)."""
    cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    """The relay's peak resident memory, summed over its processes (see procstat)."""
    peak_pss_bytes: int | None = None
    """The same with shared pages divided among the processes sharing them."""
    processes: int | None = None
    tls_messages: int | None = None
    """Messages that reached the sink over STARTTLS (the TLS table only; the floor's
    and the probe's come in plaintext, straight from smtp-source or the harness)."""
    sessions: int | None = None
    """SMTP sessions the sink saw (the TLS table only): how much connections were reused."""
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.messages >= self.expected

    @property
    def msgs_per_second(self) -> float | None:
        if self.seconds <= 0 or not self.messages:
            return None
        return round(self.messages / self.seconds, 1)

    @property
    def p50_ms(self) -> float | None:
        value = percentile(self.latency_ms, 0.50)
        return None if value is None else round(value, 2)

    @property
    def p99_ms(self) -> float | None:
        value = percentile(self.latency_ms, 0.99)
        return None if value is None else round(value, 2)

    @property
    def peak_rss_mib(self) -> float | None:
        return None if self.peak_rss_bytes is None else round(self.peak_rss_bytes / MIB, 1)

    @property
    def peak_pss_mib(self) -> float | None:
        return None if self.peak_pss_bytes is None else round(self.peak_pss_bytes / MIB, 1)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["latency_ms"]
        data.update(
            complete=self.complete,
            msgs_per_second=self.msgs_per_second,
            latency_samples=len(self.latency_ms),
            latency_p50_ms=self.p50_ms,
            latency_p99_ms=self.p99_ms,
            peak_rss_mib=self.peak_rss_mib,
            peak_pss_mib=self.peak_pss_mib,
        )
        return data


@dataclass(frozen=True)
class Table:
    """The three runs of one configuration (same message set, same outbound hop)."""

    title: str
    parameters: Mapping[str, Any]
    runs: tuple[RunResult, ...]

    def run(self, relay: str) -> RunResult | None:
        return next((r for r in self.runs if r.relay == relay), None)

    def ratios(self) -> dict[str, float | None]:
        """Mailflow's throughput over Postfix's and over the floor's."""
        mailflow, postfix, floor = self.run("mailflow"), self.run("postfix"), self.run("floor")

        def rate(result: RunResult | None) -> float | None:
            return None if result is None or not result.complete else result.msgs_per_second

        return {
            "mailflow_over_postfix": ratio(rate(mailflow), rate(postfix)),
            "mailflow_over_floor": ratio(rate(mailflow), rate(floor)),
            "postfix_over_floor": ratio(rate(postfix), rate(floor)),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "parameters": dict(self.parameters),
            "runs": [r.as_json() for r in self.runs],
            "ratios": self.ratios(),
        }


def _cell(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=False)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(table: Table) -> str:
    """A plain-text table (also valid Markdown-ish monospace) with the ratios below it."""
    header = [
        "relay",
        "msg/s",
        "end-to-end s",
        "inject s",
        "p50 ms",
        "p99 ms",
        "CPU s",
        "RSS MiB",
        "PSS MiB",
        "procs",
        "messages",
    ]
    rows = []
    for run in table.runs:
        counted = f"{run.messages}/{run.expected}"
        if run.tls_messages is not None and run.sessions is not None:
            counted += f" ({run.tls_messages} over TLS, {run.sessions} sessions)"
        if run.error is not None:
            counted += f" ERROR: {run.error}"
        rows.append(
            [
                run.relay,
                _cell(run.msgs_per_second),
                _cell(run.seconds, 2),
                _cell(run.inject_seconds, 2),
                _cell(run.p50_ms, 2),
                _cell(run.p99_ms, 2),
                _cell(run.cpu_seconds, 2),
                _cell(run.peak_rss_mib),
                _cell(run.peak_pss_mib),
                _cell(run.processes),
                counted,
            ]
        )
    parameters = ", ".join(f"{k}={v}" for k, v in table.parameters.items())
    ratios = table.ratios()
    lines = [f"{table.title}  ({parameters})", *_render(header, rows)]
    lines.append(
        "ratios (msg/s): Mailflow/Postfix = "
        + _ratio_text(ratios["mailflow_over_postfix"])
        + ", Mailflow/floor = "
        + _ratio_text(ratios["mailflow_over_floor"])
        + ", Postfix/floor = "
        + _ratio_text(ratios["postfix_over_floor"])
    )
    return "\n".join(lines)


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class ControlPlaneResult:
    """One control-plane measurement: what, at which scale, and the figure."""

    measure: str
    """``compile``, ``route_for`` or ``operator``."""
    connectors: int
    value: float
    unit: str
    """``ms``, ``lookups/s`` …"""
    detail: str = ""


def format_control_plane(results: Sequence[ControlPlaneResult]) -> str:
    header = ["measure", "connectors", "value", "unit", "detail"]
    rows = [[r.measure, f"{r.connectors:,}", _cell(r.value, 1), r.unit, r.detail] for r in results]
    return "\n".join(["Control plane", *_render(header, rows)])


def to_json(
    *,
    machine: Mapping[str, Any],
    tables: Sequence[Table],
    control_plane: Sequence[ControlPlaneResult],
) -> str:
    document = {
        "machine": dict(machine),
        "tables": [t.as_json() for t in tables],
        "control_plane": [asdict(r) for r in control_plane],
    }
    return json.dumps(document, indent=2) + "\n"
