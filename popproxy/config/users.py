"""The ``users`` section: local users, their password hashes and upstream credentials.

Secrets are never inline: an upstream password comes from ``upstream_password_file``
or ``upstream_password_env`` and is read here, at load, into a :class:`Secret`.
"""

from __future__ import annotations

import difflib

from popproxy.auth.passwords import PasswordHashError, parse_hash
from popproxy.config.fields import ConfigSection
from popproxy.config.model import UserConfig
from popproxy.config.secrets import read_secret
from popproxy.policy.fields import keys_of
from popproxy.pop3.names import login_name_problem
from popproxy.secret import Secret

_USER_KEYS = keys_of(UserConfig)
_USER_HINTS = {
    "upstream_password": (
        "secrets are never inline: put the password in a file and name it with"
        " upstream_password_file, or name an environment variable with upstream_password_env"
    ),
    "password": (
        "passwords are never stored in the config: write password_hash, made with"
        " `popproxy hash-password`"
    ),
}


def build_users(top: ConfigSection) -> dict[str, UserConfig]:
    """The ``users`` mapping: each valid user by name (problems go to ``top.issues``)."""
    out: dict[str, UserConfig] = {}
    # Names as written, so that a user naming an upstream with its own errors gets no
    # second, misleading "no such upstream" error.
    declared = top.raw("upstreams")
    declared_names = {str(k) for k in declared} if isinstance(declared, dict) else set()
    for name, item in top.named_sections("users"):
        path = f"users.{name}"
        problem = login_name_problem(name)
        if problem is not None:
            top.issues.add(path, problem)
            continue
        errors_before = len(top.issues.items)
        section = ConfigSection.of(top.issues, path, item, _USER_KEYS, hints=_USER_HINTS)
        if section is None:
            continue
        password_hash = _password_hash(section)
        maildir = section.path_value("maildir", kind=None)
        if maildir is not None and maildir.exists() and not maildir.is_dir():
            section.error(
                "maildir", f"expected the path of a Maildir directory; {maildir} is a file"
            )
        upstream = section.string("upstream", what="the name of an entry in upstreams")
        if upstream is not None and upstream not in declared_names:
            close = difflib.get_close_matches(upstream, sorted(declared_names), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section.error(
                "upstream", f"expected the name of an entry in upstreams, got {upstream!r}{hint}"
            )
        has_maildir = section.has("maildir")
        has_upstream = section.has("upstream")
        if has_maildir and has_upstream:
            section.error("upstream", "give either maildir or upstream, not both")
        elif not has_maildir and not has_upstream:
            top.issues.add(path, "missing; expected maildir (a local Maildir) or upstream")
        upstream_user = section.string("upstream_user")
        secret = _upstream_secret(section) if has_upstream else None
        if not has_upstream:
            for key in ("upstream_user", "upstream_password_file", "upstream_password_env"):
                if section.has(key):
                    section.error(key, "only meaningful with upstream")
        if password_hash is None or len(top.issues.items) > errors_before:
            continue
        out[name] = UserConfig(
            name=name,
            password_hash=password_hash,
            maildir=maildir,
            upstream=upstream,
            upstream_user=(upstream_user or name) if upstream is not None else None,
            upstream_password=secret,
        )
    return out


def _password_hash(section: ConfigSection) -> str | None:
    what = "a PHC hash string (make one with `popproxy hash-password`)"
    value = section.string("password_hash", required=True, what=what)
    if value is None:
        return None
    try:
        parse_hash(value)
    except PasswordHashError as exc:
        reason = str(exc)
        if not reason.startswith("expected"):
            reason = f"expected a PHC hash string that popproxy can verify: {reason}"
        section.error("password_hash", reason)
        return None
    return value


def _upstream_secret(section: ConfigSection) -> Secret | None:
    keys = ("upstream_password_file", "upstream_password_env")
    if not any(section.has(key) for key in keys):
        section.error(
            "upstream_password_file",
            "missing; expected upstream_password_file or upstream_password_env",
        )
        return None
    return read_secret(section, *keys)
