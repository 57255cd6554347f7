"""An upstream's ``auth`` and ``oauth2`` keys: token logins, the provider presets (docs/oauth2.md).

``auth: xoauth2`` or ``oauthbearer`` needs an ``oauth2`` section; ``provider:
google`` or ``microsoft`` fills in the token endpoint, the scope and the endpoints
``popproxy oauth-login`` uses, and any key given overrides the preset. Without a
provider, ``token_url`` and ``scope`` are required. The client secret, if the app
has one, is read at load from ``client_secret_file``, like every other secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from popproxy.config.fields import ConfigSection
from popproxy.config.model import OAuth2Config, OAuth2Provider, UpstreamAuth
from popproxy.config.reader import read_bounded
from popproxy.policy.fields import describe, keys_of
from popproxy.secret import Secret

# A client secret file holds one short string; anything bigger is the wrong file.
MAX_CLIENT_SECRET_FILE_BYTES = 64 * 1024
# RFC 6749 leaves client ids and scopes unbounded; real ones are under 100 characters.
MAX_OAUTH2_TEXT_CHARS = 1024

_OAUTH2_KEYS = keys_of(OAuth2Config)
# Hosts where a token endpoint may be plain http: this machine (tests, a local relay).
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class Preset:
    """A provider's endpoints and the scope that grants POP access."""

    token_url: str
    authorization_url: str
    device_authorization_url: str
    scope: str


def preset(provider: OAuth2Provider, tenant: str | None = None) -> Preset:
    """The endpoints and scope of ``provider`` (Microsoft's in ``tenant``, default ``common``).

    Google: its OAuth 2.0 endpoints and the full-mail scope, the only one that allows
    POP. Microsoft: the identity platform v2.0 endpoints of the tenant, the POP scope of
    Exchange Online and ``offline_access`` (without it there is no refresh token).
    """
    match provider:
        case OAuth2Provider.GOOGLE:
            return Preset(
                token_url="https://oauth2.googleapis.com/token",
                authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
                device_authorization_url="https://oauth2.googleapis.com/device/code",
                scope="https://mail.google.com/",
            )
        case OAuth2Provider.MICROSOFT:
            base = f"https://login.microsoftonline.com/{tenant or 'common'}/oauth2/v2.0"
            return Preset(
                token_url=f"{base}/token",
                authorization_url=f"{base}/authorize",
                device_authorization_url=f"{base}/devicecode",
                scope="https://outlook.office.com/POP.AccessAsUser.All offline_access",
            )


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` cannot be a token or authorization endpoint, or None.

    RFC 6749 §3.1 and §3.2 require TLS; plain http is allowed only to this machine.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"expected an https URL, got {describe(url)}"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return None
    return f"expected an https URL (http only to 127.0.0.1, ::1 or localhost), got {url!r}"


def build_oauth2(upstream: ConfigSection, auth: UpstreamAuth | None) -> OAuth2Config | None:
    """The ``oauth2`` section of an upstream, checked against its ``auth`` (problems go to
    the upstream's issues)."""
    token_auth = auth in (UpstreamAuth.XOAUTH2, UpstreamAuth.OAUTHBEARER)
    if not upstream.has("oauth2"):
        if token_auth and auth is not None:
            upstream.missing(
                "oauth2", f"an oauth2 section for auth: {auth.value} (provider, client_id, ...)"
            )
        return None
    if not token_auth:
        upstream.error("oauth2", "only meaningful with auth: xoauth2 or oauthbearer")
        return None
    section = ConfigSection.of(
        upstream.issues, upstream.at("oauth2"), upstream.raw("oauth2"), _OAUTH2_KEYS
    )
    if section is None:
        return None
    errors_before = len(section.issues.items)
    provider = section.choice("provider", OAuth2Provider)
    tenant = _text(section, "tenant")
    if tenant is not None and provider is not OAuth2Provider.MICROSOFT:
        section.error("tenant", "only meaningful with provider: microsoft")
    client_id = _text(section, "client_id", required=True)
    defaults = preset(provider, tenant) if provider is not None else None
    urls: dict[str, str | None] = {}
    for key in ("token_url", "authorization_url", "device_authorization_url"):
        url = _text(section, key, required=key == "token_url" and defaults is None)
        if url is not None and (problem := endpoint_problem(url)) is not None:
            section.error(key, problem)
        urls[key] = url or (getattr(defaults, key) if defaults is not None else None)
    scope = _text(section, "scope", required=defaults is None)
    client_secret = _client_secret(section)
    token_url = urls["token_url"]
    if len(section.issues.items) > errors_before or client_id is None or token_url is None:
        return None
    return OAuth2Config(
        client_id=client_id,
        token_url=token_url,
        scope=scope or (defaults.scope if defaults is not None else ""),
        provider=provider,
        tenant=tenant,
        client_secret=client_secret,
        authorization_url=urls["authorization_url"],
        device_authorization_url=urls["device_authorization_url"],
    )


def _text(section: ConfigSection, key: str, *, required: bool = False) -> str | None:
    value = section.string(key, required=required)
    if value is None:
        return None
    if len(value) > MAX_OAUTH2_TEXT_CHARS or not value.isprintable():
        section.error(key, f"expected at most {MAX_OAUTH2_TEXT_CHARS} printable characters")
        return None
    return value


def _client_secret(section: ConfigSection) -> Secret | None:
    path = section.path_value("client_secret_file", kind="file")
    if path is None:
        return None
    raw = read_bounded(path, MAX_CLIENT_SECRET_FILE_BYTES)
    if isinstance(raw, OSError):
        section.error("client_secret_file", f"cannot read {path}: {raw.strerror or raw}")
        return None
    if raw is None:
        section.error(
            "client_secret_file",
            f"expected a file holding the client secret (at most"
            f" {MAX_CLIENT_SECRET_FILE_BYTES} bytes)",
        )
        return None
    raw = raw.strip()
    if not raw:
        section.error("client_secret_file", f"expected the client secret in {path}; it is empty")
        return None
    return Secret(raw)
