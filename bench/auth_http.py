"""The ``auth_http`` endpoint that nginx's mail proxy asks before it proxies a login.

nginx's mail module authenticates nothing itself: for every login it sends an HTTP
request with ``Auth-User`` and ``Auth-Pass`` (URL-escaped) and is told where to
proxy (nginx.org, ngx_mail_auth_http_module: "Protocol"). This endpoint answers
``Auth-Status: OK`` with ``Auth-Server`` and ``Auth-Port`` pointing at the bench's
Dovecot and ``Auth-User``/``Auth-Pass`` set to the Dovecot account's, for a login
with popproxy's user name and password: nginx maps users as popproxy does.

It runs as a process of its own, started by the harness (``bench/peers.py``), not
as a thread of the load generator: at hundreds of logins a second a thread would
take the load generator's GIL during the nginx side only and slow its measurement.
Its CPU time counts towards nginx's side, as popproxy's own login check counts
towards popproxy's.

    python -m bench.auth_http CREDENTIALS_JSON

``CREDENTIALS_JSON`` maps ``user`` to ``{"password", "server", "port",
"upstream_user", "upstream_password"}``. The port it listens on (loopback, chosen
by the kernel) is printed as the first line of standard output.
"""

from __future__ import annotations

import http.server
import json
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Connections nginx may have waiting for this single-threaded server (one per login
# in flight; the bench runs at most a few hundred at once).
LISTEN_BACKLOG = 1024
# A request must arrive whole within this (nginx sends it in one write).
REQUEST_TIMEOUT_SECONDS = 10.0
# What nginx is told on a failed login: wait this long before answering the client.
FAILED_LOGIN_WAIT_SECONDS = 1


@dataclass(frozen=True, slots=True)
class Route:
    """Where one user's login goes, and with which credentials."""

    password: str
    server: str
    port: int
    upstream_user: str
    upstream_password: str


def answer(routes: Mapping[str, Route], headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The response headers for one request's ``Auth-*`` headers (ngx_mail_auth_http_module).

    A known user with the right password gets OK and its route; anything else is
    refused with ``Auth-Wait``, as nginx's documentation shows.
    """
    user = urllib.parse.unquote(headers.get("Auth-User", ""))
    password = urllib.parse.unquote(headers.get("Auth-Pass", ""))
    route = routes.get(user)
    if route is None or route.password != password:
        return [
            ("Auth-Status", "Invalid login or password"),
            ("Auth-Wait", str(FAILED_LOGIN_WAIT_SECONDS)),
        ]
    return [
        ("Auth-Status", "OK"),
        ("Auth-Server", route.server),
        ("Auth-Port", str(route.port)),
        ("Auth-User", urllib.parse.quote(route.upstream_user)),
        ("Auth-Pass", urllib.parse.quote(route.upstream_password)),
    ]


def load_routes(path: Path) -> dict[str, Route]:
    """The credentials file the harness wrote (see the module docstring)."""
    data = json.loads(path.read_text())
    return {user: Route(**entry) for user, entry in data.items()}


class _Server(http.server.HTTPServer):
    request_queue_size = LISTEN_BACKLOG
    routes: Mapping[str, Route] = {}


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        assert isinstance(self.server, _Server)
        self.send_response(200)
        for name, value in answer(self.server.routes, dict(self.headers.items())):
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Nothing: a line per login would cost more than the answer."""


def main(argv: list[str]) -> int:
    server = _Server((LOOPBACK, 0), _Handler)
    server.routes = load_routes(Path(argv[0]))
    print(server.server_address[1], flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
