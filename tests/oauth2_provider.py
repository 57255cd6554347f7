"""A small OAuth2 provider on loopback for the tests: token, device, and introspection endpoints.

A real HTTP server (the standard library's, in a thread) on 127.0.0.1 and a free
port, so popproxy's token client and Dovecot's ``oauth2`` passdb talk to it over
sockets as they would to Google or Microsoft:

- ``POST /token``: ``refresh_token`` (RFC 6749 §6; rotates the refresh token when
  ``rotate`` is set), ``authorization_code`` with PKCE S256 (RFC 6749 §4.1.3, RFC 7636
  §4.6) and ``urn:ietf:params:oauth:grant-type:device_code`` (RFC 8628 §3.4).
- ``POST /device``: the device authorization request (RFC 8628 §3.1).
- ``/introspect``: RFC 7662-style introspection for Dovecot, by POST (``token=``),
  by GET with ``Authorization: Bearer``, or by GET with the token at the end of the URL.

Access tokens live ``lifetime`` seconds of the real clock. ``down`` makes every token
request fail with 503; ``revoke`` forgets a refresh token. Counters say what was asked.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Code:
    user: str
    challenge: str
    redirect_uri: str
    client_id: str


@dataclass
class _Device:
    user: str
    client_id: str
    approved: bool = False


@dataclass
class FakeProvider:
    """The provider's state; every field may be changed by a test while it runs."""

    lifetime: float = 3600.0
    rotate: bool = False
    down: bool = False
    client_id: str = "popproxy-test-client"
    client_secret: str | None = None
    device_interval: int = 1
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token -> user
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # -> user, expiry
    codes: dict[str, _Code] = field(default_factory=dict)
    devices: dict[str, _Device] = field(default_factory=dict)  # device_code -> grant
    refreshes: int = 0  # refresh_token grants answered with a token
    token_requests: int = 0  # every POST /token
    introspections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    port: int = 0

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return f"{self.base}/token"

    def grant(self, user: str) -> str:
        """A new refresh token for ``user`` (what a consent would give)."""
        token = f"rt-{next(self._ids)}-{secrets.token_urlsafe(12)}"
        with self.lock:
            self.refresh_tokens[token] = user
        return token

    def revoke(self, refresh_token: str) -> None:
        """Forget a refresh token: its next use gets invalid_grant."""
        with self.lock:
            self.refresh_tokens.pop(refresh_token, None)

    def issue_access(self, user: str) -> str:
        """A new access token for ``user``, valid ``lifetime`` seconds from now."""
        token = f"at-{next(self._ids)}-{secrets.token_urlsafe(16)}"
        with self.lock:
            self.access_tokens[token] = (user, time.monotonic() + self.lifetime)
        return token

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working now (as a provider may end a
        token before its expires_in)."""
        with self.lock:
            self.access_tokens.clear()

    def approve_code(self, user: str, challenge: str, redirect_uri: str) -> str:
        """The code a browser would carry to ``redirect_uri`` after ``user`` consented."""
        code = f"code-{next(self._ids)}"
        with self.lock:
            self.codes[code] = _Code(user, challenge, redirect_uri, self.client_id)
        return code

    def approve_device(self, user_code: str, user: str) -> None:
        """What the user does at the verification URI: the device code is now granted."""
        with self.lock:
            for device_code, device in self.devices.items():
                if device_code.endswith(user_code):
                    device.user = user
                    device.approved = True
                    return
        raise KeyError(user_code)

    def user_of(self, access_token: str) -> str | None:
        """Who ``access_token`` belongs to, if it is live."""
        with self.lock:
            found = self.access_tokens.get(access_token)
        if found is None or time.monotonic() >= found[1]:
            return None
        return found[0]

    # -- the endpoints

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        with self.lock:
            self.token_requests += 1
        if self.down:
            return 503, {"error": "temporarily_unavailable"}
        if form.get("client_id") != self.client_id or (
            self.client_secret is not None and form.get("client_secret") != self.client_secret
        ):
            return 401, {"error": "invalid_client"}
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            with self.lock:
                user = self.refresh_tokens.get(form.get("refresh_token", ""))
                if user is None:
                    return 400, {"error": "invalid_grant"}
                self.refreshes += 1
            answer = self._tokens(user, rotate_from=form["refresh_token"] if self.rotate else None)
            return 200, answer
        if grant_type == "authorization_code":
            with self.lock:
                code = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode("ascii")).digest()
            challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
            if (
                code is None
                or code.challenge != challenge
                or code.redirect_uri != form.get("redirect_uri")
            ):
                return 400, {"error": "invalid_grant"}
            return 200, self._tokens(code.user, new_refresh=True)
        if grant_type == DEVICE_GRANT:
            with self.lock:
                device = self.devices.get(form.get("device_code", ""))
            if device is None:
                return 400, {"error": "expired_token"}
            if not device.approved:
                return 400, {"error": "authorization_pending"}
            with self.lock:
                self.devices.pop(form["device_code"])
            return 200, self._tokens(device.user, new_refresh=True)
        return 400, {"error": "unsupported_grant_type"}

    def _tokens(
        self, user: str, *, rotate_from: str | None = None, new_refresh: bool = False
    ) -> dict[str, object]:
        answer: dict[str, object] = {
            "access_token": self.issue_access(user),
            "token_type": "Bearer",
            "expires_in": self.lifetime,
        }
        if rotate_from is not None:
            self.revoke(rotate_from)
            answer["refresh_token"] = self.grant(user)
        elif new_refresh:
            answer["refresh_token"] = self.grant(user)
        return answer

    def device(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        user_code = f"{next(self._ids):04d}-TEST"
        device_code = f"dc-{secrets.token_urlsafe(8)}-{user_code}"
        with self.lock:
            self.devices[device_code] = _Device("", form["client_id"])
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.base}/device-login",
            "expires_in": 600,
            "interval": self.device_interval,
        }

    def introspect(self, token: str) -> tuple[int, dict[str, object]]:
        with self.lock:
            self.introspections += 1
        user = self.user_of(token)
        if user is None:
            return 200, {"active": False}
        return 200, {"active": True, "username": user, "token_type": "Bearer"}


def _handler(provider: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest captures nothing useful from it

        def _answer(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("ascii", "replace")
            return dict(urllib.parse.parse_qsl(raw))

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            form = self._form()
            if path == "/token":
                self._answer(*provider.token(form))
            elif path == "/device":
                self._answer(*provider.device(form))
            elif path.startswith("/introspect"):
                self._answer(*provider.introspect(form.get("token", "")))
            else:
                self._answer(404, {"error": "not_found"})

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/introspect"):
                auth = self.headers.get("Authorization", "")
                if auth.lower().startswith("bearer "):
                    token = auth[7:].strip()
                else:
                    token = urllib.parse.unquote(path.rsplit("/", 1)[-1])
                self._answer(*provider.introspect(token))
            else:
                self._answer(404, {"error": "not_found"})

    return Handler


@contextmanager
def running_provider(provider: FakeProvider | None = None) -> Iterator[FakeProvider]:
    """Serve ``provider`` (a new one by default) on 127.0.0.1 and a free port."""
    provider = provider or FakeProvider()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(provider))
    server.daemon_threads = True
    provider.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-oauth2", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
