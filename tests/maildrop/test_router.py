"""Routes and the maildrop router: one route value per user, the Maildir lock shared
with the process, capability memos per upstream server (DESIGN.md, routing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from popproxy.config import Config, LimitsConfig, StateConfig, TlsMode, UpstreamConfig, UserConfig
from popproxy.locks import InProcessLocks, MaildirMailbox, UpstreamMailbox
from popproxy.maildrop.base import MaildropError, MaildropInUse
from popproxy.maildrop.maildir import MaildirMaildrop
from popproxy.maildrop.retention import utc_now
from popproxy.maildrop.route import MaildirRoute, NoRoute, RefreshTokenFile, UpstreamRoute, route_of
from popproxy.maildrop.router import (
    CapabilityMemos,
    MaildropRouter,
    RouterResources,
    mailbox_of,
)
from popproxy.metrics import Metrics
from popproxy.pop3.replies import ResponseCode
from popproxy.secret import Secret
from popproxy.state.opener import StoreOpener

PROVIDER = UpstreamConfig("provider", "POP.Example.NET", 995, TlsMode.IMPLICIT)
PASSWORD = Secret.from_str("upstream secret")


def user(name: str, **route: object) -> UserConfig:
    return UserConfig(name, "$scrypt$unused", **route)  # type: ignore[arg-type]


def config(*users: UserConfig) -> Config:
    return Config(
        source=Path("test.yaml"),
        listen=(),
        tls=None,
        allow_plaintext_auth=True,
        upstreams={"provider": PROVIDER},
        users={u.name: u for u in users},
        state=StateConfig("sqlite:///:memory:"),
        rules_dir=None,
        metrics=None,
        limits=LimitsConfig(),
    )


def test_a_maildir_user_has_a_maildir_route(tmp_path: Path) -> None:
    assert route_of(user("demo", maildir=tmp_path), {}) == MaildirRoute(tmp_path)


def test_an_upstream_user_has_an_upstream_route() -> None:
    alice = user(
        "alice", upstream="provider", upstream_user="a@example.net", upstream_password=PASSWORD
    )
    route = route_of(alice, {"provider": PROVIDER})
    assert route == UpstreamRoute(PROVIDER, "a@example.net", PASSWORD)
    # The lock names the mailbox, not the upstream's name: host in lower case.
    assert isinstance(route, UpstreamRoute)
    assert mailbox_of(route) == UpstreamMailbox("pop.example.net", 995, "a@example.net")


def test_a_token_user_has_an_upstream_route_with_its_refresh_token_file(tmp_path: Path) -> None:
    token = tmp_path / "a.token"
    alice = user(
        "alice",
        upstream="provider",
        upstream_user="a@example.net",
        upstream_refresh_token_file=token,
    )
    route = route_of(alice, {"provider": PROVIDER})
    assert route == UpstreamRoute(PROVIDER, "a@example.net", RefreshTokenFile(token))


@pytest.mark.parametrize(
    "route",
    [{}, {"upstream": "provider"}, {"upstream": "provider", "upstream_user": "a@example.net"}],
)
def test_a_user_without_a_complete_route_has_none(route: dict[str, object]) -> None:
    with pytest.raises(NoRoute, match="'bob' has no maildrop configured"):
        route_of(user("bob", **route), {"provider": PROVIDER})


@pytest.fixture
async def resources() -> AsyncIterator[RouterResources]:
    store = StoreOpener(StateConfig("sqlite:///:memory:"), Metrics.unexported())
    yield RouterResources(
        store=store,
        locks=InProcessLocks(),
        capabilities=CapabilityMemos(),
        greeting_token="0123456789ab",
        clock=utc_now,
    )
    await store.aclose()


async def test_a_maildir_is_opened_under_the_shared_locks(
    tmp_path: Path, resources: RouterResources
) -> None:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    demo = user("demo", maildir=tmp_path)
    router = MaildropRouter(config(demo), {}, resources)
    first = await router.open(demo, "s1")
    assert isinstance(first, MaildirMaildrop)
    locks = resources.locks
    assert isinstance(locks, InProcessLocks)
    assert locks.held(MaildirMailbox(first.root))
    # A router of the next config generation shares the locks: refused at once.
    again = MaildropRouter(config(demo), {}, resources)
    with pytest.raises(MaildropInUse):
        await again.open(demo, "s2")
    await first.aclose()
    assert not locks.held(MaildirMailbox(first.root))
    await (await again.open(demo, "s3")).aclose()


async def test_a_user_without_a_route_is_refused_for_good(resources: RouterResources) -> None:
    bob = user("bob")
    router = MaildropRouter(config(bob), {}, resources)
    with pytest.raises(MaildropError) as refused:
        await router.open(bob, "s1")
    assert refused.value.code is ResponseCode.SYS_PERM


def test_capability_memos_are_per_server_and_forget_unconfigured_ones() -> None:
    memos = CapabilityMemos()
    memo = memos.of(PROVIDER)
    memo.capabilities = {"PIPELINING": ()}
    # Another name for the same server (host case aside) shares what it said.
    alias = UpstreamConfig("alias", "pop.example.net", 995, TlsMode.IMPLICIT)
    assert memos.of(alias) is memo
    # The same host by another port or TLS mode is another server's CAPA.
    assert memos.of(UpstreamConfig("plain", "pop.example.net", 110, TlsMode.STARTTLS)) is not memo
    memos.retain([alias])
    assert memos.of(PROVIDER) is memo
    memos.retain([])
    assert memos.of(PROVIDER) is not memo
