"""`python -m popproxy` is the same as the `popproxy` command."""

from popproxy.cli import main

raise SystemExit(main())
