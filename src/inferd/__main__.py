"""`python -m inferd` is the `inferd` command."""

from inferd.cli.main import main

main()
