"""fetchmail in keep mode with UIDL against the running server.

The first run fetches every message (exit 0), the second finds nothing new (exit 1:
"no mail"), and the server's Maildir is untouched (keep). fetchmail delivers each message
to an MDA that writes it to a file.

Delivery verbatim: `--invisible` stops fetchmail adding its Received header, `no rewrite`
stops it rewriting addresses in the header; with an MDA it strips CRs (LF line ends, as in a
Maildir), so a delivered file is compared by the sha256 of its CRLF form, like the source.

One known fetchmail defect is undone before comparing: fetchmail 6.4.37 breaks lines longer
than its 8 KiB read buffer by inserting the three octets NUL, ETX, LF (seen the same against
Dovecot 2.3.19 serving the same Maildir). Only the corpus message with >10,000-character
lines is affected; the test checks that it is the only one, then removes those octets.
"""

from __future__ import annotations

import os
import shutil
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

# What fetchmail inserts where it splits a line longer than its buffer (see the docstring).
FETCHMAIL_LINE_BREAK = b"\x00\x03\n"
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


def delivered_digest(data: bytes) -> tuple[int, str]:
    """(size, sha256) of the CRLF form of a delivered message, fetchmail's line breaks undone."""
    digest = CrlfDigest()
    digest.update(data.replace(FETCHMAIL_LINE_BREAK, b""))
    return digest.finish()


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
    home = tmp_path / "home"
    out = tmp_path / "delivered"
    home.mkdir()
    out.mkdir()
    rcfile = home / "fetchmailrc"
    rcfile.write_text(
        f"poll localhost protocol POP3 service {server.port(kind)} uidl\n"
        f'  user "{USER}" there with password "{PASSWORD}"\n'
        f"  keep\n"
        f"  {tls_options.format(ca=tls_files.ca_cert)}\n"
        # One file per message; $$ is the shell fetchmail starts for each delivery.
        f'  mda "cat > {out}/msg.$$"\n'
        f"  no rewrite\n"
    )
    rcfile.chmod(0o600)  # fetchmail refuses an rc file others can read
    argv = [
        "fetchmail",
        "--fetchmailrc",
        str(rcfile),
        "--idfile",
        str(home / "fetchids"),
        "--pidfile",
        str(home / "fetchmail.pid"),
        "--nodetach",
        "--nosyslog",
        "--invisible",
    ]
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    keys_before = maildir_keys(maildir)

    first = run_client(argv, env=env)
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    server.wait_sessions_ended(1)
    files = sorted(out.iterdir())
    assert len(files) == len(corpus.messages), describe(first)
    by_digest = {(m.size, m.sha256): m for m in corpus.messages}
    got: dict[str, CorpusMessage] = {}
    for path in files:
        data = path.read_bytes()
        message = by_digest.get(delivered_digest(data))
        assert message is not None, f"{path.name}: {len(data)} octets match no message"
        got[message.key] = message
        if FETCHMAIL_LINE_BREAK in data:
            assert message.kind == "long-line", f"fetchmail broke lines in {message.kind}"
        del data
    assert set(got) == {m.key for m in corpus.messages}
    # fetchmail remembered one UIDL per message.
    ids = (home / "fetchids").read_text().splitlines()
    assert len(ids) == len(corpus.messages), ids

    second = run_client(argv, env=env)
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)
    server.wait_sessions_ended(2)
    assert len(list(out.iterdir())) == len(corpus.messages), "the second run fetched again"
    assert maildir_keys(maildir) == keys_before, "keep mode must not delete anything"
    shutil.rmtree(out)  # 50 MB that pytest would keep for the last three runs
