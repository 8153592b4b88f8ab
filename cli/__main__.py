"""`python -m sessionq.cli ...`, the same as the `sessionq` command."""

from . import main

main(prog_name="sessionq")
