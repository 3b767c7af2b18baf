"""``python -m devicebridge``: the command line."""

from devicebridge.cli import main

main(prog_name="devicebridge")
