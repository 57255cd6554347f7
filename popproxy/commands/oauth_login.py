"""The settings ``popproxy oauth-login`` signs in with (docs/oauth2.md).

They come from a provider's preset, or from an upstream's ``oauth2`` section in a
config; each option given on the command line overrides them, and the endpoints are
checked as the config's keys are (https, or http to loopback only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from popproxy.config import ConfigError, OAuth2Config, OAuth2Provider, load_config
from popproxy.config.oauth2 import endpoint_problem, preset
from popproxy.secret import Secret


class UsageError(Exception):
    """The options do not make a usable set of settings; the message says why."""


@dataclass(frozen=True, slots=True)
class LoginOptions:
    """What the command line gave (None: not given)."""

    provider: OAuth2Provider | None = None
    config: Path | None = None
    upstream: str | None = None
    client_id: str | None = None
    client_secret_file: Path | None = None
    tenant: str | None = None
    scope: str | None = None
    token_url: str | None = None
    authorization_url: str | None = None
    device_authorization_url: str | None = None


def _from_config(options: LoginOptions) -> OAuth2Config | None:
    if options.config is None:
        return None
    if options.upstream is None:
        raise UsageError("-c needs --upstream NAME")
    try:
        config = load_config(options.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    upstream = config.upstreams.get(options.upstream)
    if upstream is None or upstream.oauth2 is None:
        raise UsageError(
            f"{options.config} has no upstream {options.upstream!r} with an oauth2 section"
        )
    return upstream.oauth2


def login_settings(options: LoginOptions) -> OAuth2Config:
    """The settings to sign in with: option, else the config's upstream, else the preset.
    Raises ``UsageError``."""
    base = _from_config(options)
    provider = options.provider
    if base is None and provider is None and options.token_url is None:
        raise UsageError("give --provider, or -c and --upstream, or --token-url and --scope")
    defaults = preset(provider, options.tenant) if provider is not None else None
    client_secret = base.client_secret if base is not None else None
    if options.client_secret_file is not None:
        try:
            raw = options.client_secret_file.read_bytes().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {options.client_secret_file}: {exc.strerror}") from None
        client_secret = Secret(raw) if raw else None

    def pick(option: str | None, key: str) -> str | None:
        if option is not None:
            return option
        if base is not None and getattr(base, key) is not None:
            return str(getattr(base, key))
        return str(getattr(defaults, key)) if defaults is not None else None

    client_id = options.client_id or (base.client_id if base is not None else None)
    token_url = pick(options.token_url, "token_url")
    scope = pick(options.scope, "scope")
    if client_id is None or token_url is None or scope is None:
        raise UsageError(
            "--client-id, and a token URL and scope (from --provider or the options), are needed"
        )
    oauth2 = OAuth2Config(
        client_id=client_id,
        token_url=token_url,
        scope=scope,
        provider=provider or (base.provider if base is not None else None),
        tenant=options.tenant or (base.tenant if base is not None else None),
        client_secret=client_secret,
        authorization_url=pick(options.authorization_url, "authorization_url"),
        device_authorization_url=pick(options.device_authorization_url, "device_authorization_url"),
    )
    for url in (oauth2.token_url, oauth2.authorization_url, oauth2.device_authorization_url):
        if url is not None and (problem := endpoint_problem(url)) is not None:
            raise UsageError(problem)
    return oauth2
