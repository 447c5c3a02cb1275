"""`python -m erasekit …`: the same command line as the `erasekit` script."""

from erasekit.cli import main

main()
