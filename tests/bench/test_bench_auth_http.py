"""bench/auth_http.py: the auth_http endpoint nginx's mail proxy asks, by its protocol."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.auth_http import LOOPBACK, Route, _Handler, _Server, answer, load_routes

ROUTES = {"p-user0": Route("secret", "127.0.0.2", 4110, "user0", "pw user0/é")}
# Every wait of these tests on the loopback server.
TIMEOUT_SECONDS = 10.0


def test_a_known_user_gets_ok_and_the_dovecot_route_and_credentials_escaped() -> None:
    headers = dict(answer(ROUTES, {"Auth-User": "p-user0", "Auth-Pass": "secret"}))
    assert headers == {
        "Auth-Status": "OK",
        "Auth-Server": "127.0.0.2",
        "Auth-Port": "4110",
        "Auth-User": "user0",
        "Auth-Pass": "pw%20user0/%C3%A9",
    }


def test_escaped_credentials_from_nginx_are_unescaped() -> None:
    routes = {"a b": Route("p%ss", "127.0.0.1", 110, "a", "b")}
    headers = dict(answer(routes, {"Auth-User": "a%20b", "Auth-Pass": "p%25ss"}))
    assert headers["Auth-Status"] == "OK"


@pytest.mark.parametrize(
    "request_headers",
    [
        {"Auth-User": "p-user0", "Auth-Pass": "wrong"},
        {"Auth-User": "nobody", "Auth-Pass": "secret"},
        {},
    ],
)
def test_anything_else_is_refused_with_a_wait_and_no_route(
    request_headers: dict[str, str],
) -> None:
    headers = dict(answer(ROUTES, request_headers))
    assert headers["Auth-Status"] == "Invalid login or password"
    assert headers["Auth-Wait"] == "1"
    assert "Auth-Server" not in headers and "Auth-Pass" not in headers


def test_routes_load_from_the_file_the_harness_writes(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    entry = {
        "password": "secret",
        "server": "127.0.0.2",
        "port": 4110,
        "upstream_user": "user0",
        "upstream_password": "pw user0/é",
    }
    path.write_text(json.dumps({"p-user0": entry}))
    assert load_routes(path) == ROUTES


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server((LOOPBACK, 0), _Handler)
    srv.routes = ROUTES
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(TIMEOUT_SECONDS)
    srv.server_close()


def test_the_server_answers_a_request_as_nginx_sends_it(server: _Server) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, server.server_address[1], timeout=TIMEOUT_SECONDS)
    conn.request(
        "GET",
        "/auth",
        headers={
            "Auth-Method": "plain",
            "Auth-User": "p-user0",
            "Auth-Pass": "secret",
            "Auth-Protocol": "pop3",
            "Auth-Login-Attempt": "1",
            "Client-IP": "127.0.0.1",
        },
    )
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.getheader("Auth-Status") == "OK"
    assert (reply.getheader("Auth-Server"), reply.getheader("Auth-Port")) == ("127.0.0.2", "4110")
    assert reply.getheader("Auth-User") == "user0"
    conn.close()
