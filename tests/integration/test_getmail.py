"""getmail6 against the running server: it retrieves every message, byte-exact.

getmail6 6.18 speaks POP3 in clear (SimplePOP3Retriever: the plain listener, with
allow_plaintext_auth) or over implicit TLS (SimplePOP3SSLRetriever, verifying the server
against the test CA with `ca_certs`); it has no STLS for POP3.

Delivery: getmail refuses Maildir and mbox delivery as root (CI runs as root), so it
delivers to an external MDA (`allow_root_commands`) that writes each message to a file.
`delivered_to = false` and `received = false` stop it adding those header fields; it always
puts a `Return-Path: <unknown>` line first (there is no Return-Path in the corpus), which
is checked and skipped. It re-generates the header through Python's email package, an
identity for the corpus's short ASCII header fields, and writes LF line ends, so a delivered
file is compared by the sha256 of its CRLF form, like the source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .harness import (
    LOOPBACK,
    PASSWORD,
    USER,
    Corpus,
    ServerProcess,
    TlsFiles,
    crlf_digest_of_file,
    describe,
    maildir_keys,
    run_client,
)

# getmail's first delivered line for a message without Return-Path.
RETURN_PATH_LINE = b"Return-Path: <unknown>\n"

TRANSPORTS = {
    "plain": ("none", "SimplePOP3Retriever", ""),
    "implicit-tls": ("implicit", "SimplePOP3SSLRetriever", "ca_certs = {ca}\n"),
}


def getmailrc(
    server: ServerProcess,
    transport: str,
    tls: TlsFiles,
    out: Path,
    *,
    read_all: bool,
    username: str = USER,
    password: str = PASSWORD,
) -> str:
    """A getmailrc for `username` on the given transport, one file per message to out/."""
    kind, retriever, extra = TRANSPORTS[transport]
    return (
        "[retriever]\n"
        f"type = {retriever}\n"
        f"server = {LOOPBACK}\n"
        f"port = {server.port(kind)}\n"
        f"username = {username}\n"
        f"password = {password}\n"
        "timeout = 60\n" + extra.format(ca=tls.ca_cert) + "\n[destination]\n"
        "type = MDA_external\n"
        "path = /bin/sh\n"
        # $$ is the shell getmail starts for each message.
        f'arguments = ("-c", "cat > {out}/msg.$$")\n'
        "allow_root_commands = true\n"
        "\n[options]\n"
        f"read_all = {str(read_all).lower()}\n"
        "delete = false\n"
        "delivered_to = false\n"
        "received = false\n"
        "verbose = 1\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_getmail_retrieves_every_message_byte_exact_and_then_nothing_new(  # noqa: PLR0917 (pytest passes fixtures positionally)
    server: ServerProcess,
    corpus: Corpus,
    maildir: Path,
    tls_files: TlsFiles,
    tmp_path: Path,
    transport: str,
) -> None:
    getmail = shutil.which("getmail")
    assert getmail is not None, "getmail6 is not installed (scripts/test installs it)"
    state = tmp_path / "getmaildir"
    out = tmp_path / "delivered"
    state.mkdir()
    out.mkdir()
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    keys_before = maildir_keys(maildir)

    rc_all = tmp_path / "getmailrc-all"
    rc_all.write_text(getmailrc(server, transport, tls_files, out, read_all=True))
    first = run_client(
        [getmail, f"--rcfile={rc_all}", f"--getmaildir={state}"], env=env, cwd=tmp_path
    )
    assert first.returncode == 0, describe(first)
    server.wait_sessions_ended(1)

    by_digest = {(m.size, m.sha256): m for m in corpus.messages}
    files = sorted(out.iterdir())
    assert len(files) == len(corpus.messages), describe(first)
    seen = set()
    for path in files:
        digest = crlf_digest_of_file(path, skip_prefix=RETURN_PATH_LINE)
        message = by_digest.get(digest)
        assert message is not None, f"{path.name}: {path.stat().st_size} octets match nothing"
        seen.add(message.key)
    assert seen == {m.key for m in corpus.messages}

    # Only new messages now: getmail's record of seen UIDLs says there are none.
    rc_new = tmp_path / "getmailrc-new"
    rc_new.write_text(getmailrc(server, transport, tls_files, out, read_all=False))
    second = run_client(
        [getmail, f"--rcfile={rc_new}", f"--getmaildir={state}"], env=env, cwd=tmp_path
    )
    assert second.returncode == 0, describe(second)
    server.wait_sessions_ended(2)
    assert len(list(out.iterdir())) == len(corpus.messages), describe(second)
    assert maildir_keys(maildir) == keys_before, "delete = false must not delete anything"
    shutil.rmtree(out)  # 50 MB that pytest would keep for the last three runs
