"""fetchmail in keep mode with UIDL against the running server.

The first run fetches every message (exit 0), the second finds nothing new (exit 1:
"no mail"), and the server's Maildir is untouched (keep). fetchmail delivers each message
to an MDA that writes it to a file.

Delivery verbatim: `--invisible` stops fetchmail adding its Received header, `no rewrite`
stops it rewriting addresses in the header; with an MDA it strips CRs (LF line ends, as in a
Maildir), so a delivered file is compared by the sha256 of its CRLF form, like the source.

One known fetchmail defect is undone before comparing: fetchmail 6.4.37 reads a line in
pieces of at most 8191 octets (its 8 KiB buffer less the string's NUL, transact.c
`readbody`) and delivers each piece of a longer line followed by three octets: the NUL, one
octet of the buffer that was never written (stale stack content: ETX in keep mode, other
values such as "P", "0" or "p" in delete mode), and LF. It does the same against Dovecot
2.3.19 serving the same Maildir. Only the corpus message with >10,000-character lines is
affected; the tests check that it is the only one and that each break comes after exactly
8191 octets of the line as sent (a stuffed dot included), then remove those octets.

`Fetchmail` and `match_delivered` are also used by the proxy-mode tests
(test_proxy_clients.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import (
    PASSWORD,
    USER,
    Corpus,
    CorpusMessage,
    CrlfDigest,
    ServerProcess,
    TlsFiles,
    describe,
    maildir_keys,
    run_client,
)

# What fetchmail inserts where it splits a line longer than its buffer: NUL, a stale octet,
# LF (see the docstring), and the octets of a line it reads at a time.
FETCHMAIL_LINE_BREAK = re.compile(rb"\x00[\x00-\xff]\n")
FETCHMAIL_READ_OCTETS = 8191
# fetchmail's exit codes (fetchmail(1), EXIT CODES).
FETCHMAIL_MAIL_RETRIEVED = 0
FETCHMAIL_NO_MAIL = 1

# fetchmail checks the certificate's DNS names, not IP addresses: poll "localhost", which
# the test certificate names and which resolves to the loopback address the server uses.
TRANSPORTS = {
    # STLS, required and verified (fetchmail 6.4: sslproto with a TLS version forces it).
    "stls": ("starttls", 'sslproto "TLS1.2+" sslcertck sslcertfile "{ca}"'),
    "implicit-tls": ("implicit", 'ssl sslcertck sslcertfile "{ca}"'),
}


def undo_line_breaks(data: bytes) -> bytes:
    """A delivered message without fetchmail's line breaks (see the docstring).

    AssertionError if a break is not where fetchmail makes them: after 8191 octets of the
    line as sent, that is after 8190 delivered octets when the line was dot-stuffed.
    (Only the first break of a line is checked so; the corpus has no longer lines.)
    """
    kept = bytearray()
    pos = 0
    for brk in FETCHMAIL_LINE_BREAK.finditer(data):
        piece = data[data.rfind(b"\n", 0, brk.start()) + 1 : brk.start()]
        sent = len(piece) + piece.startswith(b".")
        assert sent == FETCHMAIL_READ_OCTETS, f"a break after {sent} octets at {brk.start()}"
        kept += data[pos : brk.start()]
        pos = brk.end()
    return bytes(kept + data[pos:])


def delivered_digest(data: bytes) -> tuple[int, str]:
    """(size, sha256) of the CRLF form of a delivered message, fetchmail's line breaks undone."""
    digest = CrlfDigest()
    digest.update(undo_line_breaks(data))
    return digest.finish()


@dataclass(frozen=True, slots=True)
class Fetchmail:
    """fetchmail polling one account, delivering each message to a file in `out`.

    Its rc file, id file (the UIDLs it has seen) and pid file live in `home`.
    """

    home: Path
    out: Path

    @classmethod
    def setup(
        cls,
        directory: Path,
        port: int,
        user: str,
        password: str,
        tls_options: str,
        *,
        keep: bool = True,
    ) -> Fetchmail:
        """Write an rc file polling `localhost:port` as `user` (see TRANSPORTS).

        `keep`: leave the messages on the server (with `uidl`, fetch only new ones);
        otherwise `fetchall` and DELE each message once delivered (fetchmail's default).
        """
        home = directory / "home"
        out = directory / "delivered"
        home.mkdir()
        out.mkdir()
        rcfile = home / "fetchmailrc"
        rcfile.write_text(
            f"poll localhost protocol POP3 service {port} uidl\n"
            f'  user "{user}" there with password "{password}"\n'
            + ("  keep\n" if keep else "  fetchall\n")
            + f"  {tls_options}\n"
            # One file per message; $$ is the shell fetchmail starts for each delivery.
            f'  mda "cat > {out}/msg.$$"\n'
            f"  no rewrite\n"
        )
        rcfile.chmod(0o600)  # fetchmail refuses an rc file others can read
        return cls(home, out)

    @property
    def idfile(self) -> Path:
        """Where fetchmail keeps the UIDLs it has seen (one line per message)."""
        return self.home / "fetchids"

    def run(self) -> subprocess.CompletedProcess[bytes]:
        """One poll (`--nodetach`, no syslog, no Received header); its exit and output."""
        argv = [
            "fetchmail",
            "--fetchmailrc",
            str(self.home / "fetchmailrc"),
            "--idfile",
            str(self.idfile),
            "--pidfile",
            str(self.home / "fetchmail.pid"),
            "--nodetach",
            "--nosyslog",
            "--invisible",
        ]
        env = {
            "HOME": str(self.home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
        }
        return run_client(argv, env=env)

    def delivered(self) -> list[Path]:
        """The files delivered so far."""
        return sorted(self.out.iterdir())


def match_delivered(
    files: Sequence[Path], messages: Sequence[CorpusMessage]
) -> dict[str, CorpusMessage]:
    """The message each delivered file is, by key; AssertionError if one matches none.

    Compared by the digest of its CRLF form with fetchmail's line breaks undone; those
    are allowed only in the corpus message with lines longer than fetchmail's buffer.
    """
    by_digest = {(m.size, m.sha256): m for m in messages}
    got: dict[str, CorpusMessage] = {}
    for path in files:
        data = path.read_bytes()
        message = by_digest.get(delivered_digest(data))
        assert message is not None, f"{path.name}: {len(data)} octets match no message"
        assert message.key not in got, f"{message.kind} delivered twice"
        got[message.key] = message
        if FETCHMAIL_LINE_BREAK.search(data):
            assert message.kind == "long-line", f"fetchmail broke lines in {message.kind}"
        del data
    return got


@pytest.mark.slow
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_fetchmail_keep_uidl_fetches_everything_once_then_nothing(  # noqa: PLR0917 (pytest passes fixtures positionally)
    server: ServerProcess,
    corpus: Corpus,
    maildir: Path,
    tls_files: TlsFiles,
    tmp_path: Path,
    transport: str,
) -> None:
    kind, tls_options = TRANSPORTS[transport]
    fetchmail = Fetchmail.setup(
        tmp_path, server.port(kind), USER, PASSWORD, tls_options.format(ca=tls_files.ca_cert)
    )
    keys_before = maildir_keys(maildir)

    first = fetchmail.run()
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    server.wait_sessions_ended(1)
    files = fetchmail.delivered()
    assert len(files) == len(corpus.messages), describe(first)
    got = match_delivered(files, corpus.messages)
    assert set(got) == {m.key for m in corpus.messages}
    # fetchmail remembered one UIDL per message.
    ids = fetchmail.idfile.read_text().splitlines()
    assert len(ids) == len(corpus.messages), ids

    second = fetchmail.run()
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)
    server.wait_sessions_ended(2)
    assert len(fetchmail.delivered()) == len(corpus.messages), "the second run fetched again"
    assert maildir_keys(maildir) == keys_before, "keep mode must not delete anything"
    shutil.rmtree(fetchmail.out)  # 50 MB that pytest would keep for the last three runs
