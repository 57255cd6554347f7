"""OAuth2 to a real Dovecot: XOAUTH2 and OAUTHBEARER logins with tokens popproxy refreshes.

A Dovecot of this module's own has the ``oauth2`` passdb for the XOAUTH2 and
OAUTHBEARER mechanisms: it checks each bearer token against the introspection
endpoint of the loopback provider (tests/oauth2_provider.py), which also serves the
token endpoint popproxy refreshes at. Access tokens live 2 seconds here, so expiry
happens within a test: real time, real sockets, real processes (popproxy, Dovecot,
curl, fetchmail). Each test has its own Dovecot user, refresh token and popproxy.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from oauth2_provider import FakeProvider, running_provider

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    PASSWORD,
    Corpus,
    ProxyUser,
    ServerProcess,
    TlsFiles,
    Upstream,
    poplib_connection,
)
from .test_fetchmail import FETCHMAIL_MAIL_RETRIEVED, FETCHMAIL_NO_MAIL, Fetchmail
from .test_fetchmail import TRANSPORTS as FETCHMAIL_TRANSPORTS
from .test_proxy_clients import CurlTarget

# The provider's access tokens live this long: expiry within a test.
TOKEN_LIFETIME_SECONDS = 2.0
# Past one token lifetime (popproxy refreshes a quarter of the lifetime ahead).
PAST_EXPIRY_SECONDS = TOKEN_LIFETIME_SECONDS + 0.2
CONCURRENT_LOGINS = 50
# The tokens of the concurrent-logins test live longer: all CONCURRENT_LOGINS must
# finish within one token's usable life (three quarters of it), even on a loaded
# machine, or a second refresh would be right and the count would say otherwise.
CONCURRENT_TOKEN_LIFETIME_SECONDS = 8.0
MESSAGES = 3  # each user's Maildir holds this many small corpus messages


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with running_provider(FakeProvider(lifetime=TOKEN_LIFETIME_SECONDS)) as p:
        yield p


@pytest.fixture(scope="module")
def oauth_dovecot(tls_files: TlsFiles, provider: FakeProvider) -> Iterator[DovecotServer]:
    """A Dovecot whose oauth2 passdb asks the provider's introspection endpoint (POST)."""
    # Not under pytest's 0700 basetemp: Dovecot's auth process reads the file.
    directory = Path(tempfile.mkdtemp(prefix="popproxy-oauth2-"))
    directory.chmod(0o755)
    conf = directory / "dovecot-oauth2.conf.ext"
    conf.write_text(
        "introspection_mode = post\n"
        f"introspection_url = {provider.base}/introspect\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
    )
    conf.chmod(0o644)
    extra = (
        "auth_mechanisms = plain login xoauth2 oauthbearer\n"
        "passdb {\n"
        "  driver = oauth2\n"
        "  mechanisms = xoauth2 oauthbearer\n"
        f"  args = {conf}\n"
        "}\n"
    )
    server = DovecotServer.start(tls_files, extra_config=extra)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def provider_defaults(provider: FakeProvider) -> None:
    provider.lifetime = TOKEN_LIFETIME_SECONDS
    provider.rotate = False
    provider.down = False


@pytest.fixture
def mailbox(oauth_dovecot: DovecotServer, corpus: Corpus) -> Iterator[DovecotUser]:
    user = oauth_dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES])
    yield user
    oauth_dovecot.remove_user(user)


@pytest.fixture
def tokens(tmp_path: Path, provider: FakeProvider, mailbox: DovecotUser) -> Path:
    """The refresh-token file oauth-login would write for ``mailbox`` (0600)."""
    path = tmp_path / f"{mailbox.name}.token"
    path.write_text(provider.grant(mailbox.name) + "\n")
    path.chmod(0o600)
    return path


OAuthProxy = Callable[..., ServerProcess]


@pytest.fixture
def oauth_proxy(
    start: StartServer,
    oauth_dovecot: DovecotServer,
    provider: FakeProvider,
    mailbox: DovecotUser,
    tokens: Path,
) -> OAuthProxy:
    """Starts popproxy with one token upstream (Dovecot over implicit TLS, ``auth:``
    ``mechanism``, xoauth2 unless given) and the local user ``local-NAME`` routed to
    ``mailbox`` with ``tokens``; a test sets up the provider first, then calls it."""

    def _start(*, mechanism: str = "xoauth2") -> ServerProcess:
        upstream = oauth_upstream(oauth_dovecot, provider, mechanism)
        local = ProxyUser(f"local-{mailbox.name}", PASSWORD, "oauth", mailbox.name, "", tokens)
        return start(users=[local], upstreams={"oauth": upstream})

    return _start


def oauth_upstream(
    dovecot: DovecotServer, provider: FakeProvider, mechanism: str = "xoauth2"
) -> Upstream:
    """The token upstream: ``dovecot`` over implicit TLS, ``auth: mechanism``, tokens from
    ``provider``'s endpoint; sessions of one account may overlap."""
    host, port = dovecot.endpoint("implicit")
    oauth2 = {"client_id": provider.client_id, "token_url": provider.token_url, "scope": "mail"}
    settings = {"auth": mechanism, "oauth2": oauth2, "exclusive_sessions": False}
    return Upstream(host, port, "implicit", dovecot.ca_file, settings=settings)


def login(server: ServerProcess, user: DovecotUser) -> tuple[int, int]:
    """A poplib session as the local user: its STAT, then QUIT."""
    pop = poplib_connection(server.port("none"))
    pop.user(f"local-{user.name}")
    pop.pass_(PASSWORD)
    count, size = pop.stat()
    pop.quit()
    return count, size


def refused(server: ServerProcess, user: DovecotUser) -> str:
    """The -ERR a login as the local user gets."""
    pop = poplib_connection(server.port("none"))
    pop.user(f"local-{user.name}")
    with pytest.raises(Exception) as info:  # poplib.error_proto
        pop.pass_(PASSWORD)
    return str(info.value)


def concurrent_logins(
    server: ServerProcess, user: DovecotUser, count: int
) -> tuple[list[tuple[int, int]], list[BaseException]]:
    """``count`` logins at once (threads released together); their STATs and failures."""
    results: list[tuple[int, int]] = []
    failures: list[BaseException] = []
    go = threading.Barrier(count)

    def one() -> None:
        go.wait()
        try:
            results.append(login(server, user))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, failures


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_curl_and_fetchmail_through_a_token_login(  # noqa: PLR0917 (fixtures)
    oauth_proxy: OAuthProxy,
    mailbox: DovecotUser,
    tokens: Path,
    tls_files: TlsFiles,
    tmp_path: Path,
    mechanism: str,
) -> None:
    server = oauth_proxy(mechanism=mechanism)
    local = f"local-{mailbox.name}"
    target = CurlTarget(
        LOOPBACK, server.port("starttls"), "stls", local, PASSWORD, tls_files.ca_cert
    )
    rows = target.run().splitlines()
    assert len(rows) == MESSAGES
    kind, options = FETCHMAIL_TRANSPORTS["implicit-tls"]
    fetchmail = Fetchmail.setup(
        tmp_path,
        server.port(kind),
        f"local-{mailbox.name}",
        PASSWORD,
        options.format(ca=tls_files.ca_cert),
        keep=True,
    )
    first = fetchmail.run()
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, first
    assert len(list(fetchmail.out.iterdir())) == MESSAGES
    assert fetchmail.run().returncode == FETCHMAIL_NO_MAIL
    records = server.records("session_end")
    assert records and "Bearer" not in server.log_text()
    assert tokens.read_text().strip() not in server.log_text()


def test_expired_tokens_a_long_session_and_later_sessions(
    oauth_proxy: OAuthProxy, provider: FakeProvider, mailbox: DovecotUser
) -> None:
    server = oauth_proxy()
    before = provider.refreshes
    pop = poplib_connection(server.port("none"))
    pop.user(f"local-{mailbox.name}")
    pop.pass_(PASSWORD)
    time.sleep(PAST_EXPIRY_SECONDS)  # the token the session logged in with has expired
    assert pop.stat()[0] == MESSAGES
    assert pop.retr(1)[0].startswith(b"+OK")
    pop.quit()
    assert provider.refreshes == before + 1
    assert login(server, mailbox)[0] == MESSAGES  # after expiry: a fresh token
    assert provider.refreshes == before + 2
    assert login(server, mailbox)[0] == MESSAGES  # within its lifetime: cached
    assert provider.refreshes == before + 2


def test_one_refresh_per_expiry_under_concurrent_logins(
    oauth_proxy: OAuthProxy, provider: FakeProvider, mailbox: DovecotUser
) -> None:
    provider.lifetime = CONCURRENT_TOKEN_LIFETIME_SECONDS
    server = oauth_proxy()
    for round_ in range(2):  # the first token, then the one after it expired
        if round_:
            time.sleep(CONCURRENT_TOKEN_LIFETIME_SECONDS + 0.2)
        before = provider.refreshes
        results, failures = concurrent_logins(server, mailbox, CONCURRENT_LOGINS)
        assert failures == []
        assert results == [(MESSAGES, results[0][1])] * CONCURRENT_LOGINS
        assert provider.refreshes == before + 1


def test_a_token_refused_upstream_is_refreshed_once_and_the_login_retried(
    oauth_proxy: OAuthProxy, provider: FakeProvider, mailbox: DovecotUser
) -> None:
    provider.lifetime = 3600  # popproxy would keep its token for an hour ...
    server = oauth_proxy()
    assert login(server, mailbox)[0] == MESSAGES
    before = provider.refreshes
    provider.expire_access_tokens()  # ... but the provider ends it early: invalid_token
    assert login(server, mailbox)[0] == MESSAGES
    assert provider.refreshes == before + 1
    server.wait_for_log(
        lambda rs: any(r.get("msg") == "upstream_token_refused" for r in rs),
        timeout=5,
        what="upstream_token_refused",
    )


def test_a_revoked_refresh_token_gives_auth_and_says_to_run_oauth_login(
    oauth_proxy: OAuthProxy, provider: FakeProvider, mailbox: DovecotUser, tokens: Path
) -> None:
    provider.revoke(tokens.read_text().strip())
    server = oauth_proxy()
    reply = refused(server, mailbox)
    assert "-ERR [AUTH]" in reply
    records = server.wait_for_log(
        lambda rs: any(r.get("msg") == "oauth2_refresh_token_revoked" for r in rs),
        timeout=5,
        what="oauth2_refresh_token_revoked",
    )
    [line] = [r for r in records if r.get("msg") == "oauth2_refresh_token_revoked"]
    assert "popproxy oauth-login" in line["action"]
    assert line["upstream"] == "oauth" and line["session"]
    # After oauth-login writes a new token, the next login (past the backoff) works.
    tokens.write_text(provider.grant(mailbox.name) + "\n")
    time.sleep(1.1)  # the first failure's backoff
    assert login(server, mailbox)[0] == MESSAGES


def test_a_rotated_refresh_token_is_written_back_0600(
    oauth_proxy: OAuthProxy,
    provider: FakeProvider,
    mailbox: DovecotUser,
    tokens: Path,
    tmp_path: Path,
) -> None:
    provider.rotate = True
    old = tokens.read_text().strip()
    server = oauth_proxy()
    assert login(server, mailbox)[0] == MESSAGES
    new = tokens.read_text().strip()
    assert new != old and provider.refresh_tokens.get(new) == mailbox.name
    assert old not in provider.refresh_tokens
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    time.sleep(PAST_EXPIRY_SECONDS)  # the rotated token is the one used next
    assert login(server, mailbox)[0] == MESSAGES
    assert tokens.read_text().strip() not in (old, new)


def test_a_token_endpoint_that_is_down_gives_sys_temp(
    oauth_proxy: OAuthProxy, provider: FakeProvider, mailbox: DovecotUser
) -> None:
    server = oauth_proxy()
    provider.down = True
    try:
        assert "-ERR [SYS/TEMP]" in refused(server, mailbox)
    finally:
        provider.down = False
    server.wait_for_log(
        lambda rs: any(r.get("msg") == "oauth2_refresh_failed" for r in rs),
        timeout=5,
        what="oauth2_refresh_failed",
    )
