"""`python -m runner` is the same as `nnopt`."""

from runner.cli import main

raise SystemExit(main())
