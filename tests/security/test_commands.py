"""Hostile command lines: control and 8-bit octets, CR/LF injection and hostile user
names (with what reaches the log), bad message numbers, and commands in the wrong
phase. Each reply is asserted to the byte (RFC 1939 §§3-7, docs/security.md)."""

from __future__ import annotations

import base64

import pytest
from integration.conftest import StartServer
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import PASSWORD, Corpus, ProxyUser
from pop3client import SocketPop3

from .probe import LOCAL_USER, UPSTREAM, Target

INVALID_CHARACTERS = b"-ERR Invalid characters in command"
UNKNOWN = b"-ERR Unknown command"
WRONG_PHASE = b"-ERR Command not valid in this state"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
NO_SUCH_MESSAGE = b"-ERR There's no message with that number."


def test_nul_and_8_bit_octets_in_commands(target: Target) -> None:
    before_login = {
        b"NO\x00OP": INVALID_CHARACTERS,
        b"CAPA\x00": INVALID_CHARACTERS,
        b"\x00": INVALID_CHARACTERS,
        b"USER mallory\x00admin": INVALID_CHARACTERS,
        b"USER mallory\x1b[2J": INVALID_CHARACTERS,
        b"USER mallory\x7f": INVALID_CHARACTERS,
        b"\xff\xfeCAPA": UNKNOWN,
        b"CAP\xc3\x84": UNKNOWN,
        b"\xef\xbb\xbfCAPA": UNKNOWN,  # a UTF-8 byte order mark
        b"USER \xff\xfe": b"-ERR Invalid UTF-8 in argument",
        b"USER m\xe4llory": b"-ERR Invalid UTF-8 in argument",  # Latin-1, not UTF-8
    }
    after_login = {
        b"RETR \xd9\xa1": b"-ERR Invalid number",  # ARABIC-INDIC DIGIT ONE
        b"RETR \xef\xbc\x91": b"-ERR Invalid number",  # FULLWIDTH DIGIT ONE
        b"LIST 1\x00": INVALID_CHARACTERS,
        b"DELE 1\x80": b"-ERR Invalid number",
        b"\x80\x81": UNKNOWN,
    }
    with target.connect() as pop:
        for line, reply in before_login.items():
            assert pop.cmd(line) == reply, line
            assert pop.cmd(b"USER x") == b"+OK"  # a good command between: no budget spent
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        for line, reply in after_login.items():
            assert pop.cmd(line) == reply, line
            assert pop.cmd(b"NOOP") == b"+OK"
        # Valid UTF-8 in a name is a name: unknown here, so the login fails as usual.
        assert pop.cmd(b"STAT").startswith(b"+OK 3 ")
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    target.still_serves()


def test_cr_lf_injection_in_user(target: Target) -> None:
    with target.connect() as pop:
        # A CR inside the line does not end it: the PASS in it is never run.
        injected = b"USER " + LOCAL_USER.encode() + b"\rPASS " + PASSWORD.encode()
        assert pop.cmd(injected) == INVALID_CHARACTERS
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == b"-ERR No username given"
        assert pop.cmd(b"USER " + LOCAL_USER.encode() + b"\r\r") == INVALID_CHARACTERS
        assert pop.cmd(b"USER " + LOCAL_USER.encode() + b"\x85PASS") == (
            b"-ERR Invalid UTF-8 in argument"
        )
        # NEL as UTF-8 (U+0085): a name outside the safe set, which fails as a wrong
        # password does and never reaches a log.
        assert pop.cmd(b"USER mallory\xc2\x85PASS") == b"+OK"
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == AUTH_FAILED
        assert pop.cmd(b"QUIT") == b"+OK Logging out."
    target.still_serves()


# A configured name that logfmt must quote and escape: it holds a quote, an equals
# sign, a backslash and a non-ASCII letter (all in the safe set).
ODD_NAME = 'o"brien=x\\y-ü'
HOSTILE_NAMES = [
    "mallory\u2028ts=0\u00a0level=error\u3000msg=forged",  # LINE SEPARATOR, Unicode spaces
    "\u202emallory",  # RIGHT-TO-LEFT OVERRIDE
    "mall\u200bory",  # ZERO WIDTH SPACE
    "%s%s%s%n",
    "${jndi:ldap://127.0.0.1/x}",
    "../../../etc/passwd",
    "mallory'--",
    LOCAL_USER.upper(),  # names are exact: not the configured user
]


@pytest.fixture
def odd_target(
    start: StartServer, dovecot: DovecotServer, mailbox: DovecotUser, corpus: Corpus
) -> Target:
    odd = ProxyUser(ODD_NAME, PASSWORD, UPSTREAM, mailbox.name, mailbox.password)
    return Target.start(start, dovecot, mailbox, corpus, users=(odd,))


def test_hostile_user_names_fail_alike_and_every_log_line_stays_one_escaped_line(
    odd_target: Target,
) -> None:
    target = odd_target
    with target.connect() as pop:
        for name in HOSTILE_NAMES:
            assert pop.cmd(b"USER " + name.encode()) == b"+OK", name
            assert pop.cmd(b"PASS " + PASSWORD.encode()) == AUTH_FAILED, name
        # A name with ASCII spaces cannot be one USER argument, but can be an authcid.
        for name in [*HOSTILE_NAMES, "mallory level=error msg=forged", f"{LOCAL_USER} "]:
            token = base64.b64encode(f"\0{name}\0{PASSWORD}".encode())
            assert pop.cmd(b"AUTH PLAIN " + token) == AUTH_FAILED, name
        assert pop.cmd(b"QUIT") == b"+OK Logging out."
    with SocketPop3(target.port()) as pop:
        assert pop.login(ODD_NAME, PASSWORD).startswith(b"+OK Logged in")
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    ends = target.server.wait_sessions_ended(2)
    assert [r["user"] for r in ends] == ["-", ODD_NAME]
    lines = target.server.log_text().split("\n")
    for line in lines:
        assert line.startswith("ts="), line
        assert line.isprintable(), line  # controls and separators escaped: one line each
    assert "forged" not in target.server.log_text()
    assert not [r for r in target.server.records() if r.get("level") == "error"]
    target.still_serves()


# (argument, the reply where it is a message number, where it is TOP's line count)
BAD_NUMBERS = [
    (b"0", b"-ERR Invalid message number", None),  # TOP n 0 is valid
    (b"-1", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"4294967297", b"-ERR Number out of range", b"-ERR Number out of range"),  # 2**32 + 1
    (b"18446744073709551617", b"-ERR Invalid number", b"-ERR Invalid number"),  # 2**64 + 1
    (b"junk", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"1a", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"0x1", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"+1", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"1.0", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"1e3", b"-ERR Invalid number", b"-ERR Invalid number"),
    (b"01", b"-ERR Invalid message number", None),  # a line count may be written so
    (b"4", NO_SUCH_MESSAGE, None),  # the mailbox has 3 messages
    (b"2147483647", NO_SUCH_MESSAGE, None),  # the largest number accepted
]


def test_bad_message_numbers_for_every_command_that_takes_one(target: Target) -> None:
    with target.connect() as pop:
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        stat = pop.cmd(b"STAT")
        for raw, as_message, as_lines in BAD_NUMBERS:
            for verb in (b"LIST", b"UIDL", b"RETR", b"DELE"):
                assert pop.cmd(verb + b" " + raw) == as_message, (verb, raw)
                assert pop.cmd(b"NOOP") == b"+OK"
            assert pop.cmd(b"TOP " + raw + b" 0") == as_message, raw
            if as_lines is not None:
                assert pop.cmd(b"TOP 1 " + raw) == as_lines, raw
            assert pop.cmd(b"NOOP") == b"+OK"
        for line in (b"RETR", b"DELE", b"TOP", b"TOP 1", b"RETR 1 2", b"LIST 1 2", b"RETR  1"):
            assert pop.cmd(line).startswith(b"-ERR "), line
            assert pop.cmd(b"NOOP") == b"+OK"
        assert pop.cmd(b"STAT") == stat  # no DELE took effect
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    target.still_serves()  # also checks that nothing was deleted


TRANSACTION_VERBS = [
    b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 0",
    b"UIDL", b"UIDL 1",
]  # fmt: skip
AUTHORIZATION_ONLY = [
    b"USER " + LOCAL_USER.encode(),
    b"PASS " + PASSWORD.encode(),
    b"APOP mallory c4c9334bac560ecc979e58001b3e22fb",
    b"AUTH",
    b"AUTH PLAIN",
    b"STLS",
]


def test_commands_in_the_wrong_phase(target: Target) -> None:
    with target.connect() as pop:
        for line in TRANSACTION_VERBS:  # before USER
            assert pop.cmd(line) == WRONG_PHASE, line
            assert pop.cmd(b"USER x") == b"+OK"  # a good command between: no budget spent
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == AUTH_FAILED  # x is nobody
        assert pop.cmd(b"PASS " + PASSWORD.encode()) == b"-ERR No username given"
        assert pop.cmd(b"USER " + LOCAL_USER.encode()) == b"+OK"
        for line in TRANSACTION_VERBS:  # after USER
            assert pop.cmd(line) == WRONG_PHASE, line
            assert pop.cmd(b"CAPA").startswith(b"+OK")
            assert pop.body()
        # Inside an AUTH exchange every line is a SASL response (RFC 5034 §4).
        assert pop.cmd(b"AUTH PLAIN") == b"+ "
        assert pop.cmd(b"RETR 1") == b"-ERR Invalid base64 data"
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        for line in AUTHORIZATION_ONLY:  # in TRANSACTION
            assert pop.cmd(line) == WRONG_PHASE, line
            assert pop.cmd(b"NOOP") == b"+OK"
        assert pop.cmd(b"STAT").startswith(b"+OK 3 ")
        assert pop.cmd(b"QUIT").startswith(b"+OK")
        assert pop.rest_until_closed() == b""  # nothing after QUIT
    target.still_serves()


def test_too_many_bad_commands_close_the_session(target: Target) -> None:
    with target.connect() as pop:
        for _ in range(9):  # limits.max_bad_commands, 10 by default
            assert pop.cmd(b"STAT") == WRONG_PHASE
        assert pop.cmd(b"STAT") == b"-ERR Too many bad commands, closing"
        assert pop.rest_until_closed() == b""
    target.still_serves()
