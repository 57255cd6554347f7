"""Single statements from the trio thread (popproxy/state/postgres/nonblocking.py), on the
test PostgreSQL server: text in and out, errors, connections the server ends, deadlines,
cancellation and the bound on connections."""

from __future__ import annotations

import math
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.state.base import StateError
from popproxy.state.postgres import PostgresTarget, nonblocking
from popproxy.state.postgres.nonblocking import (
    Statements,
    as_bool,
    as_float,
    as_float_array,
    as_text,
    text_array,
)
from state.state_backends import PostgresBackend, admin_connection

# A statement slower than a test's call_seconds: pg_sleep is cut short when its
# connection closes only at its end, so this stays short.
SLOW_SECONDS = 2


class Runner(Statements):
    """``Statements`` whose connections carry a name of their own (tests run in parallel)."""

    def __init__(
        self, url: str, *, size: int = 2, connect_seconds: float = 5, call_seconds: float = 10
    ) -> None:
        self.url = url
        self.name = f"popproxy-test-{secrets.token_hex(6)}"
        super().__init__(
            PostgresTarget(url),
            size=size,
            configure=self._configure_name,
            connect_seconds=connect_seconds,
            call_seconds=call_seconds,
        )

    def _configure_name(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT set_config('application_name', %s, false)", (self.name,))
        conn.commit()

    def backends(self) -> set[int]:
        """The server processes of this runner's connections (pg_stat_activity)."""
        with admin_connection(self.url) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.name,)
            ).fetchall()
        return {int(row[0]) for row in rows}


@pytest.fixture
async def runner(pg_backend: PostgresBackend) -> AsyncIterator[Runner]:
    opened = Runner(pg_backend.url)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_parameters_and_results_are_text(runner: Runner) -> None:
    result = await runner.run(
        "SELECT $1::text, $2::float8 * 2, $3::boolean, $4::float8[], NULL::text",
        ("a 'b' \"c\"", "1.25", "t", "{1.5,-Infinity,Infinity}"),
    )
    [(text, doubled, flag, floats, null)] = result.rows
    assert as_text(text) == "a 'b' \"c\""
    assert as_float(doubled) == 2.5
    assert as_bool(flag)
    assert as_float_array(floats) == (1.5, -math.inf, math.inf)
    assert null is None
    assert result.count == 1


async def test_a_count_is_the_rows_a_statement_touched(runner: Runner) -> None:
    await runner.run("CREATE TABLE t (n integer)")
    inserted = await runner.run("INSERT INTO t SELECT generate_series(1, $1::integer)", ("5",))
    assert (inserted.count, inserted.rows) == (5, ())
    deleted = await runner.run("DELETE FROM t WHERE n > $1::integer RETURNING n", ("3",))
    assert deleted.count == 2
    assert sorted(as_text(row[0]) for row in deleted.rows) == ["4", "5"]
    assert as_float_array((await runner.run("SELECT '{}'::float8[]")).rows[0][0]) == ()


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00")), max_size=6))
async def test_text_array_round_trips_through_the_server(runner: Runner, values: list[str]) -> None:
    result = await runner.run(
        "SELECT v FROM unnest($1::text[]) WITH ORDINALITY AS t (v, i) ORDER BY i",
        (text_array(values),),
    )
    assert [as_text(row[0]) for row in result.rows] == values


async def test_a_refused_statement_is_a_state_error_and_its_connection_serves_on(
    runner: Runner,
) -> None:
    await runner.run("SELECT 1")
    [pid] = runner.backends()
    with pytest.raises(StateError, match='relation "nowhere" does not exist') as refused:
        await runner.run("SELECT * FROM nowhere")
    assert "\n" not in str(refused.value)
    assert (await runner.run("SELECT 2")).rows == ((b"2",),)
    assert runner.backends() == {pid}  # the same connection, still in autocommit
    first, second = [(await runner.run("SELECT txid_current()")).rows for _ in range(2)]
    assert first != second  # each statement its own transaction: autocommit


async def test_an_idle_connection_the_server_ended_is_replaced(runner: Runner) -> None:
    await runner.run("SELECT 1")
    [pid] = runner.backends()
    with admin_connection(runner.url) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # and waits
    assert (await runner.run("SELECT 3")).rows == ((b"3",),)
    [new] = runner.backends()
    assert new != pid


async def test_a_statement_past_its_deadline_fails_and_its_connection_is_closed(
    pg_backend: PostgresBackend,
) -> None:
    runner = Runner(pg_backend.url, call_seconds=0.2)
    try:
        await runner.run("SELECT 1")
        [pid] = runner.backends()
        with pytest.raises(StateError, match=r"no answer within 0\.2 s"):
            await runner.run("SELECT pg_sleep($1::float8)", (str(SLOW_SECONDS),))
        assert (await runner.run("SELECT pg_backend_pid()")).rows != ((str(pid).encode(),),)
    finally:
        await runner.aclose()


async def test_a_cancelled_call_closes_its_connection_and_the_loop_ran_meanwhile(
    runner: Runner,
) -> None:
    await runner.run("SELECT 1")
    [pid] = runner.backends()
    turns = 0

    async def spin() -> None:  # other tasks run while a statement is out
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spin)
        with trio.move_on_after(0.3):
            await runner.run("SELECT pg_sleep($1::float8)", (str(SLOW_SECONDS),))
        nursery.cancel_scope.cancel()
    assert turns >= 10
    assert (await runner.run("SELECT pg_backend_pid()")).rows != ((str(pid).encode(),),)


async def test_at_most_size_connections_and_a_bounded_wait_for_one(
    pg_backend: PostgresBackend,
) -> None:
    runner = Runner(pg_backend.url, size=1, connect_seconds=0.2)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, "SELECT pg_sleep(0.5)")
            await trio.testing.wait_all_tasks_blocked()  # it holds the one connection
            with pytest.raises(StateError, match=r"no connection within 0\.2 s"):
                await runner.run("SELECT 6")
        assert len(runner.backends()) == 1
        results = []

        async def one(n: int) -> None:
            results.append(as_text((await runner.run("SELECT $1::integer", (str(n),))).rows[0][0]))

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(one, n)
        assert sorted(results) == ["0", "1", "2", "3", "4"]
        assert len(runner.backends()) == 1
    finally:
        await runner.aclose()
    assert runner.backends() == set()


async def test_a_parameter_that_is_not_utf8_text_is_refused(runner: Runner) -> None:
    with pytest.raises(StateError, match="not UTF-8 text"):
        await runner.run("SELECT $1::text", ("\ud800",))
    assert (await runner.run("SELECT 7")).rows == ((b"7",),)


async def test_a_closed_runner_refuses_calls(runner: Runner) -> None:
    await runner.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await runner.run("SELECT 1")


@pytest.mark.parametrize(
    ("text", "problem"),
    [(None, "unexpected NULL"), (b"1.5", "not an array")],
)
def test_reading_a_value_of_another_shape_is_an_error(text: bytes | None, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        as_float_array(text)


async def test_a_call_on_an_idle_connection_found_broken_runs_once_more(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends an idle connection just after the check that would have seen it
    (here the check is made to miss): the call runs again on a new connection."""
    await runner.run("SELECT 1")
    [pid] = runner.backends()
    with admin_connection(runner.url) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # and waits
    monkeypatch.setattr(nonblocking, "socket_readable", lambda fd: False)
    assert (await runner.run("SELECT pg_backend_pid()")).rows != ((str(pid).encode(),),)
    [new] = runner.backends()
    assert new != pid


async def test_a_server_that_is_not_there_is_tried_again_until_connect_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connection refused: tried again (a restarting server is waited for), and the call
    fails with libpq's reason once connect_seconds have passed."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempts = 0
    connect = nonblocking._connect

    def counted(*args: Any) -> psycopg.Connection[Any]:
        nonlocal attempts
        attempts += 1
        return connect(*args)

    monkeypatch.setattr(nonblocking, "_connect", counted)
    runner = Runner(f"postgresql://postgres@127.0.0.1:{port}/test", connect_seconds=0.5)
    with pytest.raises(StateError, match=r"Connection refused|connection failed"):
        await runner.run("SELECT 1")
    assert attempts >= 2
    await runner.aclose()


async def test_statements_are_prepared_once_per_connection_and_bounded(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        assert (await runner.run("SELECT $1::integer + 1", ("1",))).rows == ((b"2",),)
    listed = "SELECT statement FROM pg_prepared_statements ORDER BY statement"
    prepared = await runner.run(listed)  # prepared too, before it runs
    assert [as_text(row[0]) for row in prepared.rows] == ["SELECT $1::integer + 1", listed]
    monkeypatch.setattr(nonblocking, "MAX_PREPARED_STATEMENTS", 3)
    for n in range(3):  # one more text prepared (the third), the others run unprepared
        result = await runner.run(f"SELECT {n} + $1::integer", ("1",))
        assert result.rows == ((str(n + 1).encode(),),)
    prepared = await runner.run("SELECT count(*) FROM pg_prepared_statements")
    assert prepared.rows == ((b"3",),)
