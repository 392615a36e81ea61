"""`python -m cascade_cli`: the `cascade` command line."""

from cascade_cli.cli import main

main(prog_name="cascade")
