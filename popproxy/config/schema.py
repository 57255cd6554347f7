"""The config file's schema: the top level and each section, checked and built.

Every problem is reported, not just the first, each naming the file, the key path
and what was expected. The ``users`` and ``limits`` sections are built in their own
modules, the rules of ``rules_dir`` by ``rules.py``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from popproxy.config.fields import ConfigSection
from popproxy.config.gateway import build_gateway
from popproxy.config.limits import build_limits
from popproxy.config.model import (
    Config,
    ConfigError,
    IPNetwork,
    ListenerConfig,
    MetricsConfig,
    SourceFile,
    StateConfig,
    TlsConfig,
    TlsMode,
    UpstreamAuth,
    UpstreamConfig,
    UpstreamLogin,
)
from popproxy.config.oauth2 import build_oauth2
from popproxy.config.reader import read_yaml
from popproxy.config.rules import load_rules
from popproxy.config.secrets import read_secret
from popproxy.config.users import build_users
from popproxy.policy import Policy
from popproxy.policy.fields import Issues, describe, keys_of
from popproxy.pop3.limits import MAX_REPLY_LINE_OCTETS, REPLY_LINE_CEILING_OCTETS

# An upstream's name is a metrics label value and a log field: short and printable
# (the same bound as popproxy.metrics.MAX_NAME_CHARS; tests/test_config.py keeps them equal).
MAX_UPSTREAM_NAME_CHARS = 128
MAX_PORT = 65535
# Upstream default ports: RFC 1939 §3 (110) and RFC 8314 §7.3 (995).
POP3_PORT = 110
POP3S_PORT = 995

_SQLITE_SCHEME = "sqlite:///"
# The URL schemes libpq accepts for PostgreSQL (popproxy.state.POSTGRES_SCHEMES).
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# A QUIT waits this long at most for the store's write lock; longer is a typo (and
# sqlite's busy_timeout is an int of milliseconds).
MAX_STATE_BUSY_TIMEOUT_SECONDS = 3600
# state.lease_seconds: at least 3 s (renewed every third, each renewal a round trip
# that may take a second on a busy network), at most an hour (a dead instance's
# mailboxes wait this long).
MIN_LEASE_SECONDS = 3
MAX_LEASE_SECONDS = 3600
# state.audit_retention_days: a century is more than any retention; the bound keeps the
# trim's cutoff a valid datetime (as `state prune --gone-days`).
MAX_AUDIT_RETENTION_DAYS = 36_500

_TOP_KEYS = keys_of(Config)
_LISTENER_KEYS = keys_of(ListenerConfig)
_TLS_KEYS = keys_of(TlsConfig)
_UPSTREAM_KEYS = keys_of(UpstreamConfig)
_STATE_KEYS = keys_of(StateConfig)
_METRICS_KEYS = keys_of(MetricsConfig)


def load_config(path: Path, *, rules_from: Path | None = None) -> Config:
    """Read, parse and validate the YAML config at ``path``.

    Raises :class:`ConfigError` with every problem found. Reads secret files and
    environment variables named by ``upstream_password_file``/``_env``. ``rules_from``
    reads the rule files from another directory than the config's ``rules_dir`` (a
    snapshot's copy of them), which stays the config's value.
    """
    issues = Issues(str(path))
    sources: list[SourceFile] = []
    data = read_yaml(path, issues, sources=sources)
    config = None
    if data is not None:
        config = _build(path, data, issues, sources, rules_from)
    if issues.items or config is None:
        raise ConfigError(tuple(issues.items))
    return config


def _build(
    source: Path,
    data: object,
    issues: Issues,
    sources: list[SourceFile],
    rules_from: Path | None,
) -> Config | None:
    top = ConfigSection.of(issues, "", data, _TOP_KEYS)
    if top is None:
        return None
    listen = _listeners(top)
    tls = _tls(top)
    allow_plaintext = top.boolean("allow_plaintext_auth")
    upstreams = _upstreams(top)
    _refuse_loops(top, listen, upstreams)
    users = build_users(top, upstreams)
    state = _state(top)
    rules_dir = top.path_value("rules_dir", kind="dir")
    metrics = _metrics(top)
    limits = build_limits(top)
    rules = (
        load_rules(rules_from or rules_dir, top, issues, sources) if rules_dir is not None else ()
    )
    trusted_proxies = _trusted_proxies(top, listen)
    gateway = build_gateway(top)
    snapshot_dir = top.path_value("snapshot_dir", kind=None)
    if issues.items:
        return None
    accounts = {user.name: user.upstream for user in users.values()}
    return Config(
        source=source,
        listen=tuple(listen),
        tls=tls,
        allow_plaintext_auth=bool(allow_plaintext),
        upstreams=MappingProxyType(upstreams),
        users=MappingProxyType(users),
        state=state,
        rules_dir=rules_dir,
        metrics=metrics,
        limits=limits,
        policy=Policy(rules, accounts),
        trusted_proxies=trusted_proxies,
        gateway=gateway,
        snapshot_dir=snapshot_dir,
        sources=tuple(sources),
    )


def _listeners(top: ConfigSection) -> list[ListenerConfig]:
    value = top.raw("listen")
    what = "a list of listeners ({address, port, tls})"
    if value is None:
        top.error("listen", f"missing; expected {what}")
        return []
    if not isinstance(value, list) or not value:
        top.error("listen", f"expected {what}, got {describe(value)}")
        return []
    out: list[ListenerConfig] = []
    bound: dict[tuple[str, int], int] = {}
    for index, item in enumerate(value):
        path = f"listen[{index}]"
        section = ConfigSection.of(top.issues, path, item, _LISTENER_KEYS)
        if section is None:
            continue
        address = section.host("address", required=True)
        port = section.integer("port", lo=0, hi=MAX_PORT, required=True)
        tls = section.tls_mode("tls", required=True)
        proxy_protocol = section.boolean("proxy_protocol")
        reuse_port = section.boolean("reuse_port")
        if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            section.error("reuse_port", "SO_REUSEPORT is not available on this system")
        if tls is not None and tls is not TlsMode.NONE and not top.has("tls"):
            section.error(
                "tls",
                f"tls: {tls.value} needs the top-level tls section (cert_file and key_file)",
            )
        if address is None or port is None or tls is None:
            continue
        if port != 0 and (address, port) in bound:
            section.error(
                "port", f"{address}:{port} is already used by listen[{bound[address, port]}]"
            )
            continue
        bound[address, port] = index
        out.append(
            ListenerConfig(
                address,
                port,
                tls,
                proxy_protocol=bool(proxy_protocol),
                reuse_port=bool(reuse_port),
            )
        )
    return out


def _trusted_proxies(top: ConfigSection, listen: Sequence[ListenerConfig]) -> tuple[IPNetwork, ...]:
    """``trusted_proxies``: addresses or CIDR networks (``192.0.2.10``, ``10.0.0.0/8``,
    ``2001:db8::/32``); required, and not empty, when a listener has ``proxy_protocol``."""
    value = top.raw("trusted_proxies")
    what = "a list of IP addresses or networks (CIDR, such as 10.0.0.0/8)"
    networks: list[IPNetwork] = []
    if value is not None and not isinstance(value, list):
        top.error("trusted_proxies", f"expected {what}, got {describe(value)}")
        return ()
    bad = False
    for index, item in enumerate(value or []):
        network = _network(item)
        if network is None:
            hint = ""
            if isinstance(item, str) and "/" in item:
                hint = " (host bits set? write the network address, such as 10.0.0.0/8)"
            top.issues.add(
                f"trusted_proxies[{index}]",
                f"expected an IP address or a CIDR network, got {describe(item)}{hint}",
            )
            bad = True
        else:
            networks.append(network)
    if not networks and not bad:
        for index, listener in enumerate(listen):
            if listener.proxy_protocol:
                top.error(
                    "trusted_proxies",
                    f"listen[{index}] has proxy_protocol: true, which needs trusted_proxies:"
                    " the addresses of the load balancers allowed to send the header",
                )
                break
    return tuple(networks)


def _network(item: object) -> IPNetwork | None:
    if not isinstance(item, str) or "%" in item:  # a zone index names no network
        return None
    try:
        return ipaddress.ip_network(item)
    except ValueError:
        return None


def _is_local_host(host: str) -> bool:
    """Whether ``host`` surely names this machine, decided without DNS."""
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse_loops(
    top: ConfigSection, listen: Sequence[ListenerConfig], upstreams: Mapping[str, UpstreamConfig]
) -> None:
    """An upstream that is one of popproxy's own listeners would make it proxy to itself.

    Caught here where the config shows it; the session also recognizes its own greeting
    (docs/proxy.md, loop detection), which catches loops through DNS names.
    """
    for name, upstream in upstreams.items():
        for listener in listen:
            if listener.port != upstream.port or listener.port == 0:
                continue
            same = upstream.host == listener.address or (
                _is_local_host(upstream.host) and _is_local_host(listener.address)
            )
            if same:
                top.issues.add(
                    f"upstreams.{name}.host",
                    f"{upstream.host}:{upstream.port} is popproxy's own listener"
                    f" ({listener.address}:{listener.port}); popproxy would proxy to itself",
                )


def _tls(top: ConfigSection) -> TlsConfig | None:
    if not top.has("tls"):
        return None
    section = ConfigSection.of(top.issues, "tls", top.raw("tls"), _TLS_KEYS)
    if section is None:
        return None
    cert = section.path_value("cert_file", kind="file", required=True)
    key = section.path_value("key_file", kind="file", required=True)
    if cert is None or key is None:
        return None
    return TlsConfig(cert, key)


def _upstreams(top: ConfigSection) -> dict[str, UpstreamConfig]:
    out: dict[str, UpstreamConfig] = {}
    for name, item in top.named_sections("upstreams"):
        if not 0 < len(name) <= MAX_UPSTREAM_NAME_CHARS or not name.isprintable():
            top.issues.add(
                f"upstreams.{name}",
                f"an upstream name must be 1-{MAX_UPSTREAM_NAME_CHARS} printable characters"
                " (it is a label in the metrics)",
            )
            continue
        section = ConfigSection.of(top.issues, f"upstreams.{name}", item, _UPSTREAM_KEYS)
        if section is None:
            continue
        host = section.host("host", required=True)
        tls = section.tls_mode("tls")
        if tls is None and not section.has("tls"):
            tls = TlsMode.IMPLICIT
        port = section.integer("port", lo=1, hi=MAX_PORT)
        if port is None and not section.has("port") and tls is not None:
            port = POP3S_PORT if tls is TlsMode.IMPLICIT else POP3_PORT
        verify = section.boolean("verify")
        ca_file = section.path_value("ca_file", kind="file")
        login = section.choice("login", UpstreamLogin)
        auth = section.choice("auth", UpstreamAuth)
        if section.has("auth") and auth is None:
            oauth2 = None  # the choice was reported; its oauth2 section would mislead
        else:
            oauth2 = build_oauth2(section, auth or UpstreamAuth.PASS)
        if auth not in (None, UpstreamAuth.PASS) and section.has("login"):
            section.error("login", "only meaningful with auth: pass")
        default = UpstreamConfig(name, "-", 0, TlsMode.NONE)
        connect_timeout = section.seconds("connect_timeout_seconds", positive=True)
        login_timeout = section.seconds("login_timeout_seconds", positive=True)
        command_timeout = section.seconds("command_timeout_seconds", positive=True)
        keepalive = section.seconds("keepalive_interval_seconds", positive=True)
        reply_line = section.integer(
            "max_reply_line_bytes", lo=MAX_REPLY_LINE_OCTETS, hi=REPLY_LINE_CEILING_OCTETS
        )
        exclusive = section.boolean("exclusive_sessions")
        if tls is TlsMode.NONE and (verify is not None or ca_file is not None):
            key = "verify" if verify is not None else "ca_file"
            section.error(key, "only meaningful with tls: starttls or implicit")
        if host is None or tls is None or port is None:
            continue
        if (auth is None and section.has("auth")) or (
            auth not in (None, UpstreamAuth.PASS) and oauth2 is None
        ):
            continue
        out[name] = UpstreamConfig(
            name=name,
            host=host,
            port=port,
            tls=tls,
            verify=True if verify is None else verify,
            ca_file=ca_file,
            login=login or UpstreamLogin.AUTO,
            auth=auth or UpstreamAuth.PASS,
            oauth2=oauth2,
            connect_timeout_seconds=connect_timeout or default.connect_timeout_seconds,
            login_timeout_seconds=login_timeout or default.login_timeout_seconds,
            command_timeout_seconds=command_timeout or default.command_timeout_seconds,
            keepalive_interval_seconds=keepalive or default.keepalive_interval_seconds,
            max_reply_line_bytes=reply_line or default.max_reply_line_bytes,
            exclusive_sessions=default.exclusive_sessions if exclusive is None else exclusive,
        )
    return out


def _state(top: ConfigSection) -> StateConfig:
    if not top.has("state"):
        return _absolute_state(StateConfig())
    section = ConfigSection.of(top.issues, "state", top.raw("state"), _STATE_KEYS)
    if section is None:
        return StateConfig()
    default = StateConfig()
    busy_timeout = section.seconds("busy_timeout_seconds", positive=True)
    if busy_timeout is not None and busy_timeout > MAX_STATE_BUSY_TIMEOUT_SECONDS:
        section.error(
            "busy_timeout_seconds",
            f"expected at most {MAX_STATE_BUSY_TIMEOUT_SECONDS} seconds, got {busy_timeout:g}",
        )
        busy_timeout = None
    integrity_check = section.boolean("integrity_check")
    lease = section.seconds("lease_seconds", positive=True)
    if lease is not None and not MIN_LEASE_SECONDS <= lease <= MAX_LEASE_SECONDS:
        section.error(
            "lease_seconds",
            f"expected {MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS} seconds, got {lease:g}",
        )
        lease = None
    retention = section.integer("audit_retention_days", lo=1, hi=MAX_AUDIT_RETENTION_DAYS)
    options = StateConfig(
        busy_timeout_seconds=busy_timeout or default.busy_timeout_seconds,
        integrity_check=default.integrity_check if integrity_check is None else integrity_check,
        lease_seconds=lease or default.lease_seconds,
        audit_retention_days=retention or default.audit_retention_days,
    )
    what = (
        "a state URL such as sqlite:///var/popproxy-state.db"
        " or postgresql://popproxy@db.example.net:5432/popproxy"
    )
    url = section.string("url", what=what) or default.url
    if url.startswith(_POSTGRES_SCHEMES):
        password = read_secret(section, "password_file", "password_env")
        problem = postgres_url_problem(url)
        if problem is not None:
            section.error("url", problem)
            return options
        if integrity_check:
            section.error("integrity_check", "applies to a sqlite store only")
        return replace(options, url=url, password=password)
    for key in ("password_file", "password_env", "lease_seconds"):
        if section.has(key):
            section.error(key, "applies to a postgresql:// state URL only")
    if not url.startswith(_SQLITE_SCHEME) or url == _SQLITE_SCHEME:
        section.error("url", f"expected {what}, got {url!r}")
        return options
    return _absolute_state(replace(options, url=url))


def postgres_url_problem(url: str) -> str | None:
    """Why a ``postgresql://`` state URL is refused, or None.

    A password in it (``user:secret@host``, or a ``password`` query option) is
    refused: it belongs in ``state.password_file`` or ``state.password_env``, never in
    the config's text (house rule for secrets). The text names no part of the URL.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return "expected postgresql://USER@HOST:PORT/DATABASE; the URL does not parse"
    options = {item.partition("=")[0] for item in parts.query.split("&")}
    if parts.password is not None or "password" in options:
        return (
            "the URL must not contain a password; put it in a file named by"
            " state.password_file, or name an environment variable with state.password_env"
        )
    return None


def _absolute_state(state: StateConfig) -> StateConfig:
    """Resolve a relative sqlite path against the working directory (4 slashes = absolute)."""
    path = state.sqlite_path
    if path is None or path.is_absolute():
        return state
    return replace(state, url="sqlite:///" + str(Path.cwd() / path))


def _metrics(top: ConfigSection) -> MetricsConfig | None:
    if not top.has("metrics"):
        return None
    section = ConfigSection.of(top.issues, "metrics", top.raw("metrics"), _METRICS_KEYS)
    if section is None:
        return None
    default = MetricsConfig()
    address = section.host("address")
    port = section.integer("port", lo=0, hi=MAX_PORT)
    return MetricsConfig(
        address=default.address if address is None else address,
        port=default.port if port is None else port,
    )
