"""YAML config -> a frozen, validated :class:`Config` (DESIGN.md, "Config (the contract)").

Every problem is reported, not just the first, each naming the file, the key path
and what was expected: ``popproxy.yaml: users.alice.password_hash: expected a PHC
hash string``. The YAML reader is strict where YAML 1.1 surprises people:

- duplicate keys are errors (PyYAML keeps the last one silently);
- only ``true``/``false`` are booleans: ``on``/``off``/``yes``/``no`` stay strings,
  and where a boolean is expected they are an error that says to write true/false;
- ``22:22`` is a string, not the base-60 number 1342; ``0755`` is a string, not octal;
  where an integer is expected either is an error;
- dates stay strings.

Secrets are never inline: an upstream password comes from ``upstream_password_file``
or ``upstream_password_env`` and is read here, at load, into a :class:`Secret`.
Relative paths (Maildirs, certificates, rules, the sqlite file) resolve against the
working directory at load time; the loaded config holds absolute paths.
docs/configuration.md lists every key.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import ipaddress
import itertools
import math
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar

import yaml
import yaml.constructor
import yaml.nodes

from popproxy.auth.passwords import PasswordHashError, parse_hash
from popproxy.policy import Action, HeaderMatch, Match, Policy, Rule
from popproxy.policy.rules import (
    MAX_DAYS,
    MAX_MATCH_ITEMS,
    MAX_RULES,
    MAX_SIZE_BYTES,
    compile_header_pattern,
    glob_problem,
    rule_name_problem,
)
from popproxy.pop3.limits import (
    COMMAND_LINE_CEILING_OCTETS,
    MAX_COMMAND_LINE_OCTETS,
    MAX_REPLY_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
    MAX_SASL_PAYLOAD_OCTETS,
    REPLY_LINE_CEILING_OCTETS,
    SASL_LINE_CEILING_OCTETS,
    SASL_PAYLOAD_CEILING_OCTETS,
    SASL_PAYLOAD_FLOOR_OCTETS,
)
from popproxy.pop3.names import login_name_problem
from popproxy.secret import Secret

# A config file is a few kilobytes; this bound keeps a wrong path (a log, a disk
# image) from being read whole into memory.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# A secret file holds one password; anything bigger is the wrong file.
MAX_SECRET_FILE_BYTES = 64 * 1024
# RFC 1035 §2.3.4: a host name is at most 253 characters in text form.
MAX_HOST_CHARS = 253
# An upstream's name is a metrics label value and a log field: short and printable
# (the same bound as popproxy.metrics.MAX_NAME_CHARS; tests/test_config.py keeps them equal).
MAX_UPSTREAM_NAME_CHARS = 128
MAX_PORT = 65535

_STATE_SCHEMES = ("sqlite:///",)
# A QUIT waits this long at most for the store's write lock; longer is a typo (and
# sqlite's busy_timeout is an int of milliseconds).
MAX_STATE_BUSY_TIMEOUT_SECONDS = 3600

_E = TypeVar("_E", bound=enum.Enum)
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


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """A POP3 server popproxy logs in to (proxy mode, docs/proxy.md)."""

    name: str
    host: str
    port: int
    tls: TlsMode
    verify: bool = True  # check the certificate and the host name
    ca_file: Path | None = None  # trust these CAs instead of the system store
    login: UpstreamLogin = UpstreamLogin.AUTO
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
class UserConfig:
    """A local user: a password hash, and either a local Maildir or an upstream account."""

    name: str
    password_hash: str
    maildir: Path | None = None
    upstream: str | None = None
    upstream_user: str | None = None
    upstream_password: Secret | None = None


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where popproxy keeps per-user state (SQLAlchemy-style URL; docs/state.md)."""

    url: str = "sqlite:///popproxy-state.db"
    # How long a write waits for another writer (another session's commit, a prune
    # batch, another process on the same file) before it fails: sqlite's busy_timeout.
    busy_timeout_seconds: float = 10
    # Run sqlite's PRAGMA integrity_check at open (reads the whole file) and refuse a
    # damaged store.
    integrity_check: bool = False

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
    # Logins waiting for a hash thread beyond those hashing; more get -ERR [SYS/TEMP]
    # at once. At about 40 default-cost scrypt checks a second on two threads, 100
    # waiting logins clear in under 3 s, well within login_timeout_seconds.
    auth_max_pending_verifications: int = 100
    # The verified-credential cache (popproxy/auth/cache.py): one entry per user that
    # logged in within the TTL (Dovecot's auth_cache_ttl default); 0 turns it off.
    auth_cache_size: int = 1000
    auth_cache_ttl_seconds: float = 3600


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. Mappings are read-only."""

    source: Path
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
    policy: Policy = field(default_factory=Policy.empty)
    # The networks allowed to send a PROXY protocol header (proxy_protocol listeners).
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where, and what was expected."""

    file: str
    key_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key_path}: {self.message}"


class ConfigError(Exception):
    """A config file or a rule file has problems; ``issues`` holds all of them, in file order."""

    def __init__(self, issues: tuple[ConfigIssue, ...]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def load_config(path: Path) -> Config:
    """Read, parse and validate the YAML config at ``path``.

    Raises :class:`ConfigError` with every problem found. Reads secret files and
    environment variables named by ``upstream_password_file``/``_env``.
    """
    issues = _Issues(str(path))
    data = _read_yaml(path, issues)
    config = None
    if data is not None:
        config = _build(path, data, issues)
    if issues.items or config is None:
        raise ConfigError(tuple(issues.items))
    return config


# -- the YAML reader ------------------------------------------------------------------


_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: no yes/no/on/off, no base 60, no octal 0755."""

    def construct_yaml_int_strict(self, node: yaml.nodes.ScalarNode) -> int:
        """Decimal (or 0x hex) integers only."""
        text = str(self.construct_scalar(node))
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)


# A copy of SafeLoader's table without YAML 1.1's bool, int, float and timestamp rules
# (add_implicit_resolver would otherwise append to the table shared with SafeLoader).
_StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_StrictLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)
_StrictLoader.add_constructor(_INT_TAG, _StrictLoader.construct_yaml_int_strict)

# YAML 1.1 words that some parsers (and PyYAML by default) read as booleans.
_YAML11_BOOLS = frozenset({"y", "yes", "n", "no", "on", "off"})
# YAML 1.1 base-60 numbers such as 22:22 (= 1342) or 1:30:00.
_SEXAGESIMAL_RE = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


def _read_bounded(path: Path, limit: int) -> bytes | OSError | None:
    """At most ``limit`` bytes of ``path``; None if it is longer, the error if unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        return exc
    return None if len(raw) > limit else raw


def _read_yaml(
    path: Path, issues: _Issues, what: str = "config file", limit: int = MAX_CONFIG_BYTES
) -> object | None:
    raw = _read_bounded(path, limit)
    if isinstance(raw, OSError):
        issues.add("(file)", f"cannot read the {what}: {raw.strerror or raw}")
        return None
    if raw is None:
        issues.add("(file)", f"expected a {what} of at most {limit} bytes")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.add("(file)", f"expected UTF-8 text (bad byte at offset {exc.start})")
        return None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            issues.add("(top level)", "expected a mapping of settings, got an empty file")
            return None
        _check_duplicates(node, "", issues, set())
        data: object = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        where = exc.problem_mark or exc.context_mark
        place = f"line {where.line + 1}, column {where.column + 1}" if where else "(file)"
        issues.add(place, f"not valid YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        issues.add("(file)", f"not valid YAML: {exc}")
        return None
    else:
        return data
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, path: str, issues: _Issues, seen: set[int]) -> None:
    """Report every key given twice in one mapping, with its key path and both lines."""
    if id(node) in seen:  # an alias: already checked (and no exponential walk on YAML bombs)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _check_duplicates(value_node, path, issues, seen)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            child = _join(path, key)
            if key in first_line:
                issues.add(
                    child,
                    f"duplicate key (first at line {first_line[key]}, again at line {line});"
                    " give each key once",
                )
            else:
                first_line[key] = line
            _check_duplicates(value_node, child, issues, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{index}]", issues, seen)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- validation helpers ---------------------------------------------------------------


@dataclass(slots=True)
class _Issues:
    file: str
    items: list[ConfigIssue] = field(default_factory=list)

    def add(self, key_path: str, message: str) -> None:
        self.items.append(ConfigIssue(self.file, key_path, message))


def _describe(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "true" if value else "false"
        case int() | float():
            return f"the number {value!r}"
        case str():
            return f"the string {value!r}"
        case list():
            return "a list"
        case dict():
            return "a mapping"
        case _:
            return type(value).__name__


class _Section:
    """A mapping in the config, with typed getters that report problems under its path."""

    def __init__(
        self,
        issues: _Issues,
        path: str,
        data: Mapping[str, object],
        allowed: tuple[str, ...],
        *,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.issues = issues
        self.path = path
        self.data = data
        for key in data:
            if key in allowed:
                continue
            hint = (hints or {}).get(key)
            if hint is None:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                hint = f"unknown key{hint} (expected one of: {', '.join(allowed)})"
            issues.add(self.at(key), hint)

    @classmethod
    def of(
        cls,
        issues: _Issues,
        path: str,
        value: object,
        allowed: tuple[str, ...],
        *,
        hints: Mapping[str, str] | None = None,
    ) -> _Section | None:
        mapping = _as_mapping(issues, path, value)
        if mapping is None:
            return None
        return cls(issues, path, mapping, allowed, hints=hints)

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def error(self, key: str, message: str) -> None:
        self.issues.add(self.at(key), message)

    def _missing(self, key: str, what: str) -> None:
        self.error(key, f"missing; expected {what}")

    def raw(self, key: str) -> object:
        return self.data.get(key)

    def string(self, key: str, *, required: bool = False, what: str = "a string") -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self._missing(key, what)
            return None
        if not isinstance(value, str) or not value:
            self.error(key, f"expected {what}, got {_describe(value)}")
            return None
        return value

    def integer(self, key: str, *, lo: int, hi: int, required: bool = False) -> int | None:
        what = f"an integer {lo}..{hi}"
        value = self.data.get(key)
        if value is None:
            if required:
                self._missing(key, what)
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected {what}, got {_describe(value)}{_number_hint(value)}")
            return None
        if not lo <= value <= hi:
            self.error(key, f"expected {what}, got {value}")
            return None
        return value

    def seconds(self, key: str, *, positive: bool) -> float | None:
        what = "a number of seconds " + ("greater than 0" if positive else "of 0 or more")
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"expected {what}, got {_describe(value)}{_number_hint(value)}")
            return None
        number = float(value)
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            self.error(key, f"expected {what}, got {value!r}")
            return None
        return number

    def choice(self, key: str, enum_type: type[_E]) -> _E | None:
        """A value of a string Enum, written as its value."""
        what = "one of " + ", ".join(str(member.value) for member in enum_type)
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            for member in enum_type:
                if member.value == value:
                    return member
        self.error(key, f"expected {what}, got {_describe(value)}")
        return None

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            hint = ""
            if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
                hint = (
                    f" (write true or false: {value!r} is a YAML 1.1 boolean that"
                    " popproxy reads as a string)"
                )
            self.error(key, f"expected true or false, got {_describe(value)}{hint}")
            return None
        return value

    def tls_mode(self, key: str, *, required: bool = False) -> TlsMode | None:
        what = "one of none, starttls, implicit"
        value = self.data.get(key)
        if value is None:
            if required:
                self._missing(key, what)
            return None
        if isinstance(value, bool):
            self.error(key, f"expected {what}, got {_describe(value)}")
            return None
        try:
            return TlsMode(value)
        except ValueError:
            self.error(key, f"expected {what}, got {_describe(value)}")
            return None

    def path_value(
        self, key: str, *, kind: Literal["file", "dir"] | None, required: bool = False
    ) -> Path | None:
        what = {"file": "the path of a file", "dir": "the path of a directory", None: "a path"}[
            kind
        ]
        text = self.string(key, required=required, what=what)
        if text is None:
            return None
        if "\x00" in text:
            self.error(key, f"expected {what}, got a string with a NUL character")
            return None
        path = Path.cwd() / text
        if kind == "file" and not path.is_file():
            self.error(key, f"expected {what}; {_path_state(path)}")
            return None
        if kind == "dir" and not path.is_dir():
            self.error(key, f"expected {what}; {_path_state(path)}")
            return None
        return path

    def host(self, key: str, *, required: bool = False) -> str | None:
        what = "a host name or IP address"
        text = self.string(key, required=required, what=what)
        if text is None:
            return None
        if not _valid_host(text):
            self.error(key, f"expected {what}, got {_describe(text)}")
            return None
        return text


def _as_mapping(issues: _Issues, path: str, value: object) -> dict[str, object] | None:
    if not isinstance(value, dict):
        issues.add(path or "(top level)", f"expected a mapping, got {_describe(value)}")
        return None
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, bool) or not isinstance(key, str | int):
            issues.add(_join(path, str(key)), f"expected a string key, got {_describe(key)}")
            continue
        out[str(key)] = item
    return out


def _number_hint(value: object) -> str:
    if not isinstance(value, str):
        return ""
    if _SEXAGESIMAL_RE.fullmatch(value):
        return (
            " (YAML 1.1 reads this as a base-60 number; popproxy does not:"
            " write a plain decimal number)"
        )
    if re.fullmatch(r"[-+]?0[0-9]+", value):
        return " (no leading zeros: YAML 1.1 would read this as octal)"
    if re.fullmatch(r"[-+]?[0-9][0-9_.eE+-]*", value):
        return " (write the number without quotes or underscores)"
    return ""


def _path_state(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a directory"
    return f"{path} is not a regular file"


_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _valid_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    if len(text) > MAX_HOST_CHARS:
        return False
    labels = text.removesuffix(".").split(".")
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


# -- retention rules (rules_dir/NN-name.yaml, docs/rules.md) ---------------------------


# A rule file's name: two digits (the order), a dash, a name; nothing else is loaded.
_RULE_FILE_RE = re.compile(r"[0-9]{2}-[A-Za-z0-9._-]+\.yaml")
# RFC 5322 §3.6.8: a header field name is printable US-ASCII without ":".
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# Rule files read from one rules_dir: the two digits of NN-name.yaml give 100 places
# in the order; more files than that is a generated tree, not a policy.
MAX_RULE_FILES = 100
# A rule file holds a few rules (a rule is a few hundred bytes); this keeps a wrong
# file in rules_dir from being read whole.
MAX_RULE_FILE_BYTES = 256 * 1024
# Directory entries looked at in rules_dir (rule files and anything else lying there).
MAX_RULES_DIR_ENTRIES = 10 * MAX_RULE_FILES


def _rules(rules_dir: Path, top: _Section, issues: _Issues) -> tuple[Rule, ...]:
    """Every rule of every ``NN-name.yaml`` in ``rules_dir``, in file-name then list order.

    Problems are added to ``issues``, each naming the rule file, the rule (index and
    name) and the key. Globs are checked against the users and upstreams as written,
    so a user with a mistake of its own does not also make its rules fail.
    """
    shown_dir = Path(str(top.raw("rules_dir")))
    try:
        names = sorted(
            entry.name for entry in itertools.islice(rules_dir.iterdir(), MAX_RULES_DIR_ENTRIES + 1)
        )
    except OSError as exc:
        top.error("rules_dir", f"cannot list {rules_dir}: {exc.strerror or exc}")
        return ()
    if len(names) > MAX_RULES_DIR_ENTRIES:
        top.error("rules_dir", f"expected at most {MAX_RULES_DIR_ENTRIES} entries in {rules_dir}")
        return ()
    files: list[str] = []
    for name in names:
        if _RULE_FILE_RE.fullmatch(name):
            files.append(name)
        elif name.endswith((".yaml", ".yml")):
            _Issues(str(shown_dir / name), issues.items).add(
                "(file)",
                "not loaded: a rule file is named NN-name.yaml (two digits, a dash, a name"
                " of letters, digits, '.', '_' or '-'); rename it",
            )
    if len(files) > MAX_RULE_FILES:
        top.error("rules_dir", f"expected at most {MAX_RULE_FILES} rule files")
        return ()
    known = _declared_accounts(top)
    first_use: dict[str, str] = {}
    out: list[Rule] = []
    for name in files:
        file_issues = _Issues(str(shown_dir / name), issues.items)
        data = _read_yaml(
            rules_dir / name, file_issues, what="rule file", limit=MAX_RULE_FILE_BYTES
        )
        if data is None:
            continue
        section = _Section.of(file_issues, "", data, ("rules",))
        if section is None:
            continue
        items = section.raw("rules")
        if not isinstance(items, list) or not items:
            section.error("rules", f"expected a non-empty list of rules, got {_describe(items)}")
            continue
        for index, item in enumerate(items):
            rule = _rule(file_issues, index, item, file_name=name, known=known, first_use=first_use)
            if rule is not None:
                out.append(rule)
    if len(out) > MAX_RULES:
        top.error("rules_dir", f"expected at most {MAX_RULES} rules over all files, got {len(out)}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _DeclaredAccounts:
    """Users (with their upstream as written, None for Maildir users) and upstream names."""

    users: Mapping[str, str | None]
    upstreams: frozenset[str]


def _declared_accounts(top: _Section) -> _DeclaredAccounts:
    raw_upstreams = top.raw("upstreams")
    upstreams = (
        frozenset(str(k) for k in raw_upstreams) if isinstance(raw_upstreams, dict) else frozenset()
    )
    raw_users = top.raw("users")
    users: dict[str, str | None] = {}
    if isinstance(raw_users, dict):
        for user, item in raw_users.items():
            upstream = item.get("upstream") if isinstance(item, dict) else None
            users[str(user)] = upstream if isinstance(upstream, str) else None
    return _DeclaredAccounts(users, upstreams)


_RULE_KEYS = ("name", "match", "action", "expire_after_days", "max_size_bytes", "continue")
_MATCH_KEYS = (
    "users",
    "upstreams",
    "older_than_days",
    "newer_than_days",
    "larger_than_bytes",
    "smaller_than_bytes",
    "headers",
)


def _rule(
    issues: _Issues,
    index: int,
    item: object,
    *,
    file_name: str,
    known: _DeclaredAccounts,
    first_use: dict[str, str],
) -> Rule | None:
    """One rule of a rule file, or None (with its problems in ``issues``)."""
    raw_name = item.get("name") if isinstance(item, dict) else None
    label = f"rules[{index}]"
    if isinstance(raw_name, str) and rule_name_problem(raw_name) is None:
        label = f"{label} ({raw_name})"
    section = _Section.of(issues, label, item, _RULE_KEYS)
    if section is None:
        return None
    errors_before = len(issues.items)
    name = section.string("name", required=True, what="a rule name")
    if name is not None:
        problem = rule_name_problem(name)
        if problem is not None:
            section.error("name", problem)
        elif name in first_use:
            section.error("name", f"{name!r} is already the name of {first_use[name]}")
        else:
            first_use[name] = f"{label} in {file_name}"
    match = _rule_match(section, known)
    action = section.choice("action", Action)
    expire = section.integer("expire_after_days", lo=1, hi=MAX_DAYS)
    max_size = section.integer("max_size_bytes", lo=0, hi=MAX_SIZE_BYTES)
    continues = section.boolean("continue")
    if not any(section.has(key) for key in ("action", "expire_after_days", "max_size_bytes")):
        issues.add(label, "sets nothing: give action, expire_after_days or max_size_bytes")
    if name is None or match is None or len(issues.items) > errors_before:
        return None
    return Rule(
        name=name,
        match=match,
        action=action,
        expire_after_days=expire,
        max_size_bytes=max_size,
        continues=bool(continues),
        source=file_name,
    )


def _rule_match(rule: _Section, known: _DeclaredAccounts) -> Match | None:
    """The ``match`` mapping of a rule; a rule without one matches every message."""
    if not rule.has("match"):
        match = Match()
    else:
        section = _Section.of(rule.issues, rule.at("match"), rule.raw("match"), _MATCH_KEYS)
        if section is None:
            return None
        errors_before = len(rule.issues.items)
        users = _globs(section, "users", "user", known.users)
        upstreams = _globs(section, "upstreams", "upstream", known.upstreams)
        match = Match(
            users=users,
            upstreams=upstreams,
            older_than_days=section.integer("older_than_days", lo=0, hi=MAX_DAYS),
            newer_than_days=section.integer("newer_than_days", lo=1, hi=MAX_DAYS),
            larger_than_bytes=section.integer("larger_than_bytes", lo=0, hi=MAX_SIZE_BYTES),
            smaller_than_bytes=section.integer("smaller_than_bytes", lo=1, hi=MAX_SIZE_BYTES),
            headers=_header_matches(section),
        )
        _refuse_empty_ranges(section, match)
        if len(rule.issues.items) > errors_before:
            return None
    routed = {user: up for user, up in known.users.items() if up is not None}
    if not any(match.applies_to(user, up) for user, up in routed.items()):
        rule.error(
            "match",
            "the rule applies to no configured user: no user routed to an upstream matches"
            " both users and upstreams (Maildir users are not subject to rules)",
        )
    return match


def _globs(section: _Section, key: str, what: str, names: Collection[str]) -> tuple[str, ...]:
    value = section.raw(key)
    if value is None:
        return ()
    expected = f"a list of {what} name globs"
    if isinstance(value, str):
        section.error(key, f"expected {expected}, got {_describe(value)} (write [{value}])")
        return ()
    if not isinstance(value, list) or not value or len(value) > MAX_MATCH_ITEMS:
        section.error(key, f"expected {expected} (1-{MAX_MATCH_ITEMS}), got {_describe(value)}")
        return ()
    globs: list[str] = []
    for position, glob in enumerate(value):
        path = f"{key}[{position}]"
        problem = (
            glob_problem(glob)
            if isinstance(glob, str)
            else f"expected a glob, got {_describe(glob)}"
        )
        if problem is not None:
            section.error(path, problem)
        elif not any(fnmatch.fnmatchcase(name, glob) for name in names):
            close = difflib.get_close_matches(glob, sorted(names), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section.error(path, f"{glob!r} matches no configured {what}{hint}")
        else:
            globs.append(glob)
    return tuple(globs)


def _header_matches(section: _Section) -> tuple[HeaderMatch, ...]:
    value = section.raw("headers")
    if value is None:
        return ()
    what = "a mapping of header field name to regular expression"
    mapping = _as_mapping(section.issues, section.at("headers"), value)
    if mapping is None:
        return ()
    if not mapping or len(mapping) > MAX_MATCH_ITEMS:
        section.error("headers", f"expected {what} (1-{MAX_MATCH_ITEMS} fields)")
        return ()
    seen: set[str] = set()
    out: list[HeaderMatch] = []
    for field_name, pattern in mapping.items():
        path = f"headers.{field_name}"
        if not _FIELD_NAME_RE.fullmatch(field_name):
            section.error(path, "expected a header field name (printable ASCII, no ':' or space)")
            continue
        if field_name.lower() in seen:
            section.error(path, "the same field twice (field names are case-insensitive)")
            continue
        seen.add(field_name.lower())
        if not isinstance(pattern, str):
            section.error(path, f"expected a regular expression, got {_describe(pattern)}")
            continue
        compiled = compile_header_pattern(pattern)
        if isinstance(compiled, str):
            section.error(path, compiled)
            continue
        out.append(HeaderMatch(field_name.lower(), compiled))
    return tuple(out)


def _refuse_empty_ranges(section: _Section, match: Match) -> None:
    """A pair of bounds no message can meet is a mistake, not a rule."""
    older, newer = match.older_than_days, match.newer_than_days
    if older is not None and newer is not None and newer <= older:
        section.error(
            "newer_than_days",
            f"no message is older than {older} and newer than {newer} days",
        )
    larger, smaller = match.larger_than_bytes, match.smaller_than_bytes
    if larger is not None and smaller is not None and smaller <= larger + 1:
        section.error(
            "smaller_than_bytes",
            f"no message is larger than {larger} and smaller than {smaller} bytes",
        )


# -- the schema ------------------------------------------------------------------------


_TOP_KEYS = (
    "listen",
    "tls",
    "allow_plaintext_auth",
    "upstreams",
    "users",
    "state",
    "rules_dir",
    "metrics",
    "limits",
    "trusted_proxies",
)
_LISTENER_KEYS = ("address", "port", "tls", "proxy_protocol")
_TLS_KEYS = ("cert_file", "key_file")
_UPSTREAM_KEYS = (
    "host",
    "port",
    "tls",
    "verify",
    "ca_file",
    "login",
    "connect_timeout_seconds",
    "login_timeout_seconds",
    "command_timeout_seconds",
    "keepalive_interval_seconds",
    "max_reply_line_bytes",
    "exclusive_sessions",
)
_USER_KEYS = (
    "password_hash",
    "maildir",
    "upstream",
    "upstream_user",
    "upstream_password_file",
    "upstream_password_env",
)
_USER_HINTS = {
    "upstream_password": (
        "secrets are never inline: put the password in a file and name it with"
        " upstream_password_file, or name an environment variable with upstream_password_env"
    ),
    "password": (
        "passwords are never stored in the config: write password_hash, made with"
        " `popproxy hash-password`"
    ),
}
_STATE_KEYS = ("url", "busy_timeout_seconds", "integrity_check")
_METRICS_KEYS = ("address", "port")
_LIMIT_KEYS = (
    "idle_timeout_seconds",
    "login_timeout_seconds",
    "max_sessions",
    "max_sessions_per_ip",
    "shutdown_grace_seconds",
    "max_bad_commands",
    "auth_failure_delay_seconds",
    "send_timeout_seconds",
    "max_command_line_bytes",
    "max_sasl_line_bytes",
    "max_sasl_payload_bytes",
    "account_wait_seconds",
    "auth_penalty_initial_seconds",
    "auth_penalty_max_seconds",
    "auth_lockout_failures",
    "auth_lockout_address_failures",
    "auth_lockout_window_seconds",
    "auth_lockout_seconds",
    "auth_max_pending_verifications",
    "auth_cache_size",
    "auth_cache_ttl_seconds",
)
# Sanity bounds: a session count or bad-command budget beyond these is a typo, not a plan.
MAX_SESSIONS_LIMIT = 1_000_000
MAX_BAD_COMMANDS_LIMIT = 1000
# NIST SP 800-63B §5.2.2: no more than 100 consecutive failed attempts on one account;
# a lockout count above that would not limit anything worth limiting.
MAX_LOCKOUT_FAILURES_LIMIT = 100
# An address's count is kept as failure times (8 octets each) per tracked address:
# 500 keeps a full throttle table under about 80 MB (popproxy/auth/throttle.py).
MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT = 500
MAX_PENDING_VERIFICATIONS_LIMIT = 100_000
MAX_AUTH_CACHE_SIZE_LIMIT = 1_000_000
# Upstream default ports: RFC 1939 §3 (110) and RFC 8314 §7.3 (995).
POP3_PORT = 110
POP3S_PORT = 995


def _build(source: Path, data: object, issues: _Issues) -> Config | None:
    top = _Section.of(issues, "", data, _TOP_KEYS)
    if top is None:
        return None
    listen = _listeners(top)
    tls = _tls(top)
    allow_plaintext = top.boolean("allow_plaintext_auth")
    upstreams = _upstreams(top)
    _refuse_loops(top, listen, upstreams)
    users = _users(top)
    state = _state(top)
    rules_dir = top.path_value("rules_dir", kind="dir")
    metrics = _metrics(top)
    limits = _limits(top)
    rules = _rules(rules_dir, top, issues) if rules_dir is not None else ()
    trusted_proxies = _trusted_proxies(top, listen)
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
    )


def _listeners(top: _Section) -> list[ListenerConfig]:
    value = top.raw("listen")
    what = "a list of listeners ({address, port, tls})"
    if value is None:
        top.error("listen", f"missing; expected {what}")
        return []
    if not isinstance(value, list) or not value:
        top.error("listen", f"expected {what}, got {_describe(value)}")
        return []
    out: list[ListenerConfig] = []
    bound: dict[tuple[str, int], int] = {}
    for index, item in enumerate(value):
        path = f"listen[{index}]"
        section = _Section.of(top.issues, path, item, _LISTENER_KEYS)
        if section is None:
            continue
        address = section.host("address", required=True)
        port = section.integer("port", lo=0, hi=MAX_PORT, required=True)
        tls = section.tls_mode("tls", required=True)
        proxy_protocol = section.boolean("proxy_protocol")
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
        out.append(ListenerConfig(address, port, tls, proxy_protocol=bool(proxy_protocol)))
    return out


def _trusted_proxies(top: _Section, listen: Sequence[ListenerConfig]) -> tuple[IPNetwork, ...]:
    """``trusted_proxies``: addresses or CIDR networks (``192.0.2.10``, ``10.0.0.0/8``,
    ``2001:db8::/32``); required, and not empty, when a listener has ``proxy_protocol``."""
    value = top.raw("trusted_proxies")
    what = "a list of IP addresses or networks (CIDR, such as 10.0.0.0/8)"
    networks: list[IPNetwork] = []
    if value is not None and not isinstance(value, list):
        top.error("trusted_proxies", f"expected {what}, got {_describe(value)}")
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
                f"expected an IP address or a CIDR network, got {_describe(item)}{hint}",
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
    top: _Section, listen: Sequence[ListenerConfig], upstreams: Mapping[str, UpstreamConfig]
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


def _tls(top: _Section) -> TlsConfig | None:
    if not top.has("tls"):
        return None
    section = _Section.of(top.issues, "tls", top.raw("tls"), _TLS_KEYS)
    if section is None:
        return None
    cert = section.path_value("cert_file", kind="file", required=True)
    key = section.path_value("key_file", kind="file", required=True)
    if cert is None or key is None:
        return None
    return TlsConfig(cert, key)


def _named_sections(top: _Section, key: str) -> Iterator[tuple[str, object]]:
    value = top.raw(key)
    if value is None:
        return
    mapping = _as_mapping(top.issues, key, value)
    if mapping is None:
        return
    yield from mapping.items()


def _upstreams(top: _Section) -> dict[str, UpstreamConfig]:
    out: dict[str, UpstreamConfig] = {}
    for name, item in _named_sections(top, "upstreams"):
        if not 0 < len(name) <= MAX_UPSTREAM_NAME_CHARS or not name.isprintable():
            top.issues.add(
                f"upstreams.{name}",
                f"an upstream name must be 1-{MAX_UPSTREAM_NAME_CHARS} printable characters"
                " (it is a label in the metrics)",
            )
            continue
        section = _Section.of(top.issues, f"upstreams.{name}", item, _UPSTREAM_KEYS)
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
        out[name] = UpstreamConfig(
            name=name,
            host=host,
            port=port,
            tls=tls,
            verify=True if verify is None else verify,
            ca_file=ca_file,
            login=login or UpstreamLogin.AUTO,
            connect_timeout_seconds=connect_timeout or default.connect_timeout_seconds,
            login_timeout_seconds=login_timeout or default.login_timeout_seconds,
            command_timeout_seconds=command_timeout or default.command_timeout_seconds,
            keepalive_interval_seconds=keepalive or default.keepalive_interval_seconds,
            max_reply_line_bytes=reply_line or default.max_reply_line_bytes,
            exclusive_sessions=default.exclusive_sessions if exclusive is None else exclusive,
        )
    return out


def _users(top: _Section) -> dict[str, UserConfig]:
    out: dict[str, UserConfig] = {}
    # Names as written, so that a user naming an upstream with its own errors gets no
    # second, misleading "no such upstream" error.
    declared = top.raw("upstreams")
    declared_names = {str(k) for k in declared} if isinstance(declared, dict) else set()
    for name, item in _named_sections(top, "users"):
        path = f"users.{name}"
        problem = login_name_problem(name)
        if problem is not None:
            top.issues.add(path, problem)
            continue
        errors_before = len(top.issues.items)
        section = _Section.of(top.issues, path, item, _USER_KEYS, hints=_USER_HINTS)
        if section is None:
            continue
        password_hash = _password_hash(section)
        maildir = section.path_value("maildir", kind=None)
        if maildir is not None and maildir.exists() and not maildir.is_dir():
            section.error(
                "maildir", f"expected the path of a Maildir directory; {maildir} is a file"
            )
        upstream = section.string("upstream", what="the name of an entry in upstreams")
        if upstream is not None and upstream not in declared_names:
            close = difflib.get_close_matches(upstream, sorted(declared_names), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section.error(
                "upstream", f"expected the name of an entry in upstreams, got {upstream!r}{hint}"
            )
        has_maildir = section.has("maildir")
        has_upstream = section.has("upstream")
        if has_maildir and has_upstream:
            section.error("upstream", "give either maildir or upstream, not both")
        elif not has_maildir and not has_upstream:
            top.issues.add(path, "missing; expected maildir (a local Maildir) or upstream")
        upstream_user = section.string("upstream_user")
        secret = _upstream_secret(section) if has_upstream else None
        if not has_upstream:
            for key in ("upstream_user", "upstream_password_file", "upstream_password_env"):
                if section.has(key):
                    section.error(key, "only meaningful with upstream")
        if password_hash is None or len(top.issues.items) > errors_before:
            continue
        out[name] = UserConfig(
            name=name,
            password_hash=password_hash,
            maildir=maildir,
            upstream=upstream,
            upstream_user=(upstream_user or name) if upstream is not None else None,
            upstream_password=secret,
        )
    return out


def _password_hash(section: _Section) -> str | None:
    what = "a PHC hash string (make one with `popproxy hash-password`)"
    value = section.string("password_hash", required=True, what=what)
    if value is None:
        return None
    try:
        parse_hash(value)
    except PasswordHashError as exc:
        reason = str(exc)
        if not reason.startswith("expected"):
            reason = f"expected a PHC hash string that popproxy can verify: {reason}"
        section.error("password_hash", reason)
        return None
    return value


def _upstream_secret(section: _Section) -> Secret | None:
    has_file = section.has("upstream_password_file")
    has_env = section.has("upstream_password_env")
    if has_file and has_env:
        section.error(
            "upstream_password_env",
            "give upstream_password_file or upstream_password_env, not both",
        )
        return None
    if has_file:
        path = section.path_value("upstream_password_file", kind="file")
        if path is None:
            return None
        raw = _read_bounded(path, MAX_SECRET_FILE_BYTES)
        if isinstance(raw, OSError):
            section.error("upstream_password_file", f"cannot read {path}: {raw.strerror or raw}")
            return None
        if raw is None:
            section.error(
                "upstream_password_file",
                f"expected a file holding one password (at most {MAX_SECRET_FILE_BYTES} bytes)",
            )
            return None
        # One trailing newline (as `echo` writes) is not part of the password.
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if not raw:
            section.error("upstream_password_file", f"expected a password in {path}; it is empty")
            return None
        return Secret(raw)
    if has_env:
        name = section.string("upstream_password_env", what="the name of an environment variable")
        if name is None:
            return None
        value = os.environ.get(name)
        if not value:
            section.error(
                "upstream_password_env",
                f"expected the environment variable {name} to hold the password; it is"
                + (" empty" if value == "" else " not set"),
            )
            return None
        return Secret.from_str(value)
    section.error(
        "upstream_password_file",
        "missing; expected upstream_password_file or upstream_password_env",
    )
    return None


def _state(top: _Section) -> StateConfig:
    if not top.has("state"):
        return _absolute_state(StateConfig())
    section = _Section.of(top.issues, "state", top.raw("state"), _STATE_KEYS)
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
    options = StateConfig(
        busy_timeout_seconds=busy_timeout or default.busy_timeout_seconds,
        integrity_check=default.integrity_check if integrity_check is None else integrity_check,
    )
    what = "a state URL such as sqlite:///var/popproxy-state.db"
    url = section.string("url", what=what)
    if url is None:
        return _absolute_state(options)
    if url.startswith(("postgresql:", "postgres:")):
        section.error("url", "the PostgreSQL backend is not implemented yet; use sqlite:///PATH")
        return options
    if not url.startswith(_STATE_SCHEMES) or url == "sqlite:///":
        section.error("url", f"expected {what}, got {url!r} (only sqlite is supported so far)")
        return options
    return _absolute_state(replace(options, url=url))


def _absolute_state(state: StateConfig) -> StateConfig:
    """Resolve a relative sqlite path against the working directory (4 slashes = absolute)."""
    path = state.sqlite_path
    if path is None or path.is_absolute():
        return state
    return replace(state, url="sqlite:///" + str(Path.cwd() / path))


def _metrics(top: _Section) -> MetricsConfig | None:
    if not top.has("metrics"):
        return None
    section = _Section.of(top.issues, "metrics", top.raw("metrics"), _METRICS_KEYS)
    if section is None:
        return None
    default = MetricsConfig()
    address = section.host("address")
    port = section.integer("port", lo=0, hi=MAX_PORT)
    return MetricsConfig(
        address=default.address if address is None else address,
        port=default.port if port is None else port,
    )


def _limits(top: _Section) -> LimitsConfig:
    default = LimitsConfig()
    if not top.has("limits"):
        return default
    section = _Section.of(top.issues, "limits", top.raw("limits"), _LIMIT_KEYS)
    if section is None:
        return default

    def seconds(key: str, fallback: float, *, positive: bool = True) -> float:
        value = section.seconds(key, positive=positive)
        return fallback if value is None else value

    def count(key: str, fallback: int, hi: int, lo: int = 1) -> int:
        value = section.integer(key, lo=lo, hi=hi)
        return fallback if value is None else value

    command_line = count(
        "max_command_line_bytes",
        default.max_command_line_bytes,
        COMMAND_LINE_CEILING_OCTETS,
        lo=MAX_COMMAND_LINE_OCTETS,
    )
    sasl_line = count(
        "max_sasl_line_bytes",
        default.max_sasl_line_bytes,
        SASL_LINE_CEILING_OCTETS,
        lo=MAX_COMMAND_LINE_OCTETS,
    )
    if sasl_line < command_line:
        section.error(
            "max_sasl_line_bytes",
            f"expected at least max_command_line_bytes ({command_line}): an AUTH line"
            " may be as long as any command",
        )

    penalty_initial = seconds(
        "auth_penalty_initial_seconds", default.auth_penalty_initial_seconds, positive=False
    )
    penalty_max = seconds(
        "auth_penalty_max_seconds", default.auth_penalty_max_seconds, positive=False
    )
    if penalty_max < penalty_initial:
        section.error(
            "auth_penalty_max_seconds",
            f"expected at least auth_penalty_initial_seconds ({penalty_initial:g})",
        )
    return LimitsConfig(
        idle_timeout_seconds=seconds("idle_timeout_seconds", default.idle_timeout_seconds),
        login_timeout_seconds=seconds("login_timeout_seconds", default.login_timeout_seconds),
        max_sessions=count("max_sessions", default.max_sessions, MAX_SESSIONS_LIMIT),
        max_sessions_per_ip=count(
            "max_sessions_per_ip", default.max_sessions_per_ip, MAX_SESSIONS_LIMIT
        ),
        shutdown_grace_seconds=seconds(
            "shutdown_grace_seconds", default.shutdown_grace_seconds, positive=False
        ),
        max_bad_commands=count(
            "max_bad_commands", default.max_bad_commands, MAX_BAD_COMMANDS_LIMIT
        ),
        auth_failure_delay_seconds=seconds(
            "auth_failure_delay_seconds", default.auth_failure_delay_seconds, positive=False
        ),
        send_timeout_seconds=seconds("send_timeout_seconds", default.send_timeout_seconds),
        max_command_line_bytes=command_line,
        max_sasl_line_bytes=sasl_line,
        max_sasl_payload_bytes=count(
            "max_sasl_payload_bytes",
            default.max_sasl_payload_bytes,
            SASL_PAYLOAD_CEILING_OCTETS,
            lo=SASL_PAYLOAD_FLOOR_OCTETS,
        ),
        account_wait_seconds=seconds(
            "account_wait_seconds", default.account_wait_seconds, positive=False
        ),
        auth_penalty_initial_seconds=penalty_initial,
        auth_penalty_max_seconds=penalty_max,
        auth_lockout_failures=count(
            "auth_lockout_failures",
            default.auth_lockout_failures,
            MAX_LOCKOUT_FAILURES_LIMIT,
            lo=0,
        ),
        auth_lockout_address_failures=count(
            "auth_lockout_address_failures",
            default.auth_lockout_address_failures,
            MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT,
            lo=0,
        ),
        auth_lockout_window_seconds=seconds(
            "auth_lockout_window_seconds", default.auth_lockout_window_seconds
        ),
        auth_lockout_seconds=seconds("auth_lockout_seconds", default.auth_lockout_seconds),
        auth_max_pending_verifications=count(
            "auth_max_pending_verifications",
            default.auth_max_pending_verifications,
            MAX_PENDING_VERIFICATIONS_LIMIT,
            lo=0,
        ),
        auth_cache_size=count(
            "auth_cache_size", default.auth_cache_size, MAX_AUTH_CACHE_SIZE_LIMIT, lo=0
        ),
        auth_cache_ttl_seconds=seconds(
            "auth_cache_ttl_seconds", default.auth_cache_ttl_seconds, positive=False
        ),
    )
