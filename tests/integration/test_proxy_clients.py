"""Real clients through popproxy in proxy mode get exactly what they get from Dovecot
directly (issue 3, "What it must show"): curl, fetchmail and getmail6.

popproxy runs in front of the session's Dovecot (tests/integration/dovecot.py), one local
user per Dovecot account (`start_proxy` in test_proxy.py). The clients' own quirks are
handled as in the tests of popproxy's Maildir mode, whose helpers are reused:
test_curl.py (what curl prints), test_fetchmail.py (fetchmail's long-line defect, "poll
localhost" for its certificate check) and test_getmail.py (no STLS in getmail6, its
Return-Path line, an external MDA as root).

Each client transport is paired with a different upstream leg, so that every leg (plain,
STLS, implicit TLS) is crossed by real clients and every client side by each client that
has it. What "directly" means per client:
- curl runs against Dovecot itself on the listener of the same kind, in the same test, and
  each output is compared byte for byte with the proxied one.
- fetchmail and getmail6 deliver what they retrieved to files, which are compared by digest
  with the messages Dovecot serves (the corpus copied into the account's Maildir).
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser, expected_digests
from .harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    ServerProcess,
    TlsFiles,
    crlf_digest_of_file,
    describe,
    file_digest,
    run_client,
)
from .test_curl import listing
from .test_fetchmail import FETCHMAIL_MAIL_RETRIEVED, FETCHMAIL_NO_MAIL, Fetchmail, match_delivered
from .test_fetchmail import TRANSPORTS as FETCHMAIL_TRANSPORTS
from .test_getmail import RETURN_PATH_LINE, getmailrc
from .test_proxy import local_name, start_proxy

# -- curl ------------------------------------------------------------------------------------

# Client transport -> (listener kind at popproxy and at Dovecot, URL scheme, curl options).
# `--ssl-reqd` makes curl use STLS and refuse to go on without it.
CURL_TRANSPORTS = {
    "plain": ("none", "pop3", ()),
    "stls": ("starttls", "pop3", ("--ssl-reqd",)),
    "implicit-tls": ("implicit", "pop3s", ()),
}
# (client transport, upstream leg): each transport over a different leg.
CURL_CASES = [("plain", "implicit"), ("stls", "starttls"), ("implicit-tls", "none")]
# Body lines asked for with TOP besides 0 (RFC 1939 §7).
TOP_BODY_LINES = 3


def _case_id(transport: str, leg: str) -> str:
    return f"client-{transport}-leg-{leg}"


curl_cases = pytest.mark.parametrize(
    ("transport", "leg"), [pytest.param(t, leg, id=_case_id(t, leg)) for t, leg in CURL_CASES]
)


@dataclass(frozen=True, slots=True)
class CurlTarget:
    """Where curl connects, as whom, and which CA it trusts."""

    host: str
    port: int
    transport: str
    user: str
    password: str
    ca_file: Path

    @classmethod
    def dovecot(cls, dovecot: DovecotServer, user: DovecotUser, transport: str) -> CurlTarget:
        """Dovecot itself, on its listener of the transport's kind."""
        kind = CURL_TRANSPORTS[transport][0]
        host, port = dovecot.endpoint(kind)
        return cls(host, port, transport, user.name, user.password, dovecot.ca_file)

    @classmethod
    def proxy(
        cls, server: ServerProcess, user: DovecotUser, transport: str, tls: TlsFiles
    ) -> CurlTarget:
        """popproxy's listener of the transport's kind, as the local user routed to `user`."""
        kind = CURL_TRANSPORTS[transport][0]
        return cls(LOOPBACK, server.port(kind), transport, local_name(user), PASSWORD, tls.ca_cert)

    def run(
        self, path: str = "", *, extra: Sequence[str] = (), output: Path | None = None
    ) -> bytes:
        """curl on pop3[s]://HOST:PORT/PATH; what it printed (AssertionError if it failed)."""
        _, scheme, options = CURL_TRANSPORTS[self.transport]
        argv = [
            *("curl", "--silent", "--show-error", "--max-time", "60"),
            *("--cacert", str(self.ca_file)),
            *("--user", f"{self.user}:{self.password}"),
            *options,
            *extra,
            f"{scheme}://{self.host}:{self.port}/{path}",
        ]
        if output is not None:
            argv += ["--output", str(output)]
        result = run_client(argv)
        assert result.returncode == 0, describe(result)
        return result.stdout


@curl_cases
def test_curl_list_uidl_and_top_through_the_proxy_equal_dovecots(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    transport: str,
    leg: str,
) -> None:
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    there = CurlTarget.dovecot(dovecot, dovecot_user, transport)
    here = CurlTarget.proxy(server, dovecot_user, transport, tls_files)

    listed = here.run()
    assert listed == there.run()
    count = len(corpus.messages)
    assert [n for n, _ in listing(listed)] == list(range(1, count + 1))

    uidl = here.run(extra=["--request", "UIDL"])
    assert uidl == there.run(extra=["--request", "UIDL"])
    # Dovecot's UIDL is the Maildir unique name (dovecot.py); the proxy passes it on.
    assert {value.decode() for _, value in listing(uidl)} == {m.key for m in corpus.messages}

    heads = set()
    for n in range(1, count + 1):
        for body_lines in (0, TOP_BODY_LINES):
            request = ["--request", f"TOP {n} {body_lines}"]
            top = here.run(extra=request)
            assert top == there.run(extra=request), f"TOP {n} {body_lines}"
            if body_lines == 0:
                heads.add(top)
    assert heads == {m.top(0) for m in corpus.messages}


@pytest.mark.slow
@curl_cases
def test_curl_retr_of_every_message_through_the_proxy_equals_dovecots(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
    transport: str,
    leg: str,
) -> None:
    """Every message, the dot lines, 8-bit bodies, long lines and 50 MB included."""
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    there = CurlTarget.dovecot(dovecot, dovecot_user, transport)
    here = CurlTarget.proxy(server, dovecot_user, transport, tls_files)
    received = []
    for n in range(1, len(corpus.messages) + 1):
        direct, proxied = tmp_path / f"direct-{n}", tmp_path / f"proxied-{n}"
        there.run(str(n), output=direct)
        here.run(str(n), output=proxied)
        assert filecmp.cmp(direct, proxied, shallow=False), (
            f"RETR {n}: {proxied.stat().st_size} octets through the proxy,"
            f" {direct.stat().st_size} from Dovecot"
        )
        # curl writes the message un-stuffed with its CRLF line ends: the CRLF form itself.
        received.append(file_digest(proxied))
        direct.unlink()
        proxied.unlink()
    assert sorted(received) == sorted(expected_digests(corpus.messages).values())


# -- fetchmail -------------------------------------------------------------------------------

# (client transport of test_fetchmail.TRANSPORTS, upstream leg)
FETCHMAIL_KEEP_CASES = [("stls", "none"), ("implicit-tls", "implicit")]
FETCHMAIL_DELETE_CASE = ("stls", "starttls")


def proxied_fetchmail(
    directory: Path,
    server: ServerProcess,
    user: DovecotUser,
    transport: str,
    tls: TlsFiles,
    *,
    keep: bool,
) -> Fetchmail:
    """fetchmail polling popproxy as the local user routed to `user`."""
    kind, tls_options = FETCHMAIL_TRANSPORTS[transport]
    return Fetchmail.setup(
        directory,
        server.port(kind),
        local_name(user),
        PASSWORD,
        tls_options.format(ca=tls.ca_cert),
        keep=keep,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transport", "leg"),
    [pytest.param(t, leg, id=_case_id(t, leg)) for t, leg in FETCHMAIL_KEEP_CASES],
)
def test_fetchmail_keep_uidl_through_the_proxy_fetches_everything_once_then_nothing(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
    transport: str,
    leg: str,
) -> None:
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    keys_before = dovecot_user.keys()
    fetchmail = proxied_fetchmail(tmp_path, server, dovecot_user, transport, tls_files, keep=True)

    first = fetchmail.run()
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(dovecot_user, 1)
    files = fetchmail.delivered()
    assert len(files) == len(corpus.messages), describe(first)
    assert set(match_delivered(files, corpus.messages)) == keys_before
    # fetchmail remembered each message by the UIDL Dovecot gave it, relayed by the proxy.
    ids = fetchmail.idfile.read_text().splitlines()
    assert {line.split()[-1] for line in ids} == keys_before, ids

    second = fetchmail.run()
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)
    server.wait_sessions_ended(2)
    dovecot.wait_sessions_ended(dovecot_user, 2)
    assert len(fetchmail.delivered()) == len(corpus.messages), "the second run fetched again"
    assert dovecot_user.keys() == keys_before, "keep mode must not delete anything"
    shutil.rmtree(fetchmail.out)  # 50 MB that pytest would keep for the last three runs


@pytest.mark.slow
def test_fetchmail_delete_mode_through_the_proxy_empties_the_dovecot_mailbox(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    corpus: Corpus,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    transport, leg = FETCHMAIL_DELETE_CASE
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    keys_before = dovecot_user.keys()
    fetchmail = proxied_fetchmail(tmp_path, server, dovecot_user, transport, tls_files, keep=False)

    first = fetchmail.run()
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(dovecot_user, 1)
    files = fetchmail.delivered()
    assert len(files) == len(corpus.messages), describe(first)
    assert set(match_delivered(files, corpus.messages)) == keys_before
    assert dovecot_user.count() == 0, f"left in Dovecot: {sorted(dovecot_user.keys())}"

    second = fetchmail.run()
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)
    server.wait_sessions_ended(2)
    dovecot.wait_sessions_ended(dovecot_user, 2)
    assert len(fetchmail.delivered()) == len(corpus.messages)
    shutil.rmtree(fetchmail.out)


# -- getmail6 --------------------------------------------------------------------------------

# (client transport of test_getmail.TRANSPORTS, upstream leg)
GETMAIL_CASES = [("plain", "starttls"), ("implicit-tls", "none")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transport", "leg"), [pytest.param(t, leg, id=_case_id(t, leg)) for t, leg in GETMAIL_CASES]
)
def test_getmail_through_the_proxy_retrieves_what_dovecot_holds_then_nothing_new(  # noqa: PLR0917 (pytest passes fixtures positionally)
    start: StartServer,
    dovecot: DovecotServer,
    dovecot_user: DovecotUser,
    tls_files: TlsFiles,
    tmp_path: Path,
    transport: str,
    leg: str,
) -> None:
    getmail = shutil.which("getmail")
    assert getmail is not None, "getmail6 is not installed (scripts/test installs it)"
    server = start_proxy(start, dovecot, [dovecot_user], leg=leg)
    held = dovecot_user.digests()  # what Dovecot serves: the CRLF form of each file
    state, out = tmp_path / "getmaildir", tmp_path / "delivered"
    state.mkdir()
    out.mkdir()
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    def run(read_all: bool) -> str:
        rc = tmp_path / f"getmailrc-{'all' if read_all else 'new'}"
        rc.write_text(
            getmailrc(
                server,
                transport,
                tls_files,
                out,
                read_all=read_all,
                username=local_name(dovecot_user),
                password=PASSWORD,
            )
        )
        result = run_client(
            [getmail, f"--rcfile={rc}", f"--getmaildir={state}"], env=env, cwd=tmp_path
        )
        assert result.returncode == 0, describe(result)
        return result.stdout.decode("utf-8", "replace")

    first = run(read_all=True)
    assert re.search(rf"\b{len(held)} messages \(\d+ bytes\) retrieved, 0 skipped", first), first
    server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(dovecot_user, 1)
    files = sorted(out.iterdir())
    assert len(files) == len(held)
    delivered = sorted(crlf_digest_of_file(f, skip_prefix=RETURN_PATH_LINE) for f in files)
    assert delivered == sorted(held.values())
    # getmail recorded each message by the UIDL Dovecot gave it, relayed by the proxy
    # (its oldmail file: one "UIDL NUL time" line per message).
    (oldmail,) = state.glob("oldmail-*")
    assert {line.split("\0")[0] for line in oldmail.read_text().splitlines()} == set(held)

    # Only new messages now: getmail's record of the UIDLs it has seen says there are none.
    second = run(read_all=False)
    assert re.search(rf"\b0 messages \(0 bytes\) retrieved, {len(held)} skipped", second), second
    server.wait_sessions_ended(2)
    dovecot.wait_sessions_ended(dovecot_user, 2)
    assert len(list(out.iterdir())) == len(held), "the second run retrieved again"
    assert dovecot_user.keys() == set(held), "delete = false must not delete anything"
    shutil.rmtree(out)
