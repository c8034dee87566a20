"""``python -m distload``: the command line (same as the ``distload`` script)."""

from distload.cli import main

raise SystemExit(main())
