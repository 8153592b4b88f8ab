"""Typing (issue Operability): `mypy --strict` passes on the library, on examples/ and on
the README's Quick start files, and a type checker checks execute_activity /
start_activity against the decorated activity (tests/typecheck/contract.py says what it
must report, line by line).

Each check is one `mypy` process with its own cache (a cold run takes a few seconds).
The README's other Python blocks are fragments with ``...`` in them: they only have to
compile (tests/test_readme.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_readme import named_files, python_blocks

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "pyproject.toml"
ERROR_LINE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): error: (?P<text>.*?)(?:  \[(?P<code>[\w-]+)\])?$")
EXPECTED = re.compile(r"#\s*E:\s*(?P<code>[\w-]+)\s*$")

pytest.importorskip("mypy", reason="mypy is in the dev extra")


def mypy(*targets: str, cwd: Path, cache: Path) -> tuple[int, str]:
    """Run mypy --strict with the project's settings on `targets` (paths relative to cwd),
    finding `sessionq` in this checkout (an editable install hides it from mypy)."""
    env = {**os.environ, "MYPYPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(CONFIG), "--strict",
         "--cache-dir", str(cache), "--no-error-summary", "--show-error-codes", *targets],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def errors(output: str) -> list[tuple[str, int, str]]:
    """(file name, line, error code) of each error mypy printed."""
    found = []
    for line in output.splitlines():
        if match := ERROR_LINE.match(line):
            found.append((Path(match["file"]).name, int(match["line"]), match["code"] or "?"))
    return found


def test_the_library_passes_mypy_strict(tmp_path: Path) -> None:
    code, output = mypy("sessionq", cwd=REPO_ROOT, cache=tmp_path)
    assert code == 0, output


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO_ROOT / "examples").iterdir() if p.is_dir()))
def test_each_example_passes_mypy_strict(example: str, tmp_path: Path) -> None:
    folder = REPO_ROOT / "examples" / example
    if (folder / "__init__.py").exists():  # a package: imported as examples.<name>
        code, output = mypy(f"examples/{example}", cwd=REPO_ROOT, cache=tmp_path)
    else:  # scripts next to each other, importing each other by module name
        code, output = mypy(*sorted(p.name for p in folder.glob("*.py")), cwd=folder, cache=tmp_path)
    assert code == 0, output


def test_the_readme_quick_start_passes_mypy_strict(tmp_path: Path) -> None:
    files = named_files(python_blocks())
    assert sorted(files) == ["activities.py", "caller.py", "sync_caller.py"]
    folder = tmp_path / "quickstart"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    code, output = mypy(*sorted(files), cwd=folder, cache=tmp_path / "cache")
    assert code == 0, output


def test_calls_are_checked_against_the_decorated_activity(tmp_path: Path) -> None:
    """Right calls pass with the activity's return type; each wrong one gets (among others
    mypy adds) the error its line names, and no other line gets one."""
    contract = REPO_ROOT / "tests" / "typecheck" / "contract.py"
    expected = {
        number: match["code"]
        for number, text in enumerate(contract.read_text().splitlines(), start=1)
        if (match := EXPECTED.search(text))
    }
    assert len(expected) >= 10
    _, output = mypy(str(contract.relative_to(REPO_ROOT)), cwd=REPO_ROOT, cache=tmp_path)
    got: dict[int, set[str]] = {}
    for name, line, code in errors(output):
        assert name == contract.name, output
        got.setdefault(line, set()).add(code)
    unexpected = sorted(set(got) - set(expected))
    missing = sorted(line for line, code in expected.items() if code not in got.get(line, set()))
    assert not unexpected and not missing, (
        f"lines with an unexpected error: {unexpected}; lines missing theirs: {missing}\n\n{output}"
    )
