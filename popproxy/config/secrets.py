"""Secrets named in the config: read at load from a file or an environment variable.

Secrets are never inline (a password in the YAML text ends up in backups, diffs
and bug reports): a key ending in ``_file`` names a file holding the secret, a key
ending in ``_env`` an environment variable. Both upstream passwords
(``upstream_password_file``/``_env``) and the PostgreSQL state store's password
(``state.password_file``/``_env``) are read here into a :class:`Secret`.
"""

from __future__ import annotations

import os

from popproxy.config.fields import ConfigSection
from popproxy.config.reader import read_bounded
from popproxy.secret import Secret

# A secret file holds one password; anything bigger is the wrong file.
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret(section: ConfigSection, file_key: str, env_key: str) -> Secret | None:
    """The secret that ``file_key`` or ``env_key`` of ``section`` names.

    None when neither key is given (the caller decides whether that is an error), or
    when the one given is wrong (reported to ``section``). Giving both is an error.
    """
    has_file = section.has(file_key)
    has_env = section.has(env_key)
    if has_file and has_env:
        section.error(env_key, f"give {file_key} or {env_key}, not both")
        return None
    if has_file:
        path = section.path_value(file_key, kind="file")
        if path is None:
            return None
        raw = read_bounded(path, MAX_SECRET_FILE_BYTES)
        if isinstance(raw, OSError):
            section.error(file_key, f"cannot read {path}: {raw.strerror or raw}")
            return None
        if raw is None:
            section.error(
                file_key,
                f"expected a file holding one password (at most {MAX_SECRET_FILE_BYTES} bytes)",
            )
            return None
        # One trailing newline (as `echo` writes) is not part of the password.
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if not raw:
            section.error(file_key, f"expected a password in {path}; it is empty")
            return None
        return Secret(raw)
    if has_env:
        name = section.string(env_key, what="the name of an environment variable")
        if name is None:
            return None
        value = os.environ.get(name)
        if not value:
            section.error(
                env_key,
                f"expected the environment variable {name} to hold the password; it is"
                + (" empty" if value == "" else " not set"),
            )
            return None
        return Secret.from_str(value)
    return None
