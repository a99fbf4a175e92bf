"""`python -m worker` is the `guestkit-worker` command."""

from worker.cli import main

main()
