"""Every behaviour of SEMANTICS.md has at least one test that names its id.

The checklist lives in ../shared/SEMANTICS.md; its ids are copied here so the suite
does not depend on a file outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

IDS = (
    [f"S{n:02d}" for n in range(1, 20)]
    + [f"D{n:02d}" for n in range(1, 12)]
    + [f"H{n:02d}" for n in range(1, 7)]
    + [f"R{n:02d}" for n in range(1, 5)]
)
TESTS = Path(__file__).parent


def named_ids() -> set[str]:
    """Ids named by a test function (test_s07_...) or a comment (# S07) in tests/."""
    found: set[str] = set()
    for path in TESTS.glob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        for name in re.findall(r"def (test_\w+)", text):
            found.update(m.upper() for m in re.findall(r"(?<=_)([sdhr]\d\d)(?=_)", name))
        found.update(re.findall(r"#\s*([SDHR]\d\d)\b", text))
    return found


def test_every_semantics_id_has_a_named_test() -> None:
    missing = [i for i in IDS if i not in named_ids()]
    assert not missing, f"no test names these SEMANTICS.md ids: {', '.join(missing)}"
