"""``popproxy oauth-login``: getting an account's first refresh token, interactively.

Two flows, both ending with the refresh token written to a file with mode 0600
(``token_file.write_refresh_token``):

- The authorization-code flow with PKCE (RFC 6749 §4.1, RFC 7636) and a loopback
  redirect (RFC 8252 §7.3): popproxy listens on 127.0.0.1 and a free port, prints
  the authorization URL, the user opens it in any browser on this machine and
  consents, the provider redirects the browser to the loopback address with the
  code, and popproxy exchanges the code (with the PKCE verifier) for tokens.
  Google allows its mail scope only in this flow.
- The device flow (RFC 8628): popproxy prints a URL and a short code, the user
  enters the code there from any device, and popproxy polls the token endpoint
  until the grant comes. What headless Microsoft 365 setups use.

Blocking and standard library only: this runs from the command line, never in the
server. The ``say`` callback prints the instructions (cli.py sends them to stderr).
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from popproxy.config import OAuth2Config, OAuth2Provider
from popproxy.oauth2.grants import TokenError, TokenErrorKind, TokenGrant, parse_token_answer
from popproxy.oauth2.http import HttpUnavailable, post_form
from popproxy.oauth2.token_file import write_refresh_token

# How long the user has to consent in the browser, and how long the device flow polls
# at most (RFC 8628 §3.2: the device code's own expires_in is shorter if it says so).
LOGIN_TIMEOUT_SECONDS = 600.0
# Each HTTP request of a flow (the same bound as the server's token requests).
HTTP_TIMEOUT_SECONDS = 10.0
# RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default"; §3.5:
# slow_down adds 5 seconds to the interval.
DEVICE_DEFAULT_INTERVAL_SECONDS = 5
DEVICE_SLOW_DOWN_SECONDS = 5
# RFC 7636 §4.1: the verifier is 43 to 128 characters; 64 random octets give 86.
PKCE_VERIFIER_OCTETS = 64

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 §3.4

Say = Callable[[str], None]


class LoginFailed(Exception):
    """The flow did not give a refresh token; the message says why, for the user."""


@dataclass(frozen=True, slots=True)
class Pkce:
    """A PKCE verifier and its S256 challenge (RFC 7636 §4.1, §4.2)."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        """A fresh random verifier."""
        verifier = secrets.token_urlsafe(PKCE_VERIFIER_OCTETS)
        return cls(verifier, s256(verifier))


def s256(verifier: str) -> str:
    """``BASE64URL(SHA256(verifier))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _client_fields(oauth2: OAuth2Config) -> dict[str, str]:
    fields = {"client_id": oauth2.client_id}
    if oauth2.client_secret is not None:
        fields["client_secret"] = oauth2.client_secret.reveal().decode("utf-8", "replace")
    return fields


def _token_request(oauth2: OAuth2Config, fields: Mapping[str, str]) -> TokenGrant:
    try:
        answer = post_form(
            oauth2.token_url, {**fields, **_client_fields(oauth2)}, timeout=HTTP_TIMEOUT_SECONDS
        )
    except HttpUnavailable as exc:
        raise TokenError(TokenErrorKind.UNAVAILABLE, str(exc)[:64]) from None
    return parse_token_answer(answer.status, answer.body)


def _save(grant: TokenGrant, out: Path, say: Say) -> None:
    if grant.refresh_token is None:
        raise LoginFailed(
            "the provider granted no refresh token: check that the scope allows offline"
            " access (Microsoft: offline_access) and that the consent was given anew"
        )
    write_refresh_token(out, grant.refresh_token)
    say(f"Wrote the refresh token to {out} (mode 0600).")


# ---------------------------------------------------------------------------------------
# Authorization code with PKCE and a loopback redirect


def authorization_url(oauth2: OAuth2Config, redirect_uri: str, state: str, pkce: Pkce) -> str:
    """The URL the user opens to consent (RFC 6749 §4.1.1, RFC 7636 §4.3). Google gets
    ``access_type=offline`` and ``prompt=consent``: without them it grants no refresh token
    on a second consent."""
    if oauth2.authorization_url is None:
        raise LoginFailed("no authorization_url: give one, or a provider")
    query = {
        "response_type": "code",
        "client_id": oauth2.client_id,
        "redirect_uri": redirect_uri,
        "scope": oauth2.scope,
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
    }
    if oauth2.provider is OAuth2Provider.GOOGLE:
        query |= {"access_type": "offline", "prompt": "consent"}
    separator = "&" if "?" in oauth2.authorization_url else "?"
    return oauth2.authorization_url + separator + urllib.parse.urlencode(query)


@dataclass
class _Redirect:
    """What the browser brought back to the loopback listener."""

    params: dict[str, str] | None = None


def _redirect_handler(expected_state: str, got: _Redirect, done: threading.Event) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(parts.query))
            if params.get("state") != expected_state or not ("code" in params or "error" in params):
                # Not the redirect (a favicon, a stray request): it does not end the wait.
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            got.params = params
            ok = "code" in params
            text = (
                "popproxy got the authorization; you can close this window."
                if ok
                else f"The authorization failed: {params.get('error', '')}"
            )
            body = f"<!doctype html><title>popproxy</title><p>{html.escape(text)}</p>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            done.set()

    return Handler


def code_flow(
    oauth2: OAuth2Config,
    out: Path,
    say: Say,
    *,
    port: int = 0,
    timeout: float = LOGIN_TIMEOUT_SECONDS,
) -> None:
    """Run the authorization-code flow with PKCE; write the refresh token to ``out``.

    Listens on 127.0.0.1 (``port`` 0: a free one, RFC 8252 §7.3), prints the URL to
    open, waits up to ``timeout`` seconds for the redirect, checks its ``state``
    (RFC 6749 §10.12) and exchanges the code. Raises ``LoginFailed``.
    """
    pkce = Pkce.new()
    state = secrets.token_urlsafe(24)
    got = _Redirect()
    done = threading.Event()
    server = HTTPServer(("127.0.0.1", port), _redirect_handler(state, got, done))
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, name="oauth-redirect", daemon=True)
    thread.start()
    try:
        say("Open this URL in a browser on this machine and allow access:")
        say(authorization_url(oauth2, redirect_uri, state, pkce))
        if not done.wait(timeout):
            raise LoginFailed(f"no authorization arrived within {timeout:.0f} seconds")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    params = got.params or {}
    if "code" not in params:
        detail = params.get("error_description") or params.get("error", "no code")
        raise LoginFailed(f"the provider refused the authorization: {detail}")
    fields = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": redirect_uri,
        "code_verifier": pkce.verifier,
    }
    try:
        grant = _token_request(oauth2, fields)
    except TokenError as exc:
        raise LoginFailed(f"the token endpoint refused the code: {exc.code}") from None
    _save(grant, out, say)


# ---------------------------------------------------------------------------------------
# Device authorization grant


def device_flow(
    oauth2: OAuth2Config,
    out: Path,
    say: Say,
    *,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = LOGIN_TIMEOUT_SECONDS,
) -> None:
    """Run the device flow (RFC 8628 §3.1-§3.5); write the refresh token to ``out``.

    Prints where to go and the code to enter, then polls the token endpoint at the
    interval the provider asks for (slowing down when told to) until the grant, a
    refusal, or the device code's expiry. Raises ``LoginFailed``.
    """
    if oauth2.device_authorization_url is None:
        raise LoginFailed("no device_authorization_url: give one, or a provider")
    try:
        answer = post_form(
            oauth2.device_authorization_url,
            {**_client_fields(oauth2), "scope": oauth2.scope},
            timeout=HTTP_TIMEOUT_SECONDS,
        )
    except HttpUnavailable as exc:
        raise LoginFailed(f"cannot reach the device authorization endpoint: {exc}") from None
    body = answer.body
    device_code = body.get("device_code")
    user_code = body.get("user_code")
    # Google calls it verification_url.
    uri = body.get("verification_uri_complete") or body.get("verification_uri")
    uri = uri or body.get("verification_url")
    if answer.status != 200 or not all(isinstance(v, str) for v in (device_code, user_code, uri)):
        raise LoginFailed(
            f"the device authorization endpoint refused: {body.get('error', answer.status)}"
        )
    assert isinstance(device_code, str) and isinstance(user_code, str)
    interval = body.get("interval")
    wait = float(interval) if isinstance(interval, int) and interval > 0 else 0.0
    wait = wait or DEVICE_DEFAULT_INTERVAL_SECONDS
    expires = body.get("expires_in")
    limit = min(timeout, float(expires)) if isinstance(expires, int) and expires > 0 else timeout
    say(f"Go to {uri} and enter the code {user_code}")
    message = body.get("message")
    if isinstance(message, str):
        say(message)
    fields = {"grant_type": DEVICE_GRANT_TYPE, "device_code": device_code}
    deadline = time.monotonic() + limit
    while True:
        sleep(wait)
        if time.monotonic() > deadline:
            raise LoginFailed("the code expired before the sign-in was completed")
        try:
            grant = _token_request(oauth2, fields)
        except TokenError as exc:
            match exc.kind, exc.code:
                case TokenErrorKind.PENDING, "slow_down":
                    wait += DEVICE_SLOW_DOWN_SECONDS
                case TokenErrorKind.PENDING, _:
                    pass
                case TokenErrorKind.UNAVAILABLE, _:
                    pass  # RFC 8628 §3.5 lets a client keep polling through a hiccup
                case _:
                    raise LoginFailed(f"the sign-in was refused: {exc.code}") from None
            continue
        _save(grant, out, say)
        return
