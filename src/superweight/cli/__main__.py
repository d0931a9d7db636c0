"""`python -m superweight.cli ...`: the same commands as `sw`."""

from . import main

main()
