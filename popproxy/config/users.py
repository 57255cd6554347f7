"""The ``users`` section: local users, their password hashes and upstream credentials.

Secrets are never inline: an upstream password comes from ``upstream_password_file``
or ``upstream_password_env`` and is read here, at load, into a :class:`Secret`.
"""

from __future__ import annotations

import difflib
import stat
from collections.abc import Mapping
from pathlib import Path

from popproxy.auth.passwords import PasswordHashError, parse_hash
from popproxy.config.fields import ConfigSection
from popproxy.config.model import FetchSource, UpstreamAuth, UpstreamConfig, UserConfig
from popproxy.config.reader import read_bounded
from popproxy.config.secrets import MAX_SECRET_FILE_BYTES, read_secret
from popproxy.policy.fields import describe, keys_of
from popproxy.pop3.names import login_name_problem
from popproxy.secret import Secret

_USER_KEYS = keys_of(UserConfig)
_SOURCE_KEYS = keys_of(FetchSource)
# Sources per user: a person merges a few accounts; hundreds is a mistake, and each
# is a poll and a connection per interval.
MAX_FETCH_SOURCES = 32
# max_maildir_bytes: below 1 MiB no mail would arrive at all; a petabyte is a typo.
MIN_MAILDIR_LIMIT_BYTES = 1024 * 1024
MAX_MAILDIR_LIMIT_BYTES = 10**15
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


def build_users(
    top: ConfigSection, upstreams: Mapping[str, UpstreamConfig]
) -> dict[str, UserConfig]:
    """The ``users`` mapping: each valid user by name (problems go to ``top.issues``).

    ``upstreams`` are those built without problems: a user's credential keys are checked
    against its upstream's ``auth`` (a password, or a refresh-token file).
    """
    out: dict[str, UserConfig] = {}
    # Names as written, so that a user naming an upstream with its own errors gets no
    # second, misleading "no such upstream" error.
    declared = top.raw("upstreams")
    declared_names = {str(k) for k in declared} if isinstance(declared, dict) else set()
    fetched_by: dict[tuple[str, str], str] = {}
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
        upstream = _upstream_name(section, "upstream", declared_names)
        has_maildir = section.has("maildir")
        has_upstream = section.has("upstream")
        if has_maildir and has_upstream:
            section.error("upstream", "give either maildir or upstream, not both")
        elif not has_maildir and not has_upstream:
            top.issues.add(path, "missing; expected maildir (a local Maildir) or upstream")
        upstream_user = section.string("upstream_user")
        target = upstreams.get(upstream) if upstream is not None else None
        secret: Secret | None = None
        token_file: Path | None = None
        if has_upstream:
            secret, token_file = _credential(section, upstream, target, declared_names)
        if not has_upstream:
            for key in (
                "upstream_user",
                "upstream_password_file",
                "upstream_password_env",
                "upstream_refresh_token_file",
            ):
                if section.has(key):
                    section.error(key, "only meaningful with upstream")
        fetch = _fetch_sources(section, name, declared_names, fetched_by, upstreams)
        max_maildir = section.integer(
            "max_maildir_bytes", lo=MIN_MAILDIR_LIMIT_BYTES, hi=MAX_MAILDIR_LIMIT_BYTES
        )
        if max_maildir is not None and not section.has("fetch"):
            section.error("max_maildir_bytes", "only meaningful with fetch")
        if password_hash is None or len(top.issues.items) > errors_before:
            continue
        out[name] = UserConfig(
            name=name,
            password_hash=password_hash,
            maildir=maildir,
            upstream=upstream,
            upstream_user=(upstream_user or name) if upstream is not None else None,
            upstream_password=secret,
            upstream_refresh_token_file=token_file,
            fetch=fetch,
            max_maildir_bytes=max_maildir,
        )
    return out


def _upstream_name(section: ConfigSection, key: str, declared: set[str]) -> str | None:
    """The name of an entry in ``upstreams`` at ``key``, with a hint for a near miss."""
    upstream = section.string(key, what="the name of an entry in upstreams")
    if upstream is not None and upstream not in declared:
        close = difflib.get_close_matches(upstream, sorted(declared), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        section.error(key, f"expected the name of an entry in upstreams, got {upstream!r}{hint}")
        return None
    return upstream


def _fetch_sources(
    section: ConfigSection,
    user: str,
    declared: set[str],
    fetched_by: dict[tuple[str, str], str],
    upstreams: Mapping[str, UpstreamConfig],
) -> tuple[FetchSource, ...]:
    """``users.NAME.fetch``: the gateway's sources for this user (docs/gateway.md).

    Each names an upstream, an upstream user (default: the local name) and its
    password or (token upstream) refresh-token file, like a proxy-mode user. A source
    needs the user's ``maildir`` (where its mail goes), and one upstream account is
    fetched for one local user only: two pollers would each fetch the mail, and one's
    deletions would take it from the other.
    """
    value = section.raw("fetch")
    if value is None:
        return ()
    what = (
        "a list of sources ({upstream, upstream_user, upstream_password_file"
        " or upstream_refresh_token_file})"
    )
    if not isinstance(value, list) or not value:
        section.error("fetch", f"expected {what}, got {describe(value)}")
        return ()
    if len(value) > MAX_FETCH_SOURCES:
        section.error("fetch", f"expected at most {MAX_FETCH_SOURCES} sources, got {len(value)}")
        return ()
    if not section.has("maildir"):
        section.error(
            "fetch", "fetch needs maildir: the local Maildir the sources are fetched into"
        )
    out: list[FetchSource] = []
    for index, item in enumerate(value):
        path = section.at(f"fetch[{index}]")
        source = ConfigSection.of(section.issues, path, item, _SOURCE_KEYS, hints=_USER_HINTS)
        if source is None:
            continue
        upstream = _upstream_name(source, "upstream", declared)
        if not source.has("upstream"):
            source.missing("upstream", "the name of an entry in upstreams")
        upstream_user = source.string("upstream_user") or user
        target = upstreams.get(upstream) if upstream is not None else None
        secret, token_file = _credential(source, upstream, target, declared)
        if upstream is None or (secret is None and token_file is None):
            continue
        owner = fetched_by.get((upstream, upstream_user))
        if owner is not None:
            whose = "this user" if owner == user else f"user {owner!r}"
            source.error(
                "upstream_user",
                f"{upstream}/{upstream_user} is already fetched by {whose};"
                " an upstream account is fetched for one local user only",
            )
            continue
        fetched_by[upstream, upstream_user] = user
        out.append(FetchSource(upstream, upstream_user, secret, token_file))
    return tuple(out)


def _credential(
    section: ConfigSection,
    upstream: str | None,
    target: UpstreamConfig | None,
    declared: set[str],
) -> tuple[Secret | None, Path | None]:
    """The upstream credential of a proxy-mode user or a fetch source: a password, or
    for a token upstream the refresh-token file (the other kind's keys are errors)."""
    if target is not None and target.auth is not UpstreamAuth.PASS:
        return None, _refresh_token_file(section, target.auth)
    if target is None and upstream in declared:
        # The upstream has problems of its own: which credential it takes is unknown.
        return None, None
    if section.has("upstream_refresh_token_file"):
        section.error(
            "upstream_refresh_token_file",
            "only meaningful with an upstream whose auth is xoauth2 or oauthbearer",
        )
    return _upstream_secret(section), None


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


def _refresh_token_file(section: ConfigSection, auth: UpstreamAuth) -> Path | None:
    """The refresh-token file of a user of a token upstream: it must exist, and be readable
    by its owner only (it is a long-lived credential; `popproxy oauth-login` writes it 0600).
    """
    for key in ("upstream_password_file", "upstream_password_env"):
        if section.has(key):
            section.error(
                key,
                f"the upstream logs in with auth: {auth.value}; give"
                " upstream_refresh_token_file (from `popproxy oauth-login`) instead",
            )
    path = section.path_value("upstream_refresh_token_file", kind="file")
    if path is None:
        if not section.has("upstream_refresh_token_file"):
            section.missing(
                "upstream_refresh_token_file",
                f"the file holding the refresh token for auth: {auth.value}"
                " (write it with `popproxy oauth-login`)",
            )
        return None
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        section.error("upstream_refresh_token_file", f"cannot read {path}: {exc.strerror}")
        return None
    if mode & 0o077:
        section.error(
            "upstream_refresh_token_file",
            f"{path} is open to other users (mode {stat.S_IMODE(mode):04o});"
            " a refresh token is a long-lived credential: chmod 600 it",
        )
        return None
    problem = refresh_token_problem(path)
    if problem is not None:
        section.error("upstream_refresh_token_file", problem)
        return None
    return path


def refresh_token_problem(path: Path) -> str | None:
    """Why ``path`` does not hold a refresh token, or None (read now; the token itself is
    read again at each refresh, since rotation rewrites the file)."""
    raw = read_bounded(path, MAX_SECRET_FILE_BYTES)
    if isinstance(raw, OSError):
        return f"cannot read {path}: {raw.strerror or raw}"
    if raw is None or not raw.strip():
        return f"expected a refresh token in {path} (at most {MAX_SECRET_FILE_BYTES} bytes)"
    return None


def _upstream_secret(section: ConfigSection) -> Secret | None:
    keys = ("upstream_password_file", "upstream_password_env")
    if not any(section.has(key) for key in keys):
        section.error(
            "upstream_password_file",
            "missing; expected upstream_password_file or upstream_password_env",
        )
        return None
    return read_secret(section, *keys)
