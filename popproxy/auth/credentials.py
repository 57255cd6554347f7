"""A client's login name and password, from USER/PASS, a SASL PLAIN message or the
two responses of a SASL LOGIN exchange.

Pure (no I/O): the sans-IO core hands the session a ``Pass`` or the decoded SASL
data, and this module says which credentials they carry.
"""

from __future__ import annotations

from dataclasses import dataclass

from popproxy.secret import Secret


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login name as the client sent it, and its password (never shown by repr)."""

    user: str
    password: Secret


def plain_credentials(message: Secret) -> Credentials | None:
    """The credentials of a SASL PLAIN message, ``authzid NUL authcid NUL passwd``
    (RFC 4616 §2); None for a malformed one.

    Malformed means not three fields, an authcid that is not UTF-8, or an authzid
    other than the authcid: there is no proxy authorization, a user may only act as
    itself. A malformed message is a failed login, as Dovecot treats it.
    """
    parts = message.reveal().split(b"\0")
    if len(parts) != 3:
        return None
    authzid, authcid, password = parts
    try:
        user = authcid.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if authzid and authzid != authcid:
        return None
    return Credentials(user, Secret(password))


def login_credentials(name: Secret, password: Secret) -> Credentials | None:
    """The credentials of a SASL LOGIN exchange: the responses to ``Username:`` and
    ``Password:`` (draft-murchison-sasl-login §2); None when the name is not UTF-8,
    a failed login as a malformed PLAIN message is."""
    try:
        user = name.reveal().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Credentials(user, password)
