"""`python -m metaunlearn ...` (and `accelerate launch -m metaunlearn unlearn STUDY`): the CLI."""

from .cli import main

main()
