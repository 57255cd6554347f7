"""``popproxy oauth-login``: its options, and the settings it signs in with (docs/oauth2.md).

They come from a provider's preset, or from an upstream's ``oauth2`` section in a
config; each option given on the command line overrides them, and the endpoints are
checked as the config's keys are (https, or http to loopback only).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from popproxy.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands
from popproxy.config import ConfigError, OAuth2Config, OAuth2Provider, load_config
from popproxy.config.oauth2 import endpoint_problem, preset
from popproxy.secret import Secret


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy oauth-login`` and its options."""
    login = commands.add_parser(
        "oauth-login",
        help="get an upstream account's OAuth2 refresh token (docs/oauth2.md)",
        description=(
            "Sign in to the mail provider as the account's owner and write the refresh"
            " token to --out (mode 0600), for upstream_refresh_token_file. The settings come"
            " from --provider and the options, or from an upstream of a config (-c, --upstream);"
            " options given override them."
        ),
    )
    login.add_argument("--provider", choices=[p.value for p in OAuth2Provider])
    login.add_argument("-c", "--config", metavar="FILE", help="take the settings from this config")
    login.add_argument("--upstream", metavar="NAME", help="the config's upstream (with -c)")
    login.add_argument("--client-id", metavar="ID")
    login.add_argument("--client-secret-file", metavar="FILE")
    login.add_argument("--tenant", metavar="TENANT", help="Microsoft directory (default: common)")
    login.add_argument("--scope", metavar="SCOPES")
    login.add_argument("--token-url", metavar="URL")
    login.add_argument("--authorization-url", metavar="URL")
    login.add_argument("--device-authorization-url", metavar="URL")
    login.add_argument(
        "--device",
        action="store_true",
        help="the device flow: enter a code on any device (default: a browser on this machine)",
    )
    login.add_argument("--out", required=True, metavar="FILE", help="the refresh-token file")


def run(args: argparse.Namespace) -> int:
    """Sign in and write the refresh token; the instructions go to stderr."""
    from popproxy.oauth2.flows import LoginFailed, code_flow, device_flow
    from popproxy.oauth2.token_file import TokenFileError

    def path(value: str | None) -> Path | None:
        return Path(value) if value is not None else None

    options = LoginOptions(
        provider=OAuth2Provider(args.provider) if args.provider else None,
        config=path(args.config),
        upstream=args.upstream,
        client_id=args.client_id,
        client_secret_file=path(args.client_secret_file),
        tenant=args.tenant,
        scope=args.scope,
        token_url=args.token_url,
        authorization_url=args.authorization_url,
        device_authorization_url=args.device_authorization_url,
    )
    try:
        oauth2 = login_settings(options)
    except UsageError as exc:
        print(f"popproxy oauth-login: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    flow = device_flow if args.device else code_flow
    try:
        flow(oauth2, Path(args.out), say)
    except (LoginFailed, TokenFileError) as exc:
        print(f"popproxy oauth-login: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_OK


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
