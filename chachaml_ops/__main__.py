"""Entry point for `python -m chachaml_ops`."""

from chachaml_ops.cli import main

main()
