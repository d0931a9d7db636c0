"""`python -m superweight ...`: the same commands as `sw`, and what `torchrun -m superweight` runs."""

from .cli import main

main()
