"""Every popproxy metric, declared once on an injected registry.

Theory of operation. :class:`Metrics` owns one collector per metric, all registered
on the :class:`~prometheus_client.CollectorRegistry` it is given (never the library's
global one, so tests and reloads get fresh registries). The rest of popproxy calls
typed methods on it; no other module creates a metric. The series counted on every
session and command (client sessions, logins, commands and octets, upstream
connections, state store timings) are plain numbers of :mod:`popproxy.metric_series`,
counted by the trio thread only and read at scrape time: an integer add where
prometheus_client takes a lock (that module says why and how it exports the same
text). The rest, rare or counted from elsewhere, are ``prometheus_client`` metrics.

Names follow the Prometheus conventions (https://prometheus.io/docs/practices/naming/):
prefix ``popproxy_``, base units (seconds, bytes), ``_total`` on counters. Every
label value comes from a closed set (DESIGN.md, Metrics; invariant 6), and the API
enforces it: outcomes are the Enums below or ``popproxy.pop3.commands.Verb``, and
listener, upstream and rule names must first be declared with :meth:`Metrics.declare`
(they come from the config). A user name, an address or a UIDL cannot become a
label: it is neither an Enum member nor a declared name, so the call raises.

:meth:`Metrics.declare` also creates every series whose labels are known up front
at 0, so ``rate()`` and the alert rules work from the first scrape.

This module only declares and counts: it does no I/O and imports no trio, socket, ssl
or yaml (tests/pop3/test_imports.py). :mod:`popproxy.metrics_exporter` serves the
registry over HTTP. It is one module over 600 lines on purpose (the gateway's and
OAuth2's series made it longer still): every metric is declared in one place
(DESIGN.md, habit 8), so that its name, labels, help text, the Enums of its label
values and the methods that count it are read together. How the hot series hold and
export their numbers is not here but in :mod:`popproxy.metric_series`, so this module
stays declarations and the methods that count.
"""

from __future__ import annotations

import enum
import functools
import platform
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

import popproxy
from popproxy.metric_series import (
    CounterFamily,
    CounterSeries,
    GaugeFamily,
    HistogramFamily,
    HistogramSeries,
    refuse_negative,
)
from popproxy.outcomes import PollResult, SessionResult, TokenRefreshResult, UpstreamFailure
from popproxy.pop3.commands import Verb

PREFIX = "popproxy_"

# Latency buckets in seconds, 0.5 ms to 30 s: a loopback round trip or a warm sqlite
# read lands in the first buckets, a provider's slow LIST or a cold TLS handshake
# far away in the last ones. Roughly 1-2.5-5 steps per decade (as the client's
# defaults), plus 30 s, the order of our own network deadlines.
LATENCY_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Gateway poll durations, 50 ms to 30 min: an empty poll on loopback is a few round
# trips; the first poll of a large mailbox downloads for minutes.
POLL_BUCKETS_SECONDS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)

# The ``verb`` label of a client command that did not parse to a known verb.
UNKNOWN_VERB = "unknown"
# The refresh outcomes an account can be failing with (popproxy_oauth2_accounts_failing).
_REFRESH_FAILURES = tuple(r for r in TokenRefreshResult if r is not TokenRefreshResult.OK)


class LoginMechanism(enum.Enum):
    """How a client logged in: RFC 1939 §7 USER/PASS, RFC 5034 AUTH with RFC 4616 PLAIN
    or with LOGIN (draft-murchison-sasl-login)."""

    USER = "user"
    PLAIN = "plain"
    LOGIN = "login"


class LoginResult(enum.Enum):
    """The outcome of one client login attempt."""

    OK = "ok"
    FAILED = "failed"  # wrong password or unknown user
    THROTTLED = "throttled"  # refused before hashing: the client address is locked out
    LOCKED_OUT = "locked_out"  # refused before hashing: the user name is locked out
    # could not decide (hash unusable, hash queue full, maildrop or upstream unavailable)
    ERROR = "error"


class CommandResult(enum.Enum):
    """The status indicator popproxy answered a client command with (RFC 1939 §3)."""

    OK = "ok"
    ERR = "err"


class TlsResult(enum.Enum):
    """The outcome of a client TLS handshake (STLS, RFC 2595 §4, or implicit TLS, RFC 8314)."""

    OK = "ok"
    FAILED = "failed"


class ConnectionRejection(enum.Enum):
    """Why a connection was closed before it became a session (besides max_sessions)."""

    MAX_SESSIONS_PER_IP = "max_sessions_per_ip"  # its client address had too many sessions
    UNTRUSTED_PROXY = "untrusted_proxy"  # a proxy_protocol listener, not from trusted_proxies
    PROXY_HEADER = "proxy_header"  # no valid PROXY protocol header in time


class PolicyAction(enum.Enum):
    """What retention policy did with one message at a QUIT (DESIGN.md, Rules)."""

    HIDDEN = "hidden"  # hidden for this user, left on the upstream
    DELETED = "deleted"  # deleted upstream after the client's DELE
    EXPIRED = "expired"  # deleted upstream because its rule's expiry passed
    KEPT = "kept"  # a keep rule overruled the client's DELE: left on the upstream (and hidden)


class StateOperation(enum.Enum):
    """One kind of state store access (DESIGN.md, state/)."""

    LOAD = "load"  # read an account's first-seen times and hidden/deleted UIDLs
    COMMIT = "commit"  # record what a QUIT saw, retrieved, hid and deleted (one transaction)
    PRUNE = "prune"  # forget messages no longer in the upstream listing
    # PostgreSQL only (docs/scaling.md): what instances share beside the store.
    LEASE = "lease"  # take, renew, confirm or give back a mailbox lease
    LOGIN_FAILURES = "login_failures"  # read or count shared login failures and lockouts


_E = TypeVar("_E", bound=enum.Enum)


class _UpstreamLoginResult(enum.Enum):
    OK = "ok"
    FAILED = "failed"


def _member(value: _E, kind: type[_E]) -> _E:
    """``value`` itself if it is a member of ``kind``; anything else is a TypeError."""
    if not isinstance(value, kind):
        raise TypeError(f"expected a {kind.__name__} member, got {type(value).__name__}")
    return value


def _label(value: enum.Enum, kind: type[enum.Enum]) -> str:
    """The label value of an Enum member of ``kind``; anything else is a TypeError."""
    label: str = _member(value, kind).value
    return label


def _verb_label(verb: Verb | None) -> str:
    if verb is None:
        return UNKNOWN_VERB
    return _label(verb, Verb)


class Metrics:
    """All popproxy metrics on ``registry`` (DESIGN.md, Metrics).

    Construct one per process with the registry the exporter serves, call
    :meth:`declare` with the configured listener, upstream and rule names (again
    after a reload that adds some), then report events through the methods below and
    through the :class:`ListenerMetrics` and :class:`UpstreamMetrics` that
    :meth:`listener` and :meth:`upstream` return (sessions and upstream connections
    keep theirs). Durations are seconds as floats (differences of ``trio.current_time()``),
    sizes are octets.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # No ``_created`` series: prometheus_client would add one (a Unix time) next to
        # every counter and histogram series, doubling the scrape, and neither the
        # dashboard nor the alert rules use them (docs/metrics.md, Conventions). The
        # switch is the library's, for the whole process; popproxy has no other metrics
        # (the plain-number series of metric_series.py have none either).
        disable_created_metrics()
        self.registry = registry
        self._listeners: dict[str, ListenerMetrics] = {}
        self._upstreams: dict[str, UpstreamMetrics] = {}
        self._rules: set[str] = set()
        # Only for an unexported Metrics: a name is declared at its first use.
        self._names_open = False

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry)

        # Series counted by the trio thread only, on every session or command.
        def loop_counter(name: str, doc: str, labels: tuple[str, ...]) -> CounterFamily:
            return CounterFamily(PREFIX + name, doc, labels, registry=registry)

        def loop_gauge(name: str, doc: str, labels: tuple[str, ...]) -> GaugeFamily:
            return GaugeFamily(PREFIX + name, doc, labels, registry=registry)

        def loop_histogram(name: str, doc: str, labels: tuple[str, ...]) -> HistogramFamily:
            return HistogramFamily(
                PREFIX + name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS_SECONDS
            )

        # Process.
        self._build_info = gauge(
            "build_info",
            "Always 1; the labels say which popproxy and Python are running.",
            ("version", "python_version"),
        )
        self._build_info.labels(popproxy.__version__, platform.python_version()).set(1)
        self._reload_ok = gauge(
            "config_last_reload_successful",
            "Whether the last configuration load or reload succeeded (1) or failed (0).",
        )
        self._reload_time = gauge(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
        )

        # Client sessions.
        self._sessions_started = loop_counter(
            "sessions_started_total", "Client connections accepted as sessions.", ("listener",)
        )
        self._sessions_active = loop_gauge(
            "sessions_active", "Client sessions running now.", ("listener",)
        )
        self._sessions_ended = loop_counter(
            "sessions_ended_total",
            "Client sessions ended, by how they ended.",
            ("listener", "result"),
        )
        self._sessions_refused = loop_counter(
            "sessions_refused_total",
            "Client connections refused because max_sessions sessions were running.",
            ("listener",),
        )
        self._connections_rejected = loop_counter(
            "connections_rejected_total",
            "Client connections closed before a session started, by reason"
            " (max_sessions_per_ip, untrusted_proxy, proxy_header).",
            ("listener", "reason"),
        )
        self._sessions_limit = gauge(
            "sessions_limit", "The configured limit on concurrent sessions (limits.max_sessions)."
        )
        self._tls_handshakes = loop_counter(
            "tls_handshakes_total",
            "Client TLS handshakes (STLS or implicit TLS), by outcome.",
            ("listener", "result"),
        )
        self._logins = loop_counter(
            "logins_total",
            "Client login attempts, by mechanism and outcome.",
            ("mechanism", "result"),
        )
        self._commands = loop_counter(
            "commands_total",
            "Client commands answered, by verb and status indicator.",
            ("verb", "result"),
        )
        self._client_sent = loop_counter(
            "client_sent_bytes_total", "Octets sent to clients.", ("listener",)
        )
        self._client_received = loop_counter(
            "client_received_bytes_total", "Octets received from clients.", ("listener",)
        )

        # Upstreams.
        self._upstream_connect = loop_histogram(
            "upstream_connect_duration_seconds",
            "Time to open a connection to an upstream, TCP and TLS handshake included.",
            ("upstream",),
        )
        self._upstream_login = loop_histogram(
            "upstream_login_duration_seconds",
            "Time from the upstream's greeting to its +OK for the login (successful logins).",
            ("upstream",),
        )
        self._upstream_command = loop_histogram(
            "upstream_command_duration_seconds",
            "Time from sending a command upstream to the end of its reply.",
            ("upstream", "verb"),
        )
        self._upstream_logins = loop_counter(
            "upstream_logins_total",
            "Attempts to open a logged-in upstream session (connect, TLS, login), by outcome.",
            ("upstream", "result"),
        )
        self._upstream_errors = loop_counter(
            "upstream_errors_total", "Upstream failures, by kind.", ("upstream", "kind")
        )
        self._upstream_sessions_active = loop_gauge(
            "upstream_sessions_active", "Logged-in upstream sessions open now.", ("upstream",)
        )
        self._upstream_received = loop_counter(
            "upstream_received_bytes_total", "Octets received from upstreams.", ("upstream",)
        )
        self._upstream_deleted = loop_counter(
            "upstream_messages_deleted_total",
            "Messages deleted upstream (DELE, then QUIT answered +OK).",
            ("upstream",),
        )
        self._upstream_poisoned = loop_counter(
            "upstream_poisoned_dot_lines_total",
            "Lines of a single dot ended by a bare LF in upstream messages, relayed stuffed.",
            ("upstream",),
        )

        # OAuth2 tokens of upstreams with auth: xoauth2 or oauthbearer.
        self._oauth2_refreshes = counter(
            "oauth2_token_refreshes_total",
            "OAuth2 access-token refreshes at the token endpoint, by outcome"
            " (ok, revoked, rejected, unavailable).",
            ("upstream", "result"),
        )
        self._oauth2_token_age = gauge(
            "oauth2_token_age_seconds",
            "Age of the oldest cached OAuth2 access token of the upstream: grows past a"
            " token's lifetime only while its refreshes fail.",
            ("upstream",),
        )
        self._oauth2_failing = gauge(
            "oauth2_accounts_failing",
            "Accounts of the upstream whose last access-token refresh failed, by outcome"
            " (revoked, rejected, unavailable): each counts until a refresh succeeds.",
            ("upstream", "result"),
        )
        self._oauth2_upstreams: set[str] = set()

        # Policy and state.
        self._policy_actions = counter(
            "policy_actions_total",
            "Messages a retention rule acted on at a QUIT, counted once the action took effect.",
            ("rule", "action"),
        )
        self._policy_overdue = counter(
            "policy_overdue_messages_total",
            "Messages found past their rule's expiry in a login's listing (counted per listing).",
            ("rule",),
        )
        self._state_duration = loop_histogram(
            "state_operation_duration_seconds",
            "Time a state store operation took, including waiting for a worker thread.",
            ("operation",),
        )
        self._state_errors = counter(
            "state_errors_total", "State store operations that failed.", ("operation",)
        )

        # The fetch gateway (docs/gateway.md): per upstream, never per user or source.
        self._gateway_polls = counter(
            "gateway_polls_total",
            "Gateway polls of sources on an upstream, by result (ok, auth_failed,"
            " upstream_error, maildir_full, maildir_error, state_error, internal_error,"
            " busy: skipped while another held the mailbox, lease_lost).",
            ("upstream", "result"),
        )
        self._gateway_fetched = counter(
            "gateway_fetched_messages_total",
            "Messages the gateway delivered durably into a Maildir, by upstream.",
            ("upstream",),
        )
        self._gateway_fetched_bytes = counter(
            "gateway_fetched_bytes_total",
            "Octets of the messages the gateway delivered into a Maildir, by upstream.",
            ("upstream",),
        )
        self._gateway_deleted = counter(
            "gateway_deleted_messages_total",
            "Messages the gateway deleted upstream after their local copy was durable"
            " (QUIT answered +OK), by upstream and the rule that said so.",
            ("upstream", "rule"),
        )
        self._gateway_duration = Histogram(
            PREFIX + "gateway_poll_duration_seconds",
            "Time one gateway poll of a source took, from its start to its log line.",
            ("upstream",),
            registry=registry,
            buckets=POLL_BUCKETS_SECONDS,
        )
        self._gateway_last_success = gauge(
            "gateway_last_success_timestamp_seconds",
            "Unix time of the last successful gateway poll of a source on the upstream.",
            ("upstream",),
        )
        self._gateway_backoff = gauge(
            "gateway_sources_in_backoff",
            "Gateway sources on the upstream whose last poll failed (waiting out a backoff).",
            ("upstream",),
        )
        self._gateway_interval = gauge(
            "gateway_poll_interval_seconds",
            "The configured time between two polls of a source (gateway.interval_seconds).",
        )

        # Series whose labels are all known now exist from the first scrape, bound once.
        # Tables of series by Enum members are keyed by the members' ids (metric_series.py).
        self._login_series: dict[tuple[int, int], CounterSeries] = {
            (id(mechanism), id(login_result)): self._logins.labels(
                mechanism.value, login_result.value
            )
            for mechanism in LoginMechanism
            for login_result in LoginResult
        }
        # Every command series, bound once: a pipelined burst costs a dict lookup per reply.
        self._command_series: dict[tuple[int, int], CounterSeries] = {
            (id(verb), id(command_result)): self._commands.labels(
                _verb_label(verb), command_result.value
            )
            for verb in [*Verb, None]
            for command_result in CommandResult
        }
        self._state_series: dict[int, HistogramSeries] = {
            id(operation): self._state_duration.labels(operation.value)
            for operation in StateOperation
        }
        for operation in StateOperation:
            self._state_errors.labels(operation.value)

    @classmethod
    def unexported(cls) -> Metrics:
        """A Metrics on a registry of its own, which no exporter serves and nobody reads.

        For code run without the server's Metrics: ``popproxy explain``, and tests that
        do not look at metrics. It takes the same calls and checks the same Enums as the
        server's, so every code path is the one the server runs, and no caller has to
        ask whether there is a Metrics at all. Its names are open: a listener, upstream
        or rule name is declared at its first use (none of its labels reaches a scrape).
        """
        metrics = cls(CollectorRegistry())
        metrics._names_open = True
        return metrics

    # -- closed sets of names ---------------------------------------------------------

    def declare(
        self,
        *,
        listeners: Iterable[str] = (),
        upstreams: Iterable[str] = (),
        rules: Iterable[str] = (),
        oauth2_upstreams: Iterable[str] = (),
    ) -> None:
        """Allow these configured names as label values and create their series at 0.

        Call it at startup with every listener name (``ListenerConfig.name``), upstream
        name and rule name, and again after a reload (declaring a name twice is
        harmless; names dropped by a reload keep their series, as counters should).
        Every method that takes a name raises ValueError for a name not declared
        (except on an :meth:`unexported` Metrics).
        """
        for listener in listeners:
            _check_name(listener)
            if listener not in self._listeners:
                self._listeners[listener] = ListenerMetrics(self, listener)
        for upstream in upstreams:
            _check_name(upstream)
            if upstream not in self._upstreams:
                self._upstreams[upstream] = UpstreamMetrics(self, upstream)
                for poll_result in PollResult:
                    self._gateway_polls.labels(upstream, poll_result.value)
                self._gateway_fetched.labels(upstream)
                self._gateway_fetched_bytes.labels(upstream)
                self._gateway_duration.labels(upstream)
                self._gateway_backoff.labels(upstream)
        for upstream in oauth2_upstreams:
            _check_name(upstream)
            self._oauth2_upstreams.add(upstream)
            for refresh_result in TokenRefreshResult:
                self._oauth2_refreshes.labels(upstream, refresh_result.value)
            self._oauth2_token_age.labels(upstream)
            for failure in _REFRESH_FAILURES:
                self._oauth2_failing.labels(upstream, failure.value)
        for rule in rules:
            _check_name(rule)
            self._rules.add(rule)
            self._policy_overdue.labels(rule)
            for action in PolicyAction:
                self._policy_actions.labels(rule, action.value)

    def listener(self, name: str) -> ListenerMetrics:
        """The series of the declared listener ``name``, bound once (ValueError if undeclared).

        A session keeps the returned object, so its per-write byte counts cost one
        integer add and no label lookup.
        """
        if name not in self._listeners:
            self._undeclared("listener", name, listeners=[name])
        return self._listeners[name]

    def upstream(self, name: str) -> UpstreamMetrics:
        """The series of the declared upstream ``name``, bound once (ValueError if undeclared).

        ``popproxy.maildrop.upstream.open_upstream`` reports through it.
        """
        if name not in self._upstreams:
            self._undeclared("upstream", name, upstreams=[name])
        return self._upstreams[name]

    def oauth2_refresh(self, upstream: str, result: TokenRefreshResult) -> None:
        """One access-token refresh of a declared token upstream ended with ``result``."""
        name = self._oauth2_upstream(upstream)
        self._oauth2_refreshes.labels(name, _label(result, TokenRefreshResult)).inc()

    def track_oauth2_token_age(self, upstream: str, age: Callable[[], float]) -> None:
        """Read the oldest token age of a declared token upstream from ``age`` at each
        scrape (seconds; the token cache outlives reloads, so it stays the source)."""
        self._oauth2_token_age.labels(self._oauth2_upstream(upstream)).set_function(age)

    def track_oauth2_failing(
        self, upstream: str, count: Callable[[str, TokenRefreshResult], int]
    ) -> None:
        """Read, at each scrape, how many accounts of a declared token upstream saw their
        last refresh fail, per failure: ``count(upstream, result)`` (the token cache's)."""
        name = self._oauth2_upstream(upstream)
        for failure in _REFRESH_FAILURES:
            self._oauth2_failing.labels(name, failure.value).set_function(
                functools.partial(count, name, failure)
            )

    def _oauth2_upstream(self, name: str) -> str:
        if name not in self._oauth2_upstreams:
            self._undeclared("oauth2 upstream", name, oauth2_upstreams=[name])
        return name

    def _rule(self, name: str) -> str:
        if name not in self._rules:
            self._undeclared("rule", name, rules=[name])
        return name

    def _undeclared(self, kind: str, name: str, **names: Iterable[str]) -> None:
        """``name`` was not declared: a ValueError, or on an unexported Metrics, declare it."""
        if not self._names_open:
            raise ValueError(f"{kind} {name!r} was not declared (Metrics.declare)")
        self.declare(**names)

    # -- process ----------------------------------------------------------------------

    def config_loaded(self, *, successful: bool, timestamp: float) -> None:
        """Record a configuration load or reload; ``timestamp`` is Unix time (``time.time()``).

        Call it after the startup load too, or the gauge says the last load failed.
        A failed reload leaves the success timestamp where it was.
        """
        self._reload_ok.set(1 if successful else 0)
        if successful:
            self._reload_time.set(timestamp)

    def set_session_limit(self, limit: int) -> None:
        """Publish ``limits.max_sessions`` (for saturation panels and alerts)."""
        self._sessions_limit.set(limit)

    # -- client logins and commands (not per listener) ------------------------------

    def login(self, mechanism: LoginMechanism, result: LoginResult) -> None:
        """A client login attempt was decided (RFC 1939 §7, RFC 5034 §4)."""
        series = self._login_series.get((id(mechanism), id(result)))
        if series is None:  # not a LoginMechanism and a LoginResult: say which
            _label(mechanism, LoginMechanism)
            _label(result, LoginResult)
            raise TypeError(f"not a login mechanism and result: {mechanism!r}, {result!r}")
        series.value += 1

    def command(self, verb: Verb | None, result: CommandResult) -> None:
        """A client command was answered; ``verb`` None for one that did not parse (RFC 1939 §3)."""
        series = self._command_series.get((id(verb), id(result)))
        if series is None:  # not a Verb (or None) and a CommandResult: say which
            _verb_label(verb)
            _label(result, CommandResult)
            raise TypeError(f"not a command verb and result: {verb!r}, {result!r}")
        series.value += 1

    # -- policy and state ---------------------------------------------------------------

    def policy_action(self, rule: str, action: PolicyAction, count: int = 1) -> None:
        """``rule`` did ``action`` to ``count`` messages, and it took effect (after the QUIT).

        Count when the upstream QUIT answered +OK and the state store committed, not when
        the plan was made: the PolicyDeletionsStalled alert relies on that.
        """
        self._policy_actions.labels(self._rule(rule), _label(action, PolicyAction)).inc(count)

    def policy_overdue(self, rule: str, count: int) -> None:
        """A login's listing had ``count`` messages past ``rule``'s ``expire_after_days``."""
        self._policy_overdue.labels(self._rule(rule)).inc(count)

    # -- the fetch gateway ----------------------------------------------------------------

    def gateway_poll(
        self,
        upstream: str,
        result: PollResult,
        *,
        seconds: float,
        fetched: int,
        fetched_bytes: int,
        deleted_by_rule: Mapping[str, int],
        timestamp: float,
    ) -> None:
        """One gateway poll of a source on ``upstream`` ended with ``result``.

        ``deleted_by_rule`` counts the messages deleted upstream per rule (QUIT +OK);
        ``timestamp`` is the Unix time it ended (the last-success gauge, if ok). A
        ``busy`` poll (skipped: another holds the mailbox) is counted, not timed.
        """
        name = self.upstream(upstream).name
        self._gateway_polls.labels(name, _label(result, PollResult)).inc()
        if result is not PollResult.BUSY:
            self._gateway_duration.labels(name).observe(seconds)
        self._gateway_fetched.labels(name).inc(fetched)
        self._gateway_fetched_bytes.labels(name).inc(fetched_bytes)
        for rule, count in deleted_by_rule.items():
            self._gateway_deleted.labels(name, self._rule(rule)).inc(count)
        if result is PollResult.OK:
            self._gateway_last_success.labels(name).set(timestamp)

    def gateway_backoff(self, in_backoff: Mapping[str, int]) -> None:
        """How many sources of each declared upstream are in backoff now (absent: none)."""
        for upstream in self._upstreams:
            self._gateway_backoff.labels(upstream).set(in_backoff.get(upstream, 0))

    def gateway_interval(self, seconds: float) -> None:
        """Publish ``gateway.interval_seconds`` (the FetchStalled alert counts in it)."""
        self._gateway_interval.set(seconds)

    def state_operation(self, operation: StateOperation, seconds: float) -> None:
        """A state store operation finished in ``seconds`` (worker-thread wait included)."""
        series = self._state_series.get(id(operation))
        if series is None:  # not a StateOperation: say so
            _label(operation, StateOperation)
            raise TypeError(f"not a state operation: {operation!r}")
        series.observe(seconds)

    def state_error(self, operation: StateOperation) -> None:
        """A state store operation failed."""
        self._state_errors.labels(_label(operation, StateOperation)).inc()


class ListenerMetrics:
    """The client-session series of one listener, their labelled children looked up once.

    Got from :meth:`Metrics.listener`; every session of the listener reports through it.
    """

    __slots__ = (
        "_active",
        "_ended",
        "_received",
        "_refused",
        "_rejected",
        "_sent",
        "_started",
        "_tls",
        "name",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._started = metrics._sessions_started.labels(name)
        self._active = metrics._sessions_active.labels(name)
        self._refused = metrics._sessions_refused.labels(name)
        self._rejected = {
            r: metrics._connections_rejected.labels(name, r.value) for r in ConnectionRejection
        }
        self._sent = metrics._client_sent.labels(name)
        self._received = metrics._client_received.labels(name)
        self._ended = {id(o): metrics._sessions_ended.labels(name, o.value) for o in SessionResult}
        self._tls = {r: metrics._tls_handshakes.labels(name, r.value) for r in TlsResult}

    def session_started(self) -> None:
        """A connection became a session: started +1, active +1."""
        self._started.value += 1
        self._active.value += 1

    def session_ended(self, result: SessionResult) -> None:
        """A session ended, by ``result``."""
        ended = self._ended[id(_member(result, SessionResult))]
        self._active.value -= 1
        ended.value += 1

    def session_refused(self) -> None:
        """A connection was refused because ``max_sessions`` sessions were running."""
        self._refused.value += 1

    def connection_rejected(self, reason: ConnectionRejection) -> None:
        """A connection was closed before it became a session, for ``reason``."""
        self._rejected[_member(reason, ConnectionRejection)].value += 1

    def tls_handshake(self, result: TlsResult) -> None:
        """A client TLS handshake finished (STLS, RFC 2595 §4, or implicit TLS, RFC 8314)."""
        self._tls[_member(result, TlsResult)].value += 1

    def bytes_sent(self, octets: int) -> None:
        """``octets`` were written to a client."""
        if octets < 0:  # refuse_negative's test, inline: every read and write
            refuse_negative(octets)
        self._sent.value += octets

    def bytes_received(self, octets: int) -> None:
        """``octets`` were read from a client."""
        if octets < 0:  # refuse_negative's test, inline: every read and write
            refuse_negative(octets)
        self._received.value += octets


class UpstreamMetrics:
    """The series of one upstream, their labelled children looked up once.

    Got from :meth:`Metrics.upstream`; ``popproxy.maildrop.upstream`` reports through
    it (connect, login, commands, octets, deletions and failures of one upstream).
    """

    __slots__ = (
        "_active",
        "_command",
        "_commands",
        "_connect",
        "_deleted",
        "_errors",
        "_login",
        "_login_failed",
        "_login_ok",
        "_poisoned",
        "_received",
        "name",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._connect = metrics._upstream_connect.labels(name)
        self._login = metrics._upstream_login.labels(name)
        self._active = metrics._upstream_sessions_active.labels(name)
        self._received = metrics._upstream_received.labels(name)
        self._deleted = metrics._upstream_deleted.labels(name)
        self._poisoned = metrics._upstream_poisoned.labels(name)
        self._login_ok = metrics._upstream_logins.labels(name, _UpstreamLoginResult.OK.value)
        self._login_failed = metrics._upstream_logins.labels(
            name, _UpstreamLoginResult.FAILED.value
        )
        self._errors = {k: metrics._upstream_errors.labels(name, k.value) for k in UpstreamFailure}
        self._command = metrics._upstream_command
        # Per verb (by its id, metric_series.py), created at the first command (the
        # verbs an upstream is sent are few).
        self._commands: dict[int, HistogramSeries] = {}

    def connected(self, seconds: float) -> None:
        """A connection was opened in ``seconds``: the TCP connect plus the TLS handshake."""
        self._connect.observe(seconds)

    def login_succeeded(self, seconds: float) -> None:
        """A logged-in session was opened; its login took ``seconds`` (login sent to +OK)."""
        self._login.observe(seconds)
        self._login_ok.value += 1

    def login_failed(self, kind: UpstreamFailure) -> None:
        """Opening a logged-in session failed (connect, TLS, login or listing), for ``kind``.

        Counts one failed attempt and one error of ``kind``.
        """
        error = self._errors[_member(kind, UpstreamFailure)]
        self._login_failed.value += 1
        error.value += 1

    def error(self, kind: UpstreamFailure) -> None:
        """A logged-in session failed (timeout, closed, a refused DELE, ...), for ``kind``."""
        self._errors[_member(kind, UpstreamFailure)].value += 1

    def command(self, verb: Verb, seconds: float) -> None:
        """A command sent upstream was answered after ``seconds`` (RFC 1939 §3)."""
        series = self._commands.get(id(verb))
        if series is None:
            series = self._command.labels(self.name, _label(verb, Verb))
            self._commands[id(verb)] = series
        series.observe(seconds)

    def session_opened(self) -> None:
        """A logged-in session opened (pair with :meth:`session_closed`)."""
        self._active.value += 1

    def session_closed(self) -> None:
        """A logged-in session closed, however it ended."""
        self._active.value -= 1

    def bytes_received(self, octets: int) -> None:
        """``octets`` were read from the upstream."""
        if octets < 0:  # refuse_negative's test, inline: every read
            refuse_negative(octets)
        self._received.value += octets

    def messages_deleted(self, count: int) -> None:
        """``count`` messages were deleted: DELEs sent, QUIT answered +OK (RFC 1939 §6)."""
        refuse_negative(count)
        self._deleted.value += count

    def poisoned_dot_lines(self, count: int) -> None:
        """A RETR or TOP reply held ``count`` lines of a single dot ended by a bare LF,
        relayed as content, dot-stuffed (RFC 1939 §3; pop3/dotstuff.py)."""
        refuse_negative(count)
        self._poisoned.value += count


# A configured name used as a label value: non-empty, printable (no control characters
# or line breaks to confuse a log or a query) and short. Config keys and rule names are
# much shorter; this only catches a wrong value passed by mistake.
MAX_NAME_CHARS = 128


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"expected a configured name (str), got {type(name).__name__}")
    if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"a name used as a label must be 1-{MAX_NAME_CHARS} printable characters")
