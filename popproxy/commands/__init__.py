"""The ``popproxy`` subcommands but ``run`` and ``version``, one module each.

Every module is wired the same way: ``add_parser(commands)`` declares the subcommand
and its options on the top-level parser of ``popproxy/cli.py``, and ``run(args)`` does
its work, prints, and returns the exit code to ``cli.py`` (which alone reads argv, sets
up logging, handles signals and exits). ``common`` holds what they share. The work and
the text are plain functions beside ``run``, tested without a process around them.
"""
