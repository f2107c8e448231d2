"""`python -m vramfit ...`: the CLI where the `vramfit` script is not on PATH."""

from vramfit.cli import main

main()
