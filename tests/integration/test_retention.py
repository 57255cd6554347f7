"""Retention policy between real clients and a real Dovecot (issue 4, "What it must show").

Each test starts popproxy (a subprocess) with rule files in front of the session's
Dovecot, drives it with fetchmail or poplib, and then looks at Dovecot's Maildir
(what is really left upstream) and at popproxy's state store (what it recorded).
Crash tests stop a QUIT half way with a relay on the upstream leg (relay.py) and
SIGKILL popproxy there.
"""

from __future__ import annotations

import poplib
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from state.state_backends import BACKENDS, new_postgres_backend

from popproxy.config import StateConfig
from popproxy.state import open_store
from popproxy.state.base import AccountKey, StoredMessage

from .conftest import StartServer
from .dovecot import DovecotServer, DovecotUser
from .harness import (
    LOOPBACK,
    MESSAGES,
    PASSWORD,
    SOCKET_TIMEOUT_SECONDS,
    Corpus,
    ProxyUser,
    ServerFailed,
    ServerProcess,
    TlsFiles,
    Upstream,
    describe,
    poplib_connection,
    state_url,
)
from .relay import Hold, HoldingRelay
from .test_fetchmail import FETCHMAIL_MAIL_RETRIEVED, FETCHMAIL_NO_MAIL
from .test_proxy import UPSTREAM, local_name, local_user, upstream_for
from .test_proxy_clients import proxied_fetchmail

KEEP = {"10-keep.yaml": ("rules:\n  - name: keep-on-server\n    action: keep\n")}
DELETE_AFTER_RETRIEVE = {
    "10-dar.yaml": ("rules:\n  - name: delete-retrieved\n    action: delete_after_retrieve\n")
}


def proxy(
    start: StartServer,
    dovecot: DovecotServer,
    rules: dict[str, str] | None,
    users: list[ProxyUser],
    *,
    upstream: Upstream | None = None,
    state: Path | str | None = None,
    limits: dict[str, float | int] | None = None,
) -> ServerProcess:
    return start(
        users=users,
        upstreams={UPSTREAM: upstream or upstream_for(dovecot, "none")},
        rules=rules,
        state=state,
        limits=limits,
    )


def login(server: ServerProcess, user: str) -> poplib.POP3:
    pop = poplib_connection(server.port("none"))
    pop.user(user)
    pop.pass_(PASSWORD)
    return pop


def uidls(pop: poplib.POP3) -> list[str]:
    return [line.split()[1].decode() for line in pop.uidl()[1]]


def stored(state: Path | str) -> list[StoredMessage]:
    """Every row of popproxy's state store (a sqlite file or a URL), read with the
    store's own code."""

    async def read() -> list[StoredMessage]:
        store = await open_store(StateConfig(state_url(state)))
        try:
            return list(await store.messages())
        finally:
            await store.aclose()

    return trio.run(read)


# -- keep -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_keep_fetchmail_delete_mode_leaves_every_message_then_fetches_only_new_ones(
    start: StartServer,
    dovecot: DovecotServer,
    account: DovecotUser,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    server = proxy(start, dovecot, KEEP, [local_user(account)])
    keys_before = account.keys()
    fetchmail = proxied_fetchmail(tmp_path, server, account, "stls", tls_files, keep=False)

    first = fetchmail.run()  # fetchall + no keep: fetchmail sends DELE for each message
    assert first.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(first)
    server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(account, 1)
    assert len(fetchmail.delivered()) == MESSAGES
    assert account.keys() == keys_before, "keep: every message must stay in Dovecot"

    fetchmail.idfile.unlink(missing_ok=True)  # fetchmail forgets what it saw
    second = fetchmail.run()
    assert second.returncode == FETCHMAIL_NO_MAIL, describe(second)
    server.wait_sessions_ended(2)
    dovecot.wait_sessions_ended(account, 2)
    assert len(fetchmail.delivered()) == MESSAGES

    new_key = account.deliver(b"Subject: the new one\r\n\r\nonly this one\r\n")
    third = fetchmail.run()
    assert third.returncode == FETCHMAIL_MAIL_RETRIEVED, describe(third)
    server.wait_sessions_ended(3)
    delivered = fetchmail.delivered()
    assert len(delivered) == MESSAGES + 1, "the third run fetches the new message only"
    newest = max(delivered, key=lambda p: p.stat().st_mtime_ns)
    assert b"only this one" in newest.read_bytes()
    assert account.keys() == keys_before | {new_key}
    shutil.rmtree(fetchmail.out)


def test_keep_two_local_users_on_one_account_each_get_every_message_exactly_once(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    phone, desk = local_user(account, "phone"), local_user(account, "desk")
    server = proxy(start, dovecot, KEEP, [phone, desk])
    everything = set(account.keys())
    seen: dict[str, list[str]] = {"phone": [], "desk": []}
    for round_ in range(2):
        for user in ("phone", "desk"):
            pop = login(server, user)
            listed = uidls(pop)
            for n, uid in enumerate(listed, start=1):
                pop.retr(n)
                pop.dele(n)
                seen[user].append(uid)
            pop.quit()
            if round_ == 1:
                assert listed == [], f"{user} was offered a message again"
    for user, uids in seen.items():
        assert sorted(uids) == sorted(set(uids)), f"{user} got a message twice"
        assert len(uids) == MESSAGES
    assert account.keys() == everything  # keep: nothing left Dovecot


# -- delete_after_retrieve ------------------------------------------------------------------


def test_delete_after_retrieve_removes_exactly_the_retrieved_messages(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    server = proxy(start, dovecot, DELETE_AFTER_RETRIEVE, [local_user(account)])
    pop = login(server, local_name(account))
    listed = uidls(pop)
    pop.retr(2)
    pop.retr(4)
    pop.top(1, 0)  # TOP is not a retrieval
    assert pop.quit().startswith(b"+OK")
    dovecot.wait_sessions_ended(account, 1)
    after = login(server, local_name(account))
    assert uidls(after) == [listed[0], listed[2], listed[4]]
    after.quit()


# -- crash safety ---------------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", ["login", "dele", "retr", "mid-retr"])
def test_invariant_2_a_disconnect_without_quit_records_nothing_and_deletes_nothing(
    start: StartServer,
    dovecot: DovecotServer,
    account: DovecotUser,
    tmp_path: Path,
    stop_after: str,
) -> None:
    rules = {**KEEP}
    state = tmp_path / "state.db"
    server = proxy(start, dovecot, rules, [local_user(account)], state=state)
    keys_before = account.keys()
    pop = login(server, local_name(account))
    if stop_after in {"dele", "retr", "mid-retr"}:
        pop.dele(1)
    if stop_after in {"retr", "mid-retr"}:
        pop.retr(2)
    if stop_after == "mid-retr":
        pop.sock.sendall(b"RETR 3\r\n")  # the reply is never read: the client vanishes
    pop.close()  # no QUIT: the connection just goes away
    server.wait_sessions_ended(1)
    dovecot.wait_sessions_ended(account, 1)
    assert account.keys() == keys_before
    assert stored(state) == []
    again = login(server, local_name(account))
    assert len(uidls(again)) == MESSAGES
    again.quit()


@pytest.mark.parametrize("hold", [Hold.QUIT, Hold.QUIT_REPLY], ids=lambda h: h.value)
def test_sigkill_during_quit_loses_no_message(
    start: StartServer,
    dovecot: DovecotServer,
    account: DovecotUser,
    tmp_path: Path,
    hold: Hold,
) -> None:
    """Killed before the upstream got QUIT: nothing happened. Killed after the upstream
    committed: its deletions are done, the store knows nothing, and the next session
    sees exactly what Dovecot holds (a message is offered again only if it is still there)."""
    # No rules: the client's DELEs of messages 1 and 3 are deletions upstream.
    state = tmp_path / "state.db"
    users = [local_user(account)]
    host, port = dovecot.endpoint("none")
    with HoldingRelay((host, port), hold) as relay:
        upstream = Upstream(LOOPBACK, relay.port, "none")
        server = proxy(start, dovecot, None, users, upstream=upstream, state=state)
        pop = login(server, local_name(account))
        listed = uidls(pop)
        for n in (1, 3):
            pop.dele(n)
        pop.sock.sendall(b"QUIT\r\n")  # the answer never comes: popproxy is killed
        assert relay.holding.wait(SOCKET_TIMEOUT_SECONDS)
        server.crash()
        pop.close()  # no QUIT: the connection just goes away
    dovecot.wait_sessions_ended(account, 1)
    remaining = account.keys()
    if hold is Hold.QUIT:
        assert len(remaining) == MESSAGES, "no QUIT reached Dovecot: nothing may be deleted"
    else:
        assert len(remaining) == MESSAGES - 2, "Dovecot committed the two DELEs"
    assert stored(state) == []  # killed before the store's commit
    restarted = proxy(start, dovecot, None, users, state=state)
    pop = login(restarted, local_name(account))
    offered = uidls(pop)
    pop.quit()
    expected = listed if hold is Hold.QUIT else [listed[1], *listed[3:]]
    assert offered == expected


# -- the store ------------------------------------------------------------------------------


def test_invariant_3_a_message_hidden_for_a_user_never_reappears_to_that_user(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    """Hidden by a keep DELE, then: a session that RSETs, one that disconnects, one
    after a restart, and one after new mail arrived: it never comes back."""
    state = tmp_path / "state.db"
    users = [local_user(account)]
    server = proxy(start, dovecot, KEEP, users, state=state)
    pop = login(server, local_name(account))
    hidden = uidls(pop)[1]
    pop.dele(2)
    pop.quit()

    def offered(server: ServerProcess) -> list[str]:
        pop = login(server, local_name(account))
        listed = uidls(pop)
        pop.quit()
        return listed

    assert hidden not in offered(server)
    pop = login(server, local_name(account))
    pop.dele(1)
    pop.rset()
    assert hidden not in uidls(pop)
    pop.quit()
    pop = login(server, local_name(account))
    pop.close()  # no QUIT
    account.deliver(b"Subject: later\r\n\r\nnew mail\r\n")
    assert hidden not in offered(server)
    assert server.stop() == 0
    restarted = proxy(start, dovecot, KEEP, users, state=state)
    listed = offered(restarted)
    assert hidden not in listed
    assert len(listed) == MESSAGES  # the new one in, the hidden one out


def test_keep_hides_survive_a_restart(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    users = [local_user(account)]
    first = proxy(start, dovecot, KEEP, users, state=state)
    pop = login(first, local_name(account))
    listed = uidls(pop)
    pop.dele(2)
    pop.quit()
    assert first.stop() == 0
    second = proxy(start, dovecot, KEEP, users, state=state)
    pop = login(second, local_name(account))
    assert uidls(pop) == [uid for uid in listed if uid != listed[1]]
    pop.quit()
    rows = {row.uid: row for row in stored(state)}
    assert set(rows) == set(listed)
    assert [h[0] for h in rows[listed[1]].hidden_for] == [local_name(account)]


CONCURRENT_ACCOUNTS = 5
SESSIONS_PER_ACCOUNT = 20


@pytest.fixture(params=BACKENDS)
def shared_state(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The store of one test, on each backend: a sqlite file, or the URL of a schema of
    its own in the run's PostgreSQL database (tests/state/state_backends.py)."""
    match request.param:
        case "sqlite":
            return tmp_path / "state.db"
        case "postgres":
            return new_postgres_backend(request.getfixturevalue("pg_database")).url
        case other:
            raise AssertionError(f"unknown backend {other}")


@pytest.mark.slow
def test_100_concurrent_sessions_on_several_accounts_never_corrupt_the_store(
    start: StartServer, dovecot: DovecotServer, corpus: Corpus, shared_state: Path | str
) -> None:
    accounts = [
        dovecot.add_user(corpus=corpus, messages=corpus.small[:MESSAGES])
        for _ in range(CONCURRENT_ACCOUNTS)
    ]
    state = shared_state
    try:
        users = [
            local_user(a, f"u{i}-{j}")
            for i, a in enumerate(accounts)
            for j in range(SESSIONS_PER_ACCOUNT)
        ]
        # Sessions on one account take turns: give the queue room (20 short sessions).
        server = proxy(
            start, dovecot, KEEP, users, state=state, limits={"account_wait_seconds": 60}
        )
        failures: list[str] = []
        hidden: dict[str, str] = {}  # local user -> the UIDL it hid

        def session(user: ProxyUser) -> None:
            try:
                pop = login(server, user.name)
                listed = uidls(pop)
                pop.retr(1)
                pop.dele(1)
                pop.quit()
                hidden[user.name] = listed[0]
            except Exception as exc:  # collected: a thread's exception is not a test failure
                failures.append(f"{user.name}: {exc!r}")

        threads = [threading.Thread(target=session, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOCKET_TIMEOUT_SECONDS * 6)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
        if isinstance(state, Path):
            with sqlite3.connect(state) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = stored(state)
        assert {r.account for r in rows} == {AccountKey(UPSTREAM, a.name) for a in accounts}
        assert len(rows) == CONCURRENT_ACCOUNTS * MESSAGES
        recorded = {user for r in rows for user, _rule, _at in r.hidden_for}
        assert recorded == set(hidden)
        for r in rows:
            for user, _rule, _at in r.hidden_for:
                assert hidden[user] == r.uid
        for a in accounts:
            assert a.count() == MESSAGES  # keep: nothing deleted upstream
    finally:
        for a in accounts:
            dovecot.remove_user(a)


# -- exclusive sessions ---------------------------------------------------------------------


def test_a_second_session_on_an_account_waits_then_gets_in_use(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    phone, desk = local_user(account, "phone"), local_user(account, "desk")
    server = proxy(start, dovecot, KEEP, [phone, desk], limits={"account_wait_seconds": 0.5})
    first = login(server, "phone")
    second = poplib_connection(server.port("none"))
    second.user("desk")
    with pytest.raises(poplib.error_proto) as refused:
        second.pass_(PASSWORD)
    assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    first.quit()
    second.close()
    third = login(server, "desk")  # the account is free again
    assert len(uidls(third)) == MESSAGES
    third.quit()


# -- popproxy explain -----------------------------------------------------------------------


def test_explain_dry_runs_the_rules_against_the_live_listing_and_changes_nothing(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser, tmp_path: Path
) -> None:
    rules = {
        "10-keep.yaml": (
            "rules:\n"
            "  - name: keep-small\n"
            "    match: {smaller_than_bytes: 1000}\n"
            "    action: keep\n"
            "    expire_after_days: 30\n"
        )
    }
    state = tmp_path / "state.db"
    server = proxy(start, dovecot, rules, [local_user(account)], state=state)
    pop = login(server, local_name(account))
    listed = uidls(pop)
    sizes = [int(line.split()[1]) for line in pop.list()[1]]
    pop.dele(1)
    pop.quit()  # message 1 is now hidden for the user, if it is small
    dovecot.wait_sessions_ended(account, 1)
    keys_before, rows_before = account.keys(), stored(state)

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "popproxy",
            "explain",
            "-c",
            str(server.config),
            "--user",
            local_name(account),
        ],
        capture_output=True,
        timeout=SOCKET_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode().splitlines()
    assert out[0].startswith(f"explain for user {local_name(account)}: {MESSAGES} upstream")
    by_uid = {line.split()[2]: line for line in out[2:]}
    assert set(by_uid) == set(listed)
    for n, (uid, size) in enumerate(zip(listed, sizes, strict=True)):
        line = by_uid[uid]
        if n == 0 and size < 1000:
            assert "keep-small" in line
            assert "no (hidden_for_user)" in line  # the DELE above hid it: not shown
        elif size < 1000:
            assert "keep-small" in line
            assert "hidden for this user" in line  # what a DELE would do
        else:
            assert "default" in line
            assert "deleted upstream" in line
    dovecot.wait_sessions_ended(account, 2)
    assert account.keys() == keys_before
    assert stored(state) == rows_before


def test_a_bad_rule_file_stops_the_server_from_starting(
    start: StartServer, dovecot: DovecotServer, account: DovecotUser
) -> None:
    bad = {
        "10-good.yaml": "rules:\n  - name: keep-all\n    action: keep\n",
        "20-bad.yaml": "rules:\n  - name: typo\n    action: keeep\n",
    }
    with pytest.raises(ServerFailed) as failed:
        proxy(start, dovecot, bad, [local_user(account)])
    assert "20-bad.yaml" in str(failed.value)
    assert "action" in str(failed.value)
