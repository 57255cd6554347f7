"""AUTH LOGIN (issue 18 item 4): the same rules as AUTH PLAIN against a running popproxy.

Offered where PLAIN is (CAPA's SASL line, a bare AUTH), never before TLS unless plaintext
logins are allowed; wrong guesses through it are slowed down and locked out as any
other, with the one reply every failure gets; its lines have the SASL bounds and a
``*`` cancels it. Once logged in, CAPA lists only what TRANSACTION allows: no USER,
SASL or STLS (as Dovecot, whose CAPA after login the test reads too).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import PASSWORD, USER, ServerProcess, TlsFiles, User
from maildirs import make_maildir
from pop3client import SocketPop3

from .login_client import login
from .probe import LOCAL_USER, Target
from .test_bruteforce import (
    AUTH_FAILED,
    FAILURE_DELAY,
    LOCKOUT_FAILURES,
    PENALTY_INITIAL,
    PENALTY_MAX,
    start_throttled,
)
from .test_bruteforce import PASSWORD as THROTTLED_PASSWORD

NAME_PROMPT = b"+ VXNlcm5hbWU6"  # base64 of "Username:"
PASSWORD_PROMPT = b"+ UGFzc3dvcmQ6"  # base64 of "Password:"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw) or b"="


def capa_names(pop: SocketPop3) -> dict[str, str]:
    """CAPA's lines by their first word."""
    assert pop.cmd(b"CAPA").startswith(b"+OK")
    return {line.split(b" ")[0].decode(): line.decode() for line in pop.body()}


def test_auth_login_is_offered_where_plain_is_and_logs_in(target: Target) -> None:
    with target.connect() as pop:
        assert capa_names(pop)["SASL"] == "SASL PLAIN LOGIN"
        assert pop.cmd(b"AUTH").startswith(b"+OK")
        assert pop.body() == [b"PLAIN", b"LOGIN"]
        assert pop.cmd(b"AUTH LOGIN") == NAME_PROMPT
        assert pop.cmd(b64(LOCAL_USER.encode())) == PASSWORD_PROMPT
        assert pop.cmd(b64(PASSWORD.encode())).startswith(b"+OK Logged in")
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    target.still_serves()


def test_capa_after_login_lists_only_what_transaction_allows_as_dovecot(
    target: Target, dovecot: DovecotServer, mailbox: DovecotUser, tls_files: TlsFiles
) -> None:
    with target.connect("starttls") as pop:
        before = capa_names(pop)
        assert {"STLS", "USER", "SASL"} <= set(before)
        assert pop.login(LOCAL_USER, PASSWORD).startswith(b"+OK Logged in")
        after = capa_names(pop)
        assert pop.cmd(b"QUIT").startswith(b"+OK")
    host, port = dovecot.endpoint("starttls")
    with SocketPop3(port, host=host) as direct:
        assert direct.cmd(b"STLS").startswith(b"+OK")
        direct.start_tls(dovecot.ssl_context())
        assert direct.login(mailbox.name, mailbox.password).startswith(b"+OK")
        dovecot_after = capa_names(direct)
        assert direct.cmd(b"QUIT").startswith(b"+OK")
    for name in ("USER", "SASL", "STLS"):
        assert name not in after, after
        assert name not in dovecot_after, dovecot_after
    # What popproxy adds of its own: its retention (EXPIRE) and its name.
    assert set(after) - {"EXPIRE", "IMPLEMENTATION"} <= set(dovecot_after)


def test_auth_login_is_refused_before_tls_unless_allowed(
    start: Callable[..., ServerProcess], tmp_path: Path, tls_files: TlsFiles
) -> None:
    maildir = make_maildir(tmp_path / "Maildir", {"1700000001.M1P1.al": b"Subject: a\n\nb\n"})
    server = start(users=[User(USER, PASSWORD, maildir)], allow_plaintext_auth=False)
    with SocketPop3(server.port("starttls")) as pop:
        assert "SASL" not in capa_names(pop)
        assert pop.cmd(b"AUTH LOGIN").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
        assert pop.cmd(b"STLS").startswith(b"+OK")
        pop.start_tls(tls_files.client_context())
        assert capa_names(pop)["SASL"] == "SASL PLAIN LOGIN"
        assert pop.cmd(b"AUTH LOGIN " + b64(USER.encode())) == PASSWORD_PROMPT
        assert pop.cmd(b64(PASSWORD.encode())).startswith(b"+OK Logged in")


def test_auth_login_guesses_are_slowed_down_then_locked_out(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    port = start_throttled(start, tmp_path)
    guesses = [login(port, USER, f"guess-{n}", sasl_login=True) for n in range(LOCKOUT_FAILURES)]
    assert {g.reply for g in guesses} == {AUTH_FAILED}
    for n, guess in enumerate(guesses):
        penalty = 0.0 if n == 0 else min(PENALTY_INITIAL * 2 ** (n - 1), PENALTY_MAX)
        assert guess.seconds >= penalty + FAILURE_DELAY, (n, guess.seconds)
    # The name is locked: the right password, by AUTH LOGIN or USER/PASS, fails alike.
    assert login(port, USER, THROTTLED_PASSWORD, sasl_login=True).reply == AUTH_FAILED
    assert login(port, USER, THROTTLED_PASSWORD).reply == AUTH_FAILED


def test_auth_login_lines_are_bounded_and_a_star_cancels(target: Target) -> None:
    with target.connect() as pop:
        assert pop.cmd(b"AUTH LOGIN") == NAME_PROMPT
        assert pop.cmd(b"*") == b"-ERR Authentication cancelled."
        assert pop.cmd(b"AUTH LOGIN " + b64(LOCAL_USER.encode())) == PASSWORD_PROMPT
        assert pop.cmd(b"*") == b"-ERR Authentication cancelled."
        assert pop.cmd(b"AUTH LOGIN") == NAME_PROMPT
        assert pop.cmd(b64(LOCAL_USER.encode())) == PASSWORD_PROMPT
        # A password line over limits.max_sasl_line_bytes (8192) ends the exchange.
        assert pop.cmd(b"A" * 9000) == b"-ERR Line too long"
        assert pop.cmd(b"AUTH LOGIN") == NAME_PROMPT
        assert pop.cmd(b"not base64!") == b"-ERR Invalid base64 data"
        assert pop.cmd(b"AUTH LOGIN") == NAME_PROMPT
        assert pop.cmd(b64(b"\xffnot-utf-8")) == PASSWORD_PROMPT
        assert pop.cmd(b64(PASSWORD.encode())) == AUTH_FAILED
        assert pop.cmd(b"STAT") == b"-ERR Command not valid in this state"
    target.still_serves()
