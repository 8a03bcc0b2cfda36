"""`python -m service` runs the `comms` command."""

from service.cli import main

raise SystemExit(main())
