"""What a loaded config needs of the host it runs on, checked by ``check-config``.

Loading a config checks what must hold wherever it is loaded (a build machine, a
test); a few things only matter on the server that runs it. ``check-config`` reports
them with the config's own problems, so that ``run`` does not meet them first at start.
"""

from __future__ import annotations

from popproxy.config.model import Config
from popproxy.policy.fields import ConfigIssue


def host_problems(config: Config) -> tuple[ConfigIssue, ...]:
    """The problems ``run`` would meet at start on this host, each as a config issue.

    Today: the directory of a sqlite state file, which sqlite does not create, when
    the config uses the store (``Config.uses_state``). Known sources alone need it:
    without it a user's usual addresses would not be spared the user-name lockout, so
    anyone could lock the owner out (DESIGN.md, invariant 8).
    """
    path = config.state.sqlite_path
    if not config.uses_state or path is None or path.parent.is_dir():
        return ()
    return (
        ConfigIssue(
            str(config.source),
            "state.url",
            f"the directory {path.parent} of the sqlite file does not exist; create it,"
            " or name another (sqlite:/// with three slashes is relative to the working"
            " directory popproxy starts in, four slashes start an absolute path)",
        ),
    )
