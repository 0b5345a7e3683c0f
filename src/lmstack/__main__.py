"""`python -m lmstack ...`: the `lmstack` command (lmstack/cli.py)."""

from lmstack.cli import main

main()
