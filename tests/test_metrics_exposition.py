"""popproxy.metrics: the text a scrape exports, byte for byte.

``metrics_exposition.txt`` beside this file is the scrape that prometheus_client's own
Counter, Gauge and Histogram exported for :func:`report_a_day` before the hot-path
series became plain numbers (popproxy.metric_series, issue 15), with the build_info
labels (the running versions) replaced by ``VERSION`` and ``PYTHON_VERSION``. The
plain-number series must export exactly that: the same families in the same order,
help texts, types, series order, bucket bounds and values.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

import popproxy
from popproxy.metrics import (
    LATENCY_BUCKETS_SECONDS,
    CommandResult,
    ConnectionRejection,
    LoginMechanism,
    LoginResult,
    Metrics,
    PolicyAction,
    StateOperation,
    TlsResult,
)
from popproxy.outcomes import PollResult, SessionResult, TokenRefreshResult, UpstreamFailure
from popproxy.pop3.commands import Verb

EXPECTED = Path(__file__).with_name("metrics_exposition.txt")


def report_a_day(metrics: Metrics) -> None:
    """Sessions, commands and upstream traffic on two listeners and two upstreams, with
    durations on, between and beyond the bucket bounds, and a NaN."""
    metrics.declare(
        listeners=("plain", "tls"),
        upstreams=("provider", "backup"),
        rules=("10-archive",),
        oauth2_upstreams=("provider",),
    )
    metrics.config_loaded(successful=True, timestamp=1_700_000_000.0)
    metrics.set_session_limit(100)
    plain, tls = metrics.listener("plain"), metrics.listener("tls")
    provider, backup = metrics.upstream("provider"), metrics.upstream("backup")
    for _ in range(3):
        plain.session_started()
    tls.session_started()
    tls.tls_handshake(TlsResult.OK)
    tls.tls_handshake(TlsResult.FAILED)
    plain.session_refused()
    plain.connection_rejected(ConnectionRejection.PROXY_HEADER)
    metrics.login(LoginMechanism.USER, LoginResult.OK)
    metrics.login(LoginMechanism.USER, LoginResult.OK)
    metrics.login(LoginMechanism.LOGIN, LoginResult.FAILED)
    provider.connected(0.0005)  # on the first bound: in its bucket
    provider.connected(0.00051)
    backup.login_failed(UpstreamFailure.TLS)
    provider.login_succeeded(0.25)
    provider.session_opened()
    provider.session_opened()
    for seconds in (0.0, 0.001, 0.0049, 2.5, 31.0, 1e-9, float("nan")):
        provider.command(Verb.RETR, seconds)
    provider.command(Verb.UIDL, 0.02)
    provider.command(Verb.LIST, 0.03)
    backup.command(Verb.QUIT, 12.0)
    for verb, result in (
        (Verb.CAPA, CommandResult.OK),
        (Verb.RETR, CommandResult.OK),
        (Verb.RETR, CommandResult.OK),
        (Verb.RETR, CommandResult.ERR),
        (None, CommandResult.ERR),
        (Verb.QUIT, CommandResult.OK),
    ):
        metrics.command(verb, result)
    for octets in (0, 1, 2**40, 123_456_789):
        plain.bytes_sent(octets)
        tls.bytes_received(octets)
        provider.bytes_received(octets)
    provider.messages_deleted(3)
    provider.poisoned_dot_lines(2)
    provider.error(UpstreamFailure.TIMEOUT)
    provider.session_closed()
    metrics.state_operation(StateOperation.LOAD, 0.003)
    metrics.state_operation(StateOperation.COMMIT, 0.1)
    metrics.state_operation(StateOperation.COMMIT, 0.10000000000000002)
    metrics.state_error(StateOperation.COMMIT)
    metrics.policy_action("10-archive", PolicyAction.DELETED, 2)
    metrics.policy_overdue("10-archive", 1)
    metrics.gateway_poll(
        "backup",
        PollResult.OK,
        seconds=0.7,
        fetched=2,
        fetched_bytes=5000,
        deleted_by_rule={"10-archive": 1},
        timestamp=1_700_000_100.0,
    )
    metrics.gateway_backoff({"provider": 1})
    metrics.gateway_interval(60)
    metrics.oauth2_refresh("provider", TokenRefreshResult.UNAVAILABLE)
    metrics.track_oauth2_token_age("provider", lambda: 7.5)
    metrics.track_oauth2_failing(
        "provider", lambda upstream, result: int(result is TokenRefreshResult.UNAVAILABLE)
    )
    plain.session_ended(SessionResult.QUIT)
    plain.session_ended(SessionResult.TIMEOUT)
    tls.session_ended(SessionResult.EOF)


def normalized_scrape(metrics: Metrics) -> str:
    """The scrape of ``metrics`` with the running versions replaced by placeholders."""
    versions = f'python_version="{platform.python_version()}",version="{popproxy.__version__}"'
    scrape = generate_latest(metrics.registry).decode()
    assert versions in scrape
    return scrape.replace(versions, 'python_version="PYTHON_VERSION",version="VERSION"')


def test_a_scrape_exports_what_prometheus_client_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    report_a_day(metrics)
    assert normalized_scrape(metrics) == EXPECTED.read_text()


def test_a_scrape_of_fresh_series_exports_only_zeros_and_no_created() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=("plain",), upstreams=("provider",))
    scrape = normalized_scrape(metrics)
    assert 'popproxy_sessions_started_total{listener="plain"} 0.0\n' in scrape
    assert 'popproxy_upstream_messages_deleted_total{upstream="provider"} 0.0\n' in scrape
    assert "_created" not in scrape


# -- random sequences against a model -----------------------------------------------------

LISTENER_NAMES = ("plain", "tls")
UPSTREAM_NAMES = ("provider", "backup")
SECONDS = st.one_of(st.sampled_from(LATENCY_BUCKETS_SECONDS), st.floats(min_value=0, max_value=60))
OCTETS = st.integers(min_value=0, max_value=2**32)
EVENTS = st.one_of(
    st.tuples(st.just("sent"), st.sampled_from(LISTENER_NAMES), OCTETS),
    st.tuples(st.just("received"), st.sampled_from(LISTENER_NAMES), OCTETS),
    st.tuples(st.just("started"), st.sampled_from(LISTENER_NAMES)),
    st.tuples(st.just("ended"), st.sampled_from(LISTENER_NAMES), st.sampled_from(SessionResult)),
    st.tuples(st.just("command"), st.sampled_from([*Verb, None]), st.sampled_from(CommandResult)),
    st.tuples(st.just("login"), st.sampled_from(LoginMechanism), st.sampled_from(LoginResult)),
    st.tuples(
        st.just("upstream_command"),
        st.sampled_from(UPSTREAM_NAMES),
        st.sampled_from(Verb),
        SECONDS,
    ),
    st.tuples(st.just("upstream_received"), st.sampled_from(UPSTREAM_NAMES), OCTETS),
    st.tuples(st.just("state"), st.sampled_from(StateOperation), SECONDS),
)
HOT_FAMILIES = {
    "popproxy_client_sent_bytes",
    "popproxy_client_received_bytes",
    "popproxy_sessions_started",
    "popproxy_sessions_active",
    "popproxy_sessions_ended",
    "popproxy_commands",
    "popproxy_logins",
    "popproxy_upstream_command_duration_seconds",
    "popproxy_upstream_received_bytes",
    "popproxy_state_operation_duration_seconds",
}

Key = tuple[str, frozenset[tuple[str, str]]]


def observe(model: dict[Key, float], name: str, labels: dict[str, str], seconds: float) -> None:
    """What a histogram observation adds, by the definition of its series."""
    for bound in (*LATENCY_BUCKETS_SECONDS, math.inf):
        if seconds <= bound:
            le = "+Inf" if bound == math.inf else repr(bound)
            key = (name + "_bucket", frozenset({**labels, "le": le}.items()))
            model[key] = model.get(key, 0) + 1
    count, total = (
        (name + "_count", frozenset(labels.items())),
        (name + "_sum", frozenset(labels.items())),
    )
    model[count] = model.get(count, 0) + 1
    model[total] = model.get(total, 0.0) + seconds


def add(model: dict[Key, float], name: str, labels: dict[str, str], amount: float) -> None:
    key = (name, frozenset(labels.items()))
    model[key] = model.get(key, 0) + amount


def report(metrics: Metrics, model: dict[Key, float], event: tuple[Any, ...]) -> None:
    """Report ``event`` through the Metrics API, and what it should count into ``model``."""
    match event:
        case ("sent", listener, octets):
            metrics.listener(listener).bytes_sent(octets)
            add(model, "popproxy_client_sent_bytes_total", {"listener": listener}, octets)
        case ("received", listener, octets):
            metrics.listener(listener).bytes_received(octets)
            add(model, "popproxy_client_received_bytes_total", {"listener": listener}, octets)
        case ("started", listener):
            metrics.listener(listener).session_started()
            add(model, "popproxy_sessions_started_total", {"listener": listener}, 1)
            add(model, "popproxy_sessions_active", {"listener": listener}, 1)
        case ("ended", listener, result):
            metrics.listener(listener).session_ended(result)
            labels = {"listener": listener, "result": result.value}
            add(model, "popproxy_sessions_ended_total", labels, 1)
            add(model, "popproxy_sessions_active", {"listener": listener}, -1)
        case ("command", verb, result):
            metrics.command(verb, result)
            labels = {"verb": verb.value if verb else "unknown", "result": result.value}
            add(model, "popproxy_commands_total", labels, 1)
        case ("login", mechanism, result):
            metrics.login(mechanism, result)
            labels = {"mechanism": mechanism.value, "result": result.value}
            add(model, "popproxy_logins_total", labels, 1)
        case ("upstream_command", upstream, verb, seconds):
            metrics.upstream(upstream).command(verb, seconds)
            labels = {"upstream": upstream, "verb": verb.value}
            observe(model, "popproxy_upstream_command_duration_seconds", labels, seconds)
        case ("upstream_received", upstream, octets):
            metrics.upstream(upstream).bytes_received(octets)
            add(model, "popproxy_upstream_received_bytes_total", {"upstream": upstream}, octets)
        case ("state", operation, seconds):
            metrics.state_operation(operation, seconds)
            labels = {"operation": operation.value}
            observe(model, "popproxy_state_operation_duration_seconds", labels, seconds)


@given(st.lists(EVENTS, max_size=60))
def test_random_events_count_what_a_model_of_them_says(events: list[tuple[Any, ...]]) -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=LISTENER_NAMES, upstreams=UPSTREAM_NAMES)
    model: dict[Key, float] = {}
    for event in events:
        report(metrics, model, event)
    exported: dict[Key, float] = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        if family.name in HOT_FAMILIES
        for sample in family.samples
    }
    assert set(model) <= set(exported)
    for key, value in exported.items():
        assert value == model.get(key, 0), key
