"""Fixtures of the adversarial suite: a popproxy subprocess in front of a real Dovecot.

The fixtures of tests/integration are taken by assignment (`start`, the TLS files,
the Dovecot); the corpus here has only the small messages, so the suite moves no
big files. `target` is shared by the tests of a module (each test ends by checking
that it still serves); a test that needs its own configuration starts its own
server with `start`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration import conftest as integration
from integration.dovecot import DovecotServer, DovecotUser
from integration.harness import (
    Corpus,
    TlsFiles,
    make_corpus,
)

from .probe import Target

tls_files = integration.tls_files
start = integration.start
dovecot = integration.dovecot

# The messages each Dovecot account here holds (the corpus's first three: plain, dot
# lines, 8-bit).
MAILBOX_MESSAGES = 3


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The corpus without its 50 MB message."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "Maildir", big_bytes=0)


@pytest.fixture(scope="module")
def mailbox(dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    """A Dovecot account with three small messages, for one test module."""
    user = dovecot.add_user(corpus=corpus, messages=corpus.small[:MAILBOX_MESSAGES])
    yield user
    dovecot.remove_user(user)


@pytest.fixture(scope="module")
def module_start(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[integration.StartServer]:
    """As tests/integration's `start`, for servers that live as long as a module."""
    yield from integration.serve_in(tmp_path_factory.mktemp("popproxy"), tls_files)


@pytest.fixture(scope="module")
def target(
    module_start: integration.StartServer,
    dovecot: DovecotServer,
    mailbox: DovecotUser,
    corpus: Corpus,
) -> Target:
    """popproxy with its three listeners, plaintext logins allowed (loopback), and one
    local user routed to `mailbox` over STLS; shared by a module's tests."""
    return Target.start(module_start, dovecot, mailbox, corpus)
