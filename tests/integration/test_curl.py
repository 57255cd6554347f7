"""curl against the running server: LIST, RETR, and UIDL/TOP through -X.

Over STLS (`pop3://` with `--ssl-reqd`, so curl refuses to go on without TLS) and over
implicit TLS (`pop3s://`), trusting only the test CA (`--cacert`).

What curl prints: for a listing (`pop3://host/`, `-X UIDL`, `-X 'TOP n m'`) the lines of the
multi-line reply without the status line and the final "."; for RETR (`pop3://host/N`) the
message un-stuffed, CRLF line ends kept, including the CRLF before the terminating "."
(RFC 1939 §3 counts it as part of the message). So RETR output is compared with the CRLF
form of the Maildir file as is.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from .harness import (
    LOOPBACK,
    PASSWORD,
    USER,
    Corpus,
    ServerProcess,
    StreamingPop3,
    TlsFiles,
    crlf_digest_of_file,
    describe,
    run_client,
)

# (listener kind, URL scheme, extra curl options)
TRANSPORTS = {
    "stls": ("starttls", "pop3", ["--ssl-reqd"]),
    "implicit-tls": ("implicit", "pop3s", []),
}


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Each TLS transport in turn."""
    return str(request.param)


def curl(
    server: ServerProcess,
    tls: TlsFiles,
    transport: str,
    path: str = "",
    *,
    extra: Sequence[str] = (),
    output: Path | None = None,
) -> bytes:
    """Run curl on pop3[s]://USER:PASSWORD@127.0.0.1:PORT/PATH; return what it printed."""
    kind, scheme, options = TRANSPORTS[transport]
    url = f"{scheme}://{USER}:{PASSWORD}@{LOOPBACK}:{server.port(kind)}/{path}"
    argv = [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "60",
        "--cacert",
        str(tls.ca_cert),
        *options,
        *extra,
        url,
    ]
    if output is not None:
        argv += ["--output", str(output)]
    result = run_client(argv)
    assert result.returncode == 0, describe(result)
    return result.stdout


def listing(data: bytes) -> list[tuple[int, bytes]]:
    """Parse "N VALUE" CRLF lines as curl prints a LIST or UIDL reply."""
    assert data.endswith(b"\r\n") or not data, data[-20:]
    rows = []
    for line in data.split(b"\r\n")[:-1]:
        num, value = line.split(b" ")
        rows.append((int(num), value))
    return rows


def test_curl_list_gives_every_message_with_its_crlf_size(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, transport: str
) -> None:
    rows = listing(curl(server, tls_files, transport))
    assert [n for n, _ in rows] == list(range(1, len(corpus.messages) + 1))
    # Each number's size is that of the message the number names (its UIDL is its key).
    with StreamingPop3(server.port("none")) as pop:
        pop.login(USER, PASSWORD)
        uids = dict(line.decode().split(" ") for line in pop.multiline("UIDL"))
        pop.command("QUIT")
    by_key = {m.key: m for m in corpus.messages}
    assert [int(size) for _, size in rows] == [by_key[uids[str(n)]].size for n, _ in rows]


@pytest.mark.slow
def test_curl_retr_of_every_message_equals_maildir_file_with_crlf(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, transport: str, tmp_path: Path
) -> None:
    by_digest = {(m.size, m.sha256): m for m in corpus.messages}
    seen = set()
    for n in range(1, len(corpus.messages) + 1):
        out = tmp_path / f"retr-{n}"
        curl(server, tls_files, transport, str(n), output=out)
        # The output is already CRLF: converting it again changes nothing.
        digest = crlf_digest_of_file(out)
        assert digest in by_digest, f"RETR {n}: {out.stat().st_size} octets match no message"
        seen.add(by_digest[digest].key)
        out.unlink()
    assert seen == {m.key for m in corpus.messages}


def test_curl_uidl_through_x_lists_the_servers_unique_ids(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, transport: str
) -> None:
    rows = listing(curl(server, tls_files, transport, extra=["--request", "UIDL"]))
    assert [n for n, _ in rows] == list(range(1, len(corpus.messages) + 1))
    with StreamingPop3(server.port("none")) as pop:
        pop.login(USER, PASSWORD)
        direct = pop.multiline("UIDL")
        pop.command("QUIT")
    assert [b"%d %s" % row for row in rows] == direct


def test_curl_top_through_x_gives_header_and_requested_body_lines(
    server: ServerProcess, corpus: Corpus, tls_files: TlsFiles, transport: str
) -> None:
    count = len(corpus.messages)
    # TOP n 0 (header and blank line) of every message, the 50 MB one included; TOP n 2 of
    # the small ones, whose bodies the corpus keeps in memory.
    headers = {m.top(0): m for m in corpus.messages}
    assert len(headers) == count
    seen = set()
    for n in range(1, count + 1):
        out = curl(server, tls_files, transport, extra=["--request", f"TOP {n} 0"])
        message = headers.get(out)
        assert message is not None, f"TOP {n} 0 gave {out[:300]!r}"
        seen.add(message.key)
        if message.crlf is not None:
            out = curl(server, tls_files, transport, extra=["--request", f"TOP {n} 2"])
            assert out == message.top(2), message.kind
    assert seen == {m.key for m in corpus.messages}


@pytest.mark.parametrize("initial_response", [False, True], ids=["prompts", "sasl-ir"])
def test_curl_logs_in_with_auth_login(
    server: ServerProcess,
    corpus: Corpus,
    tls_files: TlsFiles,
    transport: str,
    initial_response: bool,
) -> None:
    """curl forced to AUTH LOGIN (draft-murchison-sasl-login): with the two prompts, or
    with the name as an initial response (--sasl-ir); a wrong password is refused
    (curl's exit 67, "login denied")."""
    kind, scheme, options = TRANSPORTS[transport]
    ir = ["--sasl-ir"] if initial_response else []

    def run(password: str) -> subprocess.CompletedProcess[bytes]:
        url = f"{scheme}://{USER}:{password}@{LOOPBACK}:{server.port(kind)}/"
        return run_client(
            [
                *("curl", "--silent", "--show-error", "--verbose", "--max-time", "60"),
                *("--cacert", str(tls_files.ca_cert), *options, *ir),
                *("--login-options", "AUTH=LOGIN", url),
            ]
        )

    result = run(PASSWORD)
    assert result.returncode == 0, describe(result)
    sent = b"> AUTH LOGIN " if initial_response else b"> AUTH LOGIN\r\n"
    assert sent in result.stderr, describe(result)
    assert b"< + UGFzc3dvcmQ6" in result.stderr  # the "Password:" prompt
    assert [n for n, _ in listing(result.stdout)] == list(range(1, len(corpus.messages) + 1))
    refused = run("not-" + PASSWORD)
    assert refused.returncode == 67, describe(refused)
    assert b"< -ERR [AUTH] Authentication failed." in refused.stderr
