"""SASL PLAIN messages to credentials (RFC 4616 §2)."""

from __future__ import annotations

import pytest

from popproxy.auth.credentials import Credentials, plain_credentials
from popproxy.secret import Secret


@pytest.mark.parametrize(
    ("message", "user", "password"),
    [
        (b"\0alice\0pw", "alice", b"pw"),
        (b"alice\0alice\0pw", "alice", b"pw"),  # authzid equal to authcid
        ("\0jürgen\0pässword".encode(), "jürgen", "pässword".encode()),
        (b"\0alice\0", "alice", b""),  # an empty password is for the authenticator to refuse
        (b"\0alice\0\xff\xfe", "alice", b"\xff\xfe"),  # the password's octets as sent
    ],
)
def test_a_well_formed_message_gives_its_credentials(
    message: bytes, user: str, password: bytes
) -> None:
    credentials = plain_credentials(Secret(message))
    assert credentials is not None
    assert credentials.user == user
    assert credentials.password.reveal() == password


@pytest.mark.parametrize(
    "message",
    [
        b"alice",  # no NULs
        b"\0alice",  # two fields
        b"\0alice\0pw\0more",  # four fields
        b"\0\xff\0pw",  # authcid not UTF-8
        b"bob\0alice\0pw",  # acting as another user: no proxy authorization
    ],
)
def test_a_malformed_message_gives_none(message: bytes) -> None:
    assert plain_credentials(Secret(message)) is None


def test_the_password_is_not_in_the_repr() -> None:
    assert "pw" not in repr(Credentials("alice", Secret(b"pw")))
