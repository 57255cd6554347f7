"""The config model: frozen values, one dataclass per section (DESIGN.md, "Config").

A section's YAML keys are its dataclass's field names, in field order (what an
"unknown key" message lists); a field read from other keys, or from none, says so
in its metadata (``read_from``). So a new key is one new field, plus its check in
``schema.py``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from popproxy.policy import Policy
from popproxy.policy.fields import ConfigIssue, read_from
from popproxy.pop3.limits import (
    MAX_COMMAND_LINE_OCTETS,
    MAX_REPLY_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
    MAX_SASL_PAYLOAD_OCTETS,
)
from popproxy.secret import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsMode(enum.Enum):
    """How a listener or upstream connection uses TLS."""

    NONE = "none"  # plain text
    STARTTLS = "starttls"  # plain, upgraded with STLS (RFC 2595 §4)
    IMPLICIT = "implicit"  # TLS from the first byte (RFC 8314 §3.3, port 995)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket. Port 0 asks the OS for a free port (tests)."""

    address: str
    port: int
    tls: TlsMode
    # Every connection starts with a PROXY protocol header (v1 or v2) from one of
    # ``trusted_proxies``; anything else is dropped (docs/operations.md).
    proxy_protocol: bool = False
    # SO_REUSEPORT (Linux, BSD): several popproxy processes bind this same address and
    # port, and the kernel spreads new connections over them (docs/scaling.md).
    reuse_port: bool = False

    @property
    def name(self) -> str:
        """The listener's metric and log label: its TLS mode ("none", "starttls", "implicit")."""
        return self.tls.value


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The server certificate chain and key (PEM files) for STLS and implicit TLS."""

    cert_file: Path
    key_file: Path


class UpstreamLogin(enum.Enum):
    """How popproxy logs in to an upstream (RFC 1939 §7 USER/PASS, RFC 5034 + 4616 PLAIN)."""

    AUTO = "auto"  # AUTH PLAIN if the upstream's CAPA lists SASL PLAIN, else USER/PASS
    USER = "user"
    PLAIN = "plain"


class UpstreamAuth(enum.Enum):
    """What popproxy logs in upstream with: a stored password, or an OAuth2 access token
    (docs/oauth2.md) in the XOAUTH2 or OAUTHBEARER (RFC 7628) SASL mechanism."""

    PASS = "pass"
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


class OAuth2Provider(enum.Enum):
    """A provider whose endpoints and scope popproxy knows (``oauth2.provider``)."""

    GOOGLE = "google"
    MICROSOFT = "microsoft"


@dataclass(frozen=True, slots=True)
class OAuth2Config:
    """Where and as which client popproxy gets access tokens for an upstream (RFC 6749).

    ``provider`` fills in the endpoints and the scope (config/oauth2.py has the
    presets); keys given override it. The authorization and device endpoints are
    only for ``popproxy oauth-login``.
    """

    client_id: str
    token_url: str
    scope: str
    provider: OAuth2Provider | None = None
    # Microsoft's directory: "common" (work and personal accounts), "organizations",
    # "consumers", or the tenant's id or domain.
    tenant: str | None = None
    # Public clients (a native app) have none; read at load, never inline.
    client_secret: Secret | None = field(default=None, metadata=read_from("client_secret_file"))
    authorization_url: str | None = None  # RFC 6749 §3.1, for the code flow
    device_authorization_url: str | None = None  # RFC 8628 §3.1, for the device flow


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """A POP3 server popproxy logs in to (proxy mode, docs/proxy.md)."""

    name: str = field(metadata=read_from())  # its key in upstreams
    host: str
    port: int
    tls: TlsMode
    verify: bool = True  # check the certificate and the host name
    ca_file: Path | None = None  # trust these CAs instead of the system store
    login: UpstreamLogin = UpstreamLogin.AUTO  # with auth: pass
    auth: UpstreamAuth = UpstreamAuth.PASS
    oauth2: OAuth2Config | None = None  # with auth: xoauth2 or oauthbearer
    # TCP connect, TLS handshake excluded.
    connect_timeout_seconds: float = 15
    # From connect to the listing taken after login: greeting, CAPA, STLS, login, UIDL, LIST.
    login_timeout_seconds: float = 30
    # Each reply afterwards, and each read inside a message body.
    command_timeout_seconds: float = 60
    # A NOOP upstream after this long without a command, so a client idling in
    # TRANSACTION keeps its upstream session; RFC 1939 §3 lets a server log out an
    # idle client after 10 minutes, some providers do it sooner.
    keepalive_interval_seconds: float = 120
    # The longest status or listing line read from this upstream, line end included
    # (RFC 2449 §4: 512; raise it only for a provider that breaks the RFC).
    max_reply_line_bytes: int = MAX_REPLY_LINE_OCTETS
    # One session per upstream account at a time (RFC 1939 §4's exclusive lock): the
    # next waits up to limits.account_wait_seconds, then gets -ERR [IN-USE]. False lets
    # sessions on one account overlap, as Dovecot does by default (docs/rules.md).
    exclusive_sessions: bool = True


@dataclass(frozen=True, slots=True)
class FetchSource:
    """One upstream account the gateway polls into a user's Maildir (docs/gateway.md).

    The same account keys as a proxy-mode user's: a password, or for an upstream with
    ``auth: xoauth2`` or ``oauthbearer`` a refresh-token file (exactly one of the two).
    The store keys what it fetched by (local user, ``upstream``, ``upstream_user``).
    """

    upstream: str
    upstream_user: str
    # Never inline: read at load from a file or an environment variable.
    upstream_password: Secret | None = field(
        default=None, metadata=read_from("upstream_password_file", "upstream_password_env")
    )
    # For a token upstream, instead of a password: the file holding the refresh token
    # (`popproxy oauth-login` writes it; rotation rewrites it).
    upstream_refresh_token_file: Path | None = None

    @property
    def label(self) -> str:
        """How logs and ``check-config`` name the source: ``upstream/upstream_user``."""
        return f"{self.upstream}/{self.upstream_user}"


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A local user: a password hash, and either a local Maildir or an upstream account.

    A Maildir user may list ``fetch`` sources: the gateway fills the Maildir from them.
    """

    name: str = field(metadata=read_from())  # its key in users
    password_hash: str
    maildir: Path | None = None
    upstream: str | None = None
    upstream_user: str | None = None
    # Never inline: read at load from a file or an environment variable.
    upstream_password: Secret | None = field(
        default=None, metadata=read_from("upstream_password_file", "upstream_password_env")
    )
    # For an upstream with auth: xoauth2 or oauthbearer, instead of a password: the file
    # holding the refresh token (`popproxy oauth-login` writes it; rotation rewrites it).
    upstream_refresh_token_file: Path | None = None
    fetch: tuple[FetchSource, ...] = ()
    # Over this many octets in the Maildir (new/, cur/ and tmp/), the gateway stops
    # fetching for this user (docs/gateway.md); None: no limit of its own.
    max_maildir_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """How the gateway schedules its polls (docs/gateway.md, Scheduling)."""

    # Each source is polled this long after its last poll ended, plus a random share
    # of jitter_seconds, so that sources configured together do not poll together.
    interval_seconds: float = 300
    jitter_seconds: float = 30
    # Polls running at once over all sources, and connections to one upstream at once
    # (providers limit concurrent POP3 logins per client address; Gmail allows 15).
    max_concurrent_polls: int = 4
    max_connections_per_upstream: int = 2
    # RETRs sent ahead of the one being read, on one connection (RFC 2449 §6.6
    # PIPELINING; without it one at a time). Bodies are streamed whatever the depth.
    pipelining_depth: int = 8
    # After a failed poll the next waits backoff_initial_seconds, doubling per failure
    # up to backoff_max_seconds. A rejected login starts at auth_backoff_seconds: a
    # provider locks an account that keeps failing (Gmail after a few attempts).
    backoff_initial_seconds: float = 60
    backoff_max_seconds: float = 3600
    auth_backoff_seconds: float = 3600
    auth_backoff_max_seconds: float = 86400


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where popproxy keeps per-user state (SQLAlchemy-style URL; docs/state.md):
    ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB`` with libpq's options."""

    url: str = "sqlite:///popproxy-state.db"
    # How long a write waits for another writer (another session's commit, a prune
    # batch, another process on the same file) before it fails: sqlite's busy_timeout.
    busy_timeout_seconds: float = 10
    # Run sqlite's PRAGMA integrity_check at open (reads the whole file) and refuse a
    # damaged store.
    integrity_check: bool = False
    # PostgreSQL only: how long a lease (one session or poll per mailbox across
    # instances) outlives its holder's last renewal; an instance that dies frees its
    # mailboxes within this bound (docs/scaling.md). Renewed every third of it.
    lease_seconds: float = 30
    # How long the audit log (every hide and upstream deletion, `popproxy audit`) keeps
    # a row: `state prune` and a periodic task of `popproxy run` delete older ones.
    audit_retention_days: int = 400
    # PostgreSQL's password: never in the URL, read at load from a file or an
    # environment variable (None: libpq's own ways, such as ~/.pgpass).
    password: Secret | None = field(
        default=None, metadata=read_from("password_file", "password_env")
    )

    @property
    def sqlite_path(self) -> Path | None:
        """The sqlite database file for a ``sqlite:///`` URL (None otherwise, or for :memory:).

        Three slashes then a relative path is relative to the working directory; four
        slashes is an absolute path.
        """
        if not self.url.startswith("sqlite:///"):
            return None
        rest = self.url[len("sqlite:///") :]
        if rest == ":memory:":
            return None
        return Path(rest)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus exporter's listening address."""

    address: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Timeouts and counts that bound every session."""

    idle_timeout_seconds: float = 600  # RFC 1939 §3: at least 10 minutes
    login_timeout_seconds: float = 60
    max_sessions: int = 1000
    # Sessions from one client address (an IPv6 /64) at once, logged in or not: one
    # host behind NAT runs a few clients polling a few mailboxes each, so 50 is far
    # above honest use and keeps one address from taking all of max_sessions.
    max_sessions_per_ip: int = 50
    shutdown_grace_seconds: float = 10
    max_bad_commands: int = 10  # consecutive bad commands before closing
    auth_failure_delay_seconds: float = 2.0  # Dovecot's auth_failure_delay
    send_timeout_seconds: float = 60  # a client that does not read for this long is dropped
    # Line and payload bounds of the client leg, in octets with the line end; the
    # floors and ceilings (and why) are in popproxy/pop3/limits.py.
    max_command_line_bytes: int = MAX_COMMAND_LINE_OCTETS  # RFC 2449 §4
    max_sasl_line_bytes: int = MAX_SASL_LINE_OCTETS  # an AUTH line or SASL response
    max_sasl_payload_bytes: int = MAX_SASL_PAYLOAD_OCTETS  # decoded (RFC 5034 §4)
    # A second session on an upstream account waits this long for the first one to
    # end, then gets -ERR [IN-USE] (RFC 1939 §4 exclusive access; docs/rules.md).
    account_wait_seconds: float = 10
    # Throttling and lockout (popproxy/auth/throttle.py, docs/security.md). The penalty
    # is Dovecot's: 2 s after a failure from an address, doubling, at most 15 s.
    auth_penalty_initial_seconds: float = 2.0  # Dovecot's AUTH_PENALTY_INIT_SECS
    auth_penalty_max_seconds: float = 15.0  # Dovecot's AUTH_PENALTY_MAX_SECS
    # Dovecot has no lockout of its own (it leaves that to fail2ban). NIST SP 800-63B
    # §5.2.2 allows at most 100 consecutive failures; 10 in 10 minutes is far from what
    # a person typing or a client with a stale password produces (a retry of the same
    # wrong password is not counted again).
    auth_lockout_failures: int = 10  # per user name; 0: no lockout
    # Per client address: one address may carry many honest users (a NAT, a webmail
    # front end), so it takes more; enough to stop one address spraying guesses.
    auth_lockout_address_failures: int = 100  # 0: no lockout
    auth_lockout_window_seconds: float = 600
    auth_lockout_seconds: float = 900
    # Known-good sources (popproxy/known_sources.py, docs/security.md): the client
    # addresses (IPv6: /64) a user logged in from within this many days are spared the
    # user-name lockout (not the address penalty or the address lockout), so a stranger
    # who locks a name out does not lock its owner out (OWASP's lockout advice). 0: off.
    auth_known_source_days: int = 30
    # The most recent sources remembered per user (a laptop, a phone, home and work).
    auth_known_sources_per_user: int = 10
    # Logins waiting for a hash thread beyond those hashing; more get -ERR [SYS/TEMP]
    # at once. At about 40 default-cost scrypt checks a second on two threads, 100
    # waiting logins clear in under 3 s, well within login_timeout_seconds.
    auth_max_pending_verifications: int = 100
    # The verified-credential cache (popproxy/auth/cache.py): one entry per user that
    # logged in within the TTL (Dovecot's auth_cache_ttl default); 0 turns it off.
    auth_cache_size: int = 1000
    auth_cache_ttl_seconds: float = 3600


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file a config was loaded from, as it was read: the config file, each rule file
    (``popproxy run`` keeps a copy of them, popproxy/config/snapshot.py)."""

    path: Path
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. Mappings are read-only."""

    source: Path = field(metadata=read_from())  # the file it was loaded from
    listen: tuple[ListenerConfig, ...]
    tls: TlsConfig | None
    allow_plaintext_auth: bool
    upstreams: Mapping[str, UpstreamConfig]
    users: Mapping[str, UserConfig]
    state: StateConfig
    rules_dir: Path | None
    metrics: MetricsConfig | None
    limits: LimitsConfig
    # Every rule of rules_dir, loaded with the config and replaced with it on reload.
    policy: Policy = field(default_factory=Policy.empty, metadata=read_from())
    # The networks allowed to send a PROXY protocol header (proxy_protocol listeners).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    # Where ``popproxy run`` keeps a copy of the files it loaded, for ``check-config
    # --against-running`` (None: beside a sqlite state file, else none).
    snapshot_dir: Path | None = None
    # The files read to build this config, as read (not a setting).
    sources: tuple[SourceFile, ...] = field(
        default=(), compare=False, repr=False, metadata=read_from()
    )

    @property
    def gateway_users(self) -> tuple[UserConfig, ...]:
        """The users with ``fetch`` sources, in config order."""
        return tuple(user for user in self.users.values() if user.fetch)

    @property
    def uses_state(self) -> bool:
        """Whether ``run`` uses the state store: the sessions of users served from an
        upstream, gateway polls (``fetch`` sources), and, while known sources are on
        (``limits.auth_known_source_days``, popproxy/known_sources.py), every user's
        successful logins, Maildir users' included."""
        users = self.users.values()
        if any(user.upstream is not None or user.fetch for user in users):
            return True
        return self.limits.auth_known_source_days > 0 and bool(users)


class ConfigError(Exception):
    """A config file or a rule file has problems; ``issues`` holds all of them, in file order."""

    def __init__(self, issues: tuple[ConfigIssue, ...]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues
