"""``python -m varkit``: the same as the ``varkit`` command (and what torchrun runs)."""

from varkit.cli import main

raise SystemExit(main())
