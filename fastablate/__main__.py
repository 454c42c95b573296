"""``python -m fastablate`` (and ``torchrun ... -m fastablate``): the command line."""
from fastablate.cli import main

main()
