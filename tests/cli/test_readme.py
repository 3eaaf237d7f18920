"""The README's console examples are what the commands print.

Every ```console block of the README holds one or more ``$ mailflow …`` commands, each
followed by its output as a terminal shows it: standard output, then standard error (the
commands write their problems first and their notes and summary last). A line ``...`` stands
for any number of lines. Each command runs here, from the repository root, as a user would.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Example:
    line: int
    command: str
    expected: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: $ {self.command}"


def examples() -> list[Example]:
    found: list[Example] = []
    lines = README.read_text().splitlines()
    inside = False
    for number, text in enumerate(lines, 1):
        if text.startswith("```"):
            inside = text == "```console"
            continue
        if inside and text.startswith("$ "):
            found.append(Example(number, text[2:], ()))
        elif inside and found and found[-1].line < number:
            last = found[-1]
            found[-1] = Example(last.line, last.command, (*last.expected, text))
    return [e for e in found if e.command.startswith("mailflow ")]


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Line by line; ``...`` matches any run of lines (also none)."""
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in expected
    )
    return re.fullmatch(pattern, "".join(f"{line}\n" for line in actual)) is not None


def run(command: str) -> list[str]:
    script = Path(sys.executable).parent / "mailflow"
    program = str(script) if script.exists() else shutil.which("mailflow") or "mailflow"
    words = []
    for word in shlex.split(command)[1:]:
        # As the user's shell would: `examples/*.yaml` is the files, sorted.
        matches = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(word)) if "*" in word else []
        words.extend(matches or [word])
    result = subprocess.run(
        [program, *words], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    return result.stdout.splitlines() + result.stderr.splitlines()


def test_the_readme_has_console_examples_of_validate_and_explain() -> None:
    commands = [e.command.split()[1] for e in examples()]
    assert "validate" in commands
    assert "explain" in commands


@pytest.mark.parametrize("example", examples(), ids=str)
def test_a_readme_console_example_prints_what_the_readme_shows(example: Example) -> None:
    actual = run(example.command)
    assert matches(example.expected, actual), (
        f"{example} prints:\n"
        + "\n".join(actual)
        + "\n\nbut the README shows:\n"
        + "\n".join(example.expected)
    )


@pytest.mark.parametrize(
    ("expected", "actual", "result"),
    [
        (("a", "b"), ["a", "b"], True),
        (("a", "..."), ["a", "b", "c"], True),
        (("a", "...", "c"), ["a", "c"], True),
        (("a", "b"), ["a", "b", "c"], False),
        (("a", "...", "d"), ["a", "b", "c"], False),
        (("a.b",), ["axb"], False),
    ],
)
def test_the_comparison_reads_ellipsis_as_any_lines_and_nothing_else_loosely(
    expected: tuple[str, ...], actual: list[str], result: bool
) -> None:
    assert matches(expected, actual) is result
