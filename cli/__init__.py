"""The `sessionq` command line (installed as sessionq.cli)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("sessionq CLI: coming soon")
