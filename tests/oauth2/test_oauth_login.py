"""``popproxy oauth-login`` end to end against a loopback provider (popproxy.oauth2.flows).

The command runs as a real process. The code flow's browser is simulated: the test
reads the authorization URL the command prints, has the provider approve it (as a
consent would), and makes the redirect request to the command's loopback listener
with the code, as the browser would. The device flow: the test reads the user code
the command prints and approves it at the provider, as the user would on a phone.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from oauth2_provider import FakeProvider, running_provider

from popproxy.config import OAuth2Config, OAuth2Provider
from popproxy.oauth2.flows import Pkce, authorization_url, s256

REPO = Path(__file__).resolve().parents[2]
# How long the command may take in all; the flows themselves take about a second.
COMMAND_DEADLINE_SECONDS = 30


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with running_provider(FakeProvider(device_interval=1)) as p:
        yield p


def start_login(provider: FakeProvider, out: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "popproxy",
        "oauth-login",
        "--client-id",
        provider.client_id,
        "--token-url",
        provider.token_url,
        "--scope",
        "mail offline_access",
        "--authorization-url",
        f"{provider.base}/authorize",
        "--device-authorization-url",
        f"{provider.base}/device",
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_line_with(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stderr is not None
    for line in proc.stderr:
        if needle in line:
            return line.strip()
    raise AssertionError(f"no line with {needle!r}; exit {proc.wait()}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=COMMAND_DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def assert_token_file(path: Path, provider: FakeProvider, user: str) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert provider.refresh_tokens[token] == user


def test_code_flow_with_a_simulated_browser(provider: FakeProvider, tmp_path: Path) -> None:
    out = tmp_path / "alice.token"
    proc = start_login(provider, out)
    url = read_line_with(proc, "/authorize?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert query["client_id"] == provider.client_id
    assert query["scope"] == "mail offline_access"
    redirect = query["redirect_uri"]
    assert redirect.startswith("http://127.0.0.1:")  # RFC 8252 §7.3 loopback redirect
    # The user consents; the provider sends the browser back with the code.
    code = provider.approve_code("alice", query["code_challenge"], redirect)
    back = f"{redirect}?{urllib.parse.urlencode({'code': code, 'state': query['state']})}"
    with urllib.request.urlopen(back, timeout=10) as page:
        assert b"you can close this window" in page.read()
    code_, err = finish(proc)
    assert code_ == 0, err
    assert "mode 0600" in err
    assert_token_file(out, provider, "alice")


def test_code_flow_ignores_a_redirect_with_the_wrong_state(
    provider: FakeProvider, tmp_path: Path
) -> None:
    out = tmp_path / "alice.token"
    proc = start_login(provider, out)
    url = read_line_with(proc, "/authorize?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    redirect = query["redirect_uri"]
    forged = provider.approve_code("mallory", query["code_challenge"], redirect)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{redirect}?code={forged}&state=guess", timeout=10)
    # The real redirect still completes the login.
    code = provider.approve_code("alice", query["code_challenge"], redirect)
    urllib.request.urlopen(f"{redirect}?code={code}&state={query['state']}", timeout=10).close()
    status, err = finish(proc)
    assert status == 0, err
    assert_token_file(out, provider, "alice")


def test_code_flow_refused_consent(provider: FakeProvider, tmp_path: Path) -> None:
    out = tmp_path / "alice.token"
    proc = start_login(provider, out)
    url = read_line_with(proc, "/authorize?")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    denied = urllib.parse.urlencode({"error": "access_denied", "state": query["state"]})
    urllib.request.urlopen(f"{query['redirect_uri']}?{denied}", timeout=10).close()
    status, err = finish(proc)
    assert status == 1
    assert "access_denied" in err
    assert not out.exists()


def test_device_flow_end_to_end(provider: FakeProvider, tmp_path: Path) -> None:
    out = tmp_path / "ms.token"
    proc = start_login(provider, out, "--device")
    line = read_line_with(proc, "enter the code")
    assert f"{provider.base}/device-login" in line
    user_code = line.rsplit(" ", 1)[-1]
    provider.approve_device(user_code, "bob")
    status, err = finish(proc)
    assert status == 0, err
    assert_token_file(out, provider, "bob")


def test_the_written_token_refreshes(provider: FakeProvider, tmp_path: Path) -> None:
    """The file oauth-login wrote is what the server reads: its token refreshes."""
    out = tmp_path / "t"
    proc = start_login(provider, out, "--device")
    provider.approve_device(read_line_with(proc, "enter the code").rsplit(" ", 1)[-1], "carol")
    assert finish(proc)[0] == 0
    before = provider.refreshes
    status, answer = provider.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": out.read_text().strip(),
            "client_id": provider.client_id,
        }
    )
    assert status == 200 and provider.refreshes == before + 1
    assert provider.user_of(str(answer["access_token"])) == "carol"


def run_oauth_login(*args: str) -> subprocess.CompletedProcess[str]:
    """``popproxy oauth-login ARGS`` run to its end, under COMMAND_DEADLINE_SECONDS."""
    return subprocess.run(
        [sys.executable, "-m", "popproxy", "oauth-login", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=COMMAND_DEADLINE_SECONDS,
        check=False,
    )


def test_usage_errors(tmp_path: Path) -> None:
    proc = run_oauth_login("--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "give --provider" in proc.stderr
    proc = run_oauth_login(
        *("--client-id", "x", "--token-url", "http://example.net/token", "--scope", "s"),
        *("--out", str(tmp_path / "x")),
    )
    assert proc.returncode == 2
    assert "expected an https URL" in proc.stderr


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    # RFC 7636 Appendix B: this verifier gives this challenge.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    pkce = Pkce.new()
    assert 43 <= len(pkce.verifier) <= 128 and s256(pkce.verifier) == pkce.challenge


def test_google_authorization_url_asks_for_offline_access() -> None:
    oauth2 = OAuth2Config(
        client_id="id",
        token_url="https://oauth2.googleapis.com/token",
        scope="https://mail.google.com/",
        provider=OAuth2Provider.GOOGLE,
        authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
    )
    url = authorization_url(oauth2, "http://127.0.0.1:5/", "st", Pkce("v" * 43, "c"))
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["access_type"] == "offline" and query["prompt"] == "consent"
    assert query["scope"] == "https://mail.google.com/"
