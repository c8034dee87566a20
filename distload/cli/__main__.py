"""``python -m distload.cli``: the command line (same as ``python -m distload``)."""

from distload.cli import main

raise SystemExit(main())
