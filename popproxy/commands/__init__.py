"""What the ``popproxy`` subcommands print, and the work behind it.

``popproxy/cli.py`` keeps argv, logging setup, signals, ``trio.run`` and exit codes
(DESIGN.md, Layers); the modules here build the text a subcommand prints
(``check_config``), read or prune the state store (``state``) and settle the
settings ``oauth-login`` signs in with (``oauth_login``), so they can be
tested without a process around them.
"""
