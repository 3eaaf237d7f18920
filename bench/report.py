"""The figures of a benchmark run: values, percentiles, ratios, tables, JSON, plot, README.

Pure functions only (no processes, no clock), so that the harness's arithmetic and its
output have fast tests of their own (tests/bench). Run as a script, it renders a run's
JSON into the README's table and a PNG plot of the ratios::

    python bench/report.py bench/results/latest.json --readme README.md --plot ratios.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "README_BEGIN",
    "README_END",
    "BacklogResult",
    "ControlPlaneResult",
    "RunResult",
    "Table",
    "format_backlog",
    "format_control_plane",
    "format_table",
    "markdown_report",
    "percentile",
    "ratio",
    "ratio_summary",
    "replace_readme_section",
    "to_json",
    "write_plot",
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

        ratios = {
            "mailflow_over_postfix": ratio(rate(mailflow), rate(postfix)),
            "mailflow_over_floor": ratio(rate(mailflow), rate(floor)),
            "postfix_over_floor": ratio(rate(postfix), rate(floor)),
        }
        # The variants (DKIM signing, verifying TLS modes) against the same Postfix run.
        for run in self.runs:
            if run.relay.startswith("mailflow-"):
                key = f"{run.relay.replace('-', '_')}_over_postfix"
                ratios[key] = ratio(rate(run), rate(postfix))
        return ratios

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


@dataclass(frozen=True)
class BacklogResult:
    """A relay started on a full spool: how soon it serves, drains, and its peak memory."""

    messages: int
    processes: int
    fill_seconds: float
    """Spooling the backlog before the start (not part of the relay's figures)."""
    ready_seconds: float | None
    """From the start until ``/readyz`` (every process listening, the spool rescanned)."""
    drained_seconds: float
    """From the start until the sink counted the last queued message."""
    delivered: int
    cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    error: str | None = None

    @property
    def peak_rss_mib(self) -> float | None:
        return None if self.peak_rss_bytes is None else round(self.peak_rss_bytes / MIB, 1)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_rss_mib": self.peak_rss_mib}


def format_backlog(result: BacklogResult) -> str:
    outcome = f", ERROR: {result.error}" if result.error else ""
    return (
        f"Start-up with a backlog: {result.messages} messages, {result.processes} process(es): "
        f"ready in {_cell(result.ready_seconds, 2)} s, drained in "
        f"{_cell(result.drained_seconds, 2)} s ({result.delivered} delivered), peak RSS "
        f"{_cell(result.peak_rss_mib)} MiB, CPU {_cell(result.cpu_seconds, 2)} s{outcome}"
    )


def to_json(
    *,
    machine: Mapping[str, Any],
    tables: Sequence[Table],
    control_plane: Sequence[ControlPlaneResult],
    backlog: BacklogResult | None = None,
) -> str:
    document = {
        "machine": dict(machine),
        "tables": [t.as_json() for t in tables],
        "control_plane": [asdict(r) for r in control_plane],
        "backlog": None if backlog is None else backlog.as_json(),
    }
    return json.dumps(document, indent=2) + "\n"


# --- the README section and the plot, from a run's JSON ----------------------------------

README_BEGIN = "<!-- bench:begin (bench/report.py writes this section from the JSON) -->"
README_END = "<!-- bench:end -->"
_MD_COLUMNS = (
    ("relay", "relay", None),
    ("msg/s", "msgs_per_second", 1),
    ("p50 ms", "latency_p50_ms", 2),
    ("p99 ms", "latency_p99_ms", 2),
    ("CPU s", "cpu_seconds", 2),
    ("RSS MiB", "peak_rss_mib", 1),
    ("procs", "processes", None),
)


def _md_cell(value: Any, digits: int | None) -> str:
    if value is None:
        return "-"
    if digits is not None and isinstance(value, (int, float)):
        return f"{float(value):.{digits}f}"
    return str(value)


def _table_label(table: Mapping[str, Any]) -> str:
    parameters = table.get("parameters", {})
    return (
        f"{parameters.get('hop', table['title'])}, reuse {parameters.get('reuse', '?')}, "
        f"{parameters.get('recipients', 1)} rcpt"
    )


def markdown_report(document: Mapping[str, Any]) -> str:
    """The README's section: the machine, each table with its ratios, the backlog start-up."""
    machine = document.get("machine", {})
    lines = [
        f"Run of {machine.get('date', '?')} on {machine.get('nproc', '?')} × "
        f"{machine.get('cpu_model', '?')}, Postfix {machine.get('postfix', '?')}, Python "
        f"{machine.get('python', '?')}, load average {machine.get('loadavg', '?')} "
        f"(git {machine.get('git', '?')}).",
        "",
    ]
    for table in document.get("tables", []):
        parameters = table.get("parameters", {})
        described = ", ".join(f"{k} {v}" for k, v in parameters.items())
        lines += [f"**{table['title']}** ({described})", ""]
        lines.append("| " + " | ".join(name for name, _, _ in _MD_COLUMNS) + " | complete |")
        lines.append("|" + "---|" * (len(_MD_COLUMNS) + 1))
        for run in table.get("runs", []):
            cells = [_md_cell(run.get(key), digits) for _, key, digits in _MD_COLUMNS]
            done = "yes" if run.get("complete") else f"no: {run.get('error') or 'short'}"
            lines.append("| " + " | ".join(cells) + f" | {done} |")
        ratios = table.get("ratios", {})
        shown = ", ".join(
            f"{key.removesuffix('_over_postfix').replace('_', '-')} {value:.2f}×"
            for key, value in ratios.items()
            if key.endswith("_over_postfix") and value is not None
        )
        lines += ["", f"Over Postfix: {shown or '-'}", ""]
    backlog = document.get("backlog")
    if backlog:
        lines.append(
            f"Start-up with a backlog of {backlog['messages']} messages "
            f"({backlog['processes']} process(es)): ready in "
            f"{_md_cell(backlog.get('ready_seconds'), 2)} s, drained in "
            f"{_md_cell(backlog.get('drained_seconds'), 2)} s, peak RSS "
            f"{_md_cell(backlog.get('peak_rss_mib'), 1)} MiB."
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def ratio_summary(documents: Sequence[Mapping[str, Any]]) -> str:
    """Over several runs: each table's ratios over Postfix as median and range (what the
    README's note states; one run on a shared machine says little)."""
    collected: dict[tuple[str, str], list[float]] = {}
    for document in documents:
        for label, ratios in plot_points(document):
            for relay, value in ratios.items():
                collected.setdefault((label, relay), []).append(value)
    if not collected:
        return ""
    lines = [
        f"Over {len(documents)} run(s), throughput over Postfix's (median, range):",
        "",
        "| table | relay | median | range | runs |",
        "|---|---|---|---|---|",
    ]
    for (label, relay), values in collected.items():
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = (
            ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        )
        lines.append(
            f"| {label} | {relay} | {median:.2f}× | {ordered[0]:.2f}–{ordered[-1]:.2f}× "
            f"| {len(values)} |"
        )
    return "\n".join(lines) + "\n"


def replace_readme_section(readme: str, section: str, plot: str | None = None) -> str:
    """``readme`` with the text between the bench markers replaced (markers kept)."""
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"the README has no {README_BEGIN} … {README_END} section")
    image = f"\n![Mailflow's throughput over Postfix's, per table]({plot})\n" if plot else ""
    body = f"{README_BEGIN}\n\n{section}{image}\n{README_END}"
    return pattern.sub(lambda _: body, readme, count=1)


def plot_points(document: Mapping[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(table label, {relay: ratio over Postfix}) for every table that has one."""
    points = []
    for table in document.get("tables", []):
        ratios = {
            key.removesuffix("_over_postfix").replace("_", "-"): value
            for key, value in table.get("ratios", {}).items()
            if key.endswith("_over_postfix") and key.startswith("mailflow") and value is not None
        }
        if ratios:
            points.append((_table_label(table), ratios))
    return points


def write_plot(document: Mapping[str, Any], path: Path) -> None:
    """A PNG bar chart of each Mailflow variant's throughput over Postfix's, per table, with
    the target (1.5×) and the goal (2×) drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = plot_points(document)
    relays = sorted(
        {relay for _, ratios in points for relay in ratios}, key=lambda r: (r != "mailflow", r)
    )
    colours = {relay: f"C{n}" for n, relay in enumerate(relays)}
    bars = sum(len(ratios) for _, ratios in points)
    figure, axes = pyplot.subplots(figsize=(9, 1.2 + 0.28 * bars + 0.2 * len(points)))
    y, ticks, labelled = 0.0, [], set()
    for _, ratios in points:
        first = y
        for relay in sorted(ratios, key=relays.index):
            label = relay if relay not in labelled else None
            labelled.add(relay)
            axes.barh(y, ratios[relay], height=0.8, color=colours[relay], label=label)
            axes.text(ratios[relay], y, f" {ratios[relay]:.2f}", va="center", fontsize=7)
            y += 1
        ticks.append((first + y - 1) / 2)
        y += 0.6
    axes.set_yticks(ticks)
    axes.set_yticklabels([label for label, _ in points], fontsize=8)
    axes.invert_yaxis()
    for x, style, name in ((1.0, ":", "parity"), (1.5, "--", "target 1.5×"), (2.0, "-", "goal 2×")):
        axes.axvline(x, color="grey", linestyle=style, linewidth=1, label=name)
    axes.set_xlabel("throughput over Postfix's (msg/s ratio, same run)")
    machine = document.get("machine", {})
    axes.set_title(
        f"make bench, {machine.get('date', '?')}, load average {machine.get('loadavg', '?')}",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/report.py",
        description="Render a make bench JSON into the README's section and a PNG plot.",
    )
    parser.add_argument(
        "json",
        type=Path,
        nargs="+",
        help="the figures (bench/results/latest.json); several runs: the tables and the plot "
        "are the last one's, and the ratios are summed up over all (median, range)",
    )
    parser.add_argument("--readme", type=Path, help="replace the bench section of this README")
    parser.add_argument("--plot", type=Path, help="write the PNG plot of the ratios here")
    args = parser.parse_args(argv)
    documents = [json.loads(path.read_text(encoding="utf-8")) for path in args.json]
    document = documents[-1]
    if args.plot is not None:
        write_plot(document, args.plot)
    section = markdown_report(document)
    if len(documents) > 1:
        section += "\n" + ratio_summary(documents)
    if args.readme is None:
        sys.stdout.write(section)
        return 0
    plot = None
    if args.plot is not None:
        plot = os.path.relpath(args.plot.resolve(), args.readme.resolve().parent)
    text = args.readme.read_text(encoding="utf-8")
    args.readme.write_text(replace_readme_section(text, section, plot), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
