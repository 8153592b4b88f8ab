"""`python -m sessionq ...`, the same as the `sessionq` command (where no script is on PATH)."""

from sessionq.cli import main

main(prog_name="sessionq")
