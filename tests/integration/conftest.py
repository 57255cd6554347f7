"""Fixtures for the real-client tests: corpus, TLS files, a running popproxy subprocess, and
a real Dovecot upstream."""

from __future__ import annotations

import poplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .dovecot import DovecotServer, DovecotUser
from .harness import (
    CLIENT_MAX_LINE_BYTES,
    MESSAGES,
    PASSWORD,
    USER,
    Corpus,
    ServerFailed,
    ServerProcess,
    TlsFiles,
    User,
    close_poplib_connections,
    make_corpus,
    make_tls_files,
    start_server,
)

StartServer = Callable[..., ServerProcess]


@pytest.fixture(autouse=True)
def poplib_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """poplib refuses lines over 2048 octets (poplib._MAXLINE); RFC 1939 sets no limit on
    message lines and the corpus has one of more than 10,000 characters (getmail6 raises
    the limit the same way)."""
    monkeypatch.setattr(poplib, "_MAXLINE", CLIENT_MAX_LINE_BYTES)


@pytest.fixture(autouse=True)
def close_poplib() -> Iterator[None]:
    """Close the connections `harness.poplib_connection` opened, even when a test failed
    half-way. Synchronous, so that pytest-trio runs it for every test."""
    yield
    close_poplib_connections()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The corpus Maildir, made once per test run (the 50 MB message takes a moment)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "Maildir")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """CA, server chain and key for 127.0.0.1/localhost."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def maildir(corpus: Corpus, tmp_path: Path) -> Path:
    """This test's own copy of the corpus Maildir (hard links), free to be changed."""
    return corpus.copy_to(tmp_path / "Maildir")


@pytest.fixture
def small_maildir(corpus: Corpus, tmp_path: Path) -> Path:
    """The corpus without the 50 MB message, as hard links: cheap to snapshot and change."""
    return corpus.copy_to(tmp_path / "small", corpus.small)


def serve_in(workdir: Path, tls_files: TlsFiles) -> Iterator[StartServer]:
    """Start popproxy servers under `workdir`; at the end each is stopped with SIGTERM
    and must exit 0 (a generator for fixtures of any scope to `yield from`)."""
    servers: list[ServerProcess] = []

    def _start(**options: Any) -> ServerProcess:
        """`harness.start_server` in a directory of its own, with the session's TLS files;
        ``options`` are its keywords (users, listeners, limits, upstreams, ...)."""
        server = start_server(workdir / f"server{len(servers)}", tls=tls_files, **options)
        servers.append(server)
        return server

    yield _start
    failures = []
    for server in servers:
        try:
            code = server.stop()
        except ServerFailed as exc:  # no exit within the deadline: it was killed
            failures.append(str(exc))
            continue
        if code != 0 and not server.crashed:
            failures.append(f"exit code {code} after SIGTERM\n--- log ---\n{server.log_text()}")
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def start(tmp_path: Path, tls_files: TlsFiles) -> Iterator[StartServer]:
    """Start popproxy servers for this test; each is stopped with SIGTERM and must exit 0."""
    yield from serve_in(tmp_path, tls_files)


@pytest.fixture
def server(start: StartServer, maildir: Path) -> ServerProcess:
    """A server with all three listeners and plaintext auth allowed, serving USER the corpus."""
    return start(users=[User(USER, PASSWORD, maildir)])


# ---------------------------------------------------------------------------------------------
# A real Dovecot as the upstream (tests/integration/dovecot.py)


@pytest.fixture(scope="session")
def dovecot(tls_files: TlsFiles) -> Iterator[DovecotServer]:
    """One Dovecot for the whole run; tests add their own users (`dovecot_user`, add_user).

    At the end it gets SIGTERM and must exit, leaving no process behind.
    """
    server = DovecotServer.start(tls_files)
    yield server
    server.stop()


@pytest.fixture
def dovecot_user(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    """A fresh Dovecot user whose Maildir holds a copy of the whole corpus; removed after."""
    user = dovecot.add_user(corpus=corpus)
    yield user
    dovecot.remove_user(user)


@pytest.fixture
def account(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    """A fresh Dovecot user holding the first MESSAGES small messages of the corpus."""
    user = dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES])
    yield user
    dovecot.remove_user(user)


@pytest.fixture
def small_account(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    """A fresh Dovecot user holding every small message of the corpus (all but the 50 MB
    one): what the gateway tests fetch."""
    user = dovecot.add_user(corpus=corpus, messages=corpus.small)
    yield user
    dovecot.remove_user(user)
