"""deploy/argocd/health.lua, run by a real Lua 5.1 (Argo CD's dialect) on its test cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from helm.chart import ROOT

lua51 = pytest.importorskip("lupa.lua51", reason="PyPI lupa (a Lua runtime) is not installed")

ARGOCD = ROOT / "deploy" / "argocd"
CASES = yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]


def to_lua(runtime: Any, value: Any) -> Any:
    """Python data as Lua tables, the way Argo CD hands an object to a health script."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(manifest: dict[str, Any]) -> dict[str, str]:
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD's sandbox opens no os/io: the script must not need them.
    runtime.execute("os = nil; io = nil")
    runtime.globals()["obj"] = to_lua(runtime, manifest)
    result = runtime.execute((ARGOCD / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_of_each_case(case: dict[str, Any]) -> None:
    manifest = yaml.safe_load((ARGOCD / case["inputPath"]).read_text())
    assert health(manifest) == case["healthStatus"]


def test_cases_cover_every_health_state() -> None:
    states = {c["healthStatus"]["status"] for c in CASES}
    assert states == {"Healthy", "Progressing", "Degraded"}


def test_both_kinds_are_covered() -> None:
    kinds = {yaml.safe_load((ARGOCD / c["inputPath"]).read_text())["kind"] for c in CASES}
    assert kinds == {"OutboundConnector", "MultiSmtpProfile"}
