"""What the ``popproxy`` subcommands print, and the work behind it.

``popproxy/cli.py`` keeps argv, logging setup, signals, ``trio.run`` and exit codes
(DESIGN.md, Layers); the modules here build the text a subcommand prints
(``check_config``) and read or prune the state store (``state``), so they can be
tested without a process around them.
"""
