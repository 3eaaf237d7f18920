"""The two Dockerfiles, read as text (no container engine runs here), and the Helm installer."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

import pytest

from helm.chart import HELM, ROOT


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [argument for word, argument in self.instructions if word == keyword]


def stages(dockerfile: str) -> tuple[dict[str, str], list[Stage]]:
    """ARG defaults before the first FROM, and the stages with their instructions."""
    text = re.sub(r"\\\n", " ", dockerfile)
    args: dict[str, str] = {}
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, argument = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = argument.split()
            found.append(Stage(parts[0], parts[2] if len(parts) == 3 else None))
        elif found:
            found[-1].instructions.append((word, argument))
        elif word == "ARG" and "=" in argument:
            key, _, value = argument.partition("=")
            args[key] = value
    return args, found


@pytest.mark.parametrize("component", ["relay", "operator"])
def test_image_is_multi_stage_non_root_on_a_pinned_slim_python(component: str) -> None:
    args, (build, final) = stages((ROOT / component / "Dockerfile").read_text())
    base = args["BASE_IMAGE"]
    # A pinned patch release of Python 3.11 on a slim Debian: never `latest` or a moving minor.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert build.base == final.base == "${BASE_IMAGE}"
    assert build.name == "build"
    # The wheel is built in the first stage; the final one only copies the environment.
    assert any("pip wheel" in run for run in build.all("RUN"))
    assert final.all("COPY") == ["--from=build /opt/mailflow /opt/mailflow"]
    for run in final.all("RUN"):
        assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", run), run
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0  # numeric, so that Kubernetes can enforce runAsNonRoot
    assert final.all("ENTRYPOINT") == ['["mailflow"]']
    assert final.all("CMD") == [f'["{component}", "--help"]']


def test_build_context_holds_only_what_the_wheel_needs() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {
        "!pyproject.toml",
        "!README.md",
        "!crds/",
        "!operator/mailflow_operator/",
        "!relay/mailflow_relay/",
    } <= set(lines)


def test_install_helm_is_fast_and_quiet_when_helm_is_present() -> None:
    if not HELM.exists():
        pytest.skip(".tools/bin/helm is missing: run `bash scripts/install-helm.sh`")
    result = subprocess.run(
        ["bash", "scripts/install-helm.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("==> helm present: .tools/bin/helm v")
