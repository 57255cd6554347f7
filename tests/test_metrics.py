"""popproxy.metrics: names, closed label sets, pre-created series, promtool, the exporter.

The exporter is tested in-process: raw requests over loopback TCP on a dynamic port
and over trio memory streams (whole and byte by byte), and through a real HTTP
client (urllib in a worker thread). Deadlines are virtual (``autojump_clock``) or
bound the test as a whole; nothing sleeps.
"""

from __future__ import annotations

import enum
import platform
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import popproxy
from popproxy import metrics as metrics_module
from popproxy.config import MetricsConfig
from popproxy.metrics import (
    LATENCY_BUCKETS_SECONDS,
    MAX_EXPORTER_CONNECTIONS,
    MAX_REQUEST_HEAD_BYTES,
    REQUEST_READ_TIMEOUT_SECONDS,
    UNKNOWN_VERB,
    CommandResult,
    ConnectionRejection,
    LoginMechanism,
    LoginResult,
    Metrics,
    PolicyAction,
    StateOperation,
    TlsResult,
    handle_http_connection,
    serve_metrics,
)
from popproxy.outcomes import SessionResult, UpstreamFailure
from popproxy.pop3.commands import Verb

TEST_DEADLINE_SECONDS = 20
LISTENERS = ("none", "starttls", "implicit")
UPSTREAMS = ("provider", "backup")
RULES = ("10-archive", "20-default")
# Label names that would carry personal data or unbounded values (invariant 6).
FORBIDDEN_LABELS = frozenset({"user", "username", "address", "peer", "uidl", "host", "mailbox"})


def new_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(listeners=LISTENERS, upstreams=UPSTREAMS, rules=RULES)
    return metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exercise_every_metric(metrics: Metrics) -> None:
    """Report at least one event through every method, so every metric has activity."""
    metrics.config_loaded(successful=True, timestamp=1_700_000_000.0)
    metrics.set_session_limit(1000)
    metrics.session_started("starttls")
    metrics.session_ended("starttls", SessionResult.QUIT)
    metrics.session_started("implicit")
    metrics.session_refused("none")
    metrics.connection_rejected("none", ConnectionRejection.MAX_SESSIONS_PER_IP)
    metrics.tls_handshake("starttls", TlsResult.OK)
    metrics.tls_handshake("implicit", TlsResult.FAILED)
    metrics.login(LoginMechanism.USER, LoginResult.OK)
    metrics.login(LoginMechanism.PLAIN, LoginResult.THROTTLED)
    metrics.command(Verb.RETR, CommandResult.OK)
    metrics.command(None, CommandResult.ERR)
    metrics.client_bytes_sent("starttls", 1234)
    metrics.client_bytes_received("starttls", 56)
    metrics.upstream_connected("provider", 0.012)
    metrics.upstream_login_succeeded("provider", 0.2)
    metrics.upstream_login_failed("backup", UpstreamFailure.CONNECT)
    metrics.upstream_error("provider", UpstreamFailure.CLOSED)
    metrics.upstream_command("provider", Verb.LIST, 0.003)
    metrics.upstream_session_opened("provider")
    metrics.upstream_bytes_received("provider", 4096)
    metrics.upstream_messages_deleted("provider", 2)
    metrics.policy_action("10-archive", PolicyAction.EXPIRED, 2)
    metrics.policy_overdue("10-archive", 3)
    metrics.state_operation(StateOperation.COMMIT, 0.004)
    metrics.state_error(StateOperation.LOAD)


def samples_by_family(registry: CollectorRegistry) -> dict[str, list[tuple[str, dict[str, str]]]]:
    return {
        family.name: [(s.name, dict(s.labels)) for s in family.samples]
        for family in registry.collect()
    }


# -- names and label sets ---------------------------------------------------------------


def test_every_metric_is_prefixed_documented_and_in_base_units() -> None:
    metrics = new_metrics()
    exercise_every_metric(metrics)
    families = list(metrics.registry.collect())
    assert len(families) >= 20
    for family in families:
        assert family.name.startswith("popproxy_"), family.name
        assert family.documentation, family.name
        assert not any(unit in family.name for unit in ("_ms", "milliseconds", "_kb", "_mb"))
        if family.type == "counter":
            assert any(s.name == family.name + "_total" for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


def test_no_label_carries_personal_data() -> None:
    """Invariant 6 for metrics: no user name, address, peer or UIDL label (DESIGN.md, Metrics)."""
    metrics = new_metrics()
    exercise_every_metric(metrics)
    label_names = {
        name
        for samples in samples_by_family(metrics.registry).values()
        for _, labels in samples
        for name in labels
    }
    assert label_names, "no labelled samples: the check would pass vacuously"
    assert not label_names & FORBIDDEN_LABELS
    assert label_names <= {
        "listener",
        "reason",
        "result",
        "mechanism",
        "verb",
        "upstream",
        "kind",
        "rule",
        "action",
        "operation",
        "version",
        "python_version",
        "le",
    }


def test_every_metric_has_activity_after_the_exercise() -> None:
    """Guards the promtool test below: an untouched labelled metric would not be checked."""
    metrics = new_metrics()
    exercise_every_metric(metrics)
    for name, samples in samples_by_family(metrics.registry).items():
        assert samples, f"{name} has no series"
        assert any(
            metrics.registry.get_sample_value(sample, labels) for sample, labels in samples
        ), f"{name} has no nonzero series: exercise_every_metric misses it"


def test_promtool_check_metrics_is_clean() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: install Debian's prometheus package"
    metrics = new_metrics()
    exercise_every_metric(metrics)
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout == b"", done.stdout.decode()


def test_the_metrics_live_only_on_the_injected_registry() -> None:
    from prometheus_client import REGISTRY

    before = {family.name for family in REGISTRY.collect()}
    first, second = new_metrics(), new_metrics()  # a second one does not clash either
    first.session_started("none")
    assert value(second, "popproxy_sessions_started_total", listener="none") == 0
    assert not any(name.startswith("popproxy_") for name in before)
    assert not any(family.name.startswith("popproxy_") for family in REGISTRY.collect())


def test_histograms_span_half_a_millisecond_to_thirty_seconds() -> None:
    assert LATENCY_BUCKETS_SECONDS[0] == 0.0005
    assert LATENCY_BUCKETS_SECONDS[-1] == 30.0
    assert list(LATENCY_BUCKETS_SECONDS) == sorted(set(LATENCY_BUCKETS_SECONDS))


# -- pre-created series ---------------------------------------------------------------


def test_known_series_exist_at_zero_before_any_event() -> None:
    metrics = new_metrics()
    for listener in LISTENERS:
        assert value(metrics, "popproxy_sessions_started_total", listener=listener) == 0
        assert value(metrics, "popproxy_sessions_active", listener=listener) == 0
        assert value(metrics, "popproxy_sessions_refused_total", listener=listener) == 0
        assert value(metrics, "popproxy_client_sent_bytes_total", listener=listener) == 0
        for outcome in SessionResult:
            assert (
                value(
                    metrics,
                    "popproxy_sessions_ended_total",
                    listener=listener,
                    result=outcome.value,
                )
                == 0
            )
        for tls in TlsResult:
            assert (
                value(metrics, "popproxy_tls_handshakes_total", listener=listener, result=tls.value)
                == 0
            )
    for upstream in UPSTREAMS:
        for result in ("ok", "failed"):
            assert (
                value(metrics, "popproxy_upstream_logins_total", upstream=upstream, result=result)
                == 0
            )
        for kind in UpstreamFailure:
            assert (
                value(metrics, "popproxy_upstream_errors_total", upstream=upstream, kind=kind.value)
                == 0
            )
        assert value(metrics, "popproxy_upstream_messages_deleted_total", upstream=upstream) == 0
        assert (
            value(metrics, "popproxy_upstream_connect_duration_seconds_count", upstream=upstream)
            == 0
        )
    for rule in RULES:
        assert value(metrics, "popproxy_policy_overdue_messages_total", rule=rule) == 0
        for action in PolicyAction:
            assert (
                value(metrics, "popproxy_policy_actions_total", rule=rule, action=action.value) == 0
            )
    for mechanism in LoginMechanism:
        for login in LoginResult:
            assert (
                value(
                    metrics, "popproxy_logins_total", mechanism=mechanism.value, result=login.value
                )
                == 0
            )
    for verb in [v.value for v in Verb] + [UNKNOWN_VERB]:
        for command in CommandResult:
            assert value(metrics, "popproxy_commands_total", verb=verb, result=command.value) == 0
    for operation in StateOperation:
        assert (
            value(
                metrics,
                "popproxy_state_operation_duration_seconds_count",
                operation=operation.value,
            )
            == 0
        )


def test_declaring_again_adds_names_and_keeps_counts() -> None:
    metrics = new_metrics()
    metrics.session_started("none")
    metrics.declare(listeners=["none"], upstreams=["new-provider"], rules=["30-new"])
    assert value(metrics, "popproxy_sessions_started_total", listener="none") == 1
    assert (
        value(metrics, "popproxy_upstream_logins_total", upstream="new-provider", result="ok") == 0
    )
    metrics.policy_action("30-new", PolicyAction.KEPT)
    assert value(metrics, "popproxy_policy_actions_total", rule="30-new", action="kept") == 1


# -- what each method counts --------------------------------------------------------------


def test_build_info_names_this_popproxy_and_python() -> None:
    metrics = new_metrics()
    assert (
        value(
            metrics,
            "popproxy_build_info",
            version=popproxy.__version__,
            python_version=platform.python_version(),
        )
        == 1
    )


def test_config_reload_gauges() -> None:
    metrics = new_metrics()
    assert value(metrics, "popproxy_config_last_reload_successful") == 0  # until the first load
    metrics.config_loaded(successful=True, timestamp=1_700_000_000.0)
    assert value(metrics, "popproxy_config_last_reload_successful") == 1
    metrics.config_loaded(successful=False, timestamp=1_700_000_600.0)
    assert value(metrics, "popproxy_config_last_reload_successful") == 0
    # A failed reload keeps the time of the last success, as Prometheus's own metric does.
    assert value(metrics, "popproxy_config_last_reload_success_timestamp_seconds") == 1.7e9


def test_sessions_started_active_ended() -> None:
    metrics = new_metrics()
    metrics.set_session_limit(50)
    metrics.session_started("starttls")
    metrics.session_started("starttls")
    assert value(metrics, "popproxy_sessions_active", listener="starttls") == 2
    metrics.session_ended("starttls", SessionResult.TIMEOUT)
    assert value(metrics, "popproxy_sessions_active", listener="starttls") == 1
    assert value(metrics, "popproxy_sessions_started_total", listener="starttls") == 2
    assert (
        value(metrics, "popproxy_sessions_ended_total", listener="starttls", result="timeout") == 1
    )
    assert value(metrics, "popproxy_sessions_limit") == 50


def test_every_session_result_is_a_series() -> None:
    metrics = new_metrics()
    for result in SessionResult:
        metrics.session_started("none")
        metrics.session_ended("none", result)
        assert (
            value(metrics, "popproxy_sessions_ended_total", listener="none", result=result.value)
            == 1
        )


def test_every_upstream_failure_is_a_series() -> None:
    metrics = new_metrics()
    for failure in UpstreamFailure:
        metrics.upstream_error("provider", failure)
        metrics.upstream_login_failed("backup", failure)
        assert (
            value(
                metrics, "popproxy_upstream_errors_total", upstream="provider", kind=failure.value
            )
            == 1
        )
    assert value(
        metrics, "popproxy_upstream_logins_total", upstream="backup", result="failed"
    ) == len(UpstreamFailure)


def test_logins_commands_tls_and_bytes() -> None:
    metrics = new_metrics()
    metrics.login(LoginMechanism.APOP, LoginResult.LOCKED_OUT)
    metrics.command(Verb.DELE, CommandResult.ERR)
    metrics.command(None, CommandResult.ERR)
    metrics.tls_handshake("implicit", TlsResult.FAILED)
    metrics.client_bytes_sent("implicit", 100)
    metrics.client_bytes_sent("implicit", 23)
    metrics.client_bytes_received("implicit", 7)
    assert value(metrics, "popproxy_logins_total", mechanism="apop", result="locked_out") == 1
    assert value(metrics, "popproxy_commands_total", verb="DELE", result="err") == 1
    assert value(metrics, "popproxy_commands_total", verb=UNKNOWN_VERB, result="err") == 1
    assert (
        value(metrics, "popproxy_tls_handshakes_total", listener="implicit", result="failed") == 1
    )
    assert value(metrics, "popproxy_client_sent_bytes_total", listener="implicit") == 123
    assert value(metrics, "popproxy_client_received_bytes_total", listener="implicit") == 7


def test_upstream_logins_errors_and_latency() -> None:
    metrics = new_metrics()
    metrics.upstream_connected("provider", 0.02)
    metrics.upstream_login_succeeded("provider", 0.3)
    metrics.upstream_login_failed("provider", UpstreamFailure.AUTH_REJECTED)
    metrics.upstream_error("provider", UpstreamFailure.TIMEOUT)
    metrics.upstream_command("provider", Verb.RETR, 1.5)
    metrics.upstream_session_opened("provider")
    metrics.upstream_session_opened("provider")
    metrics.upstream_session_closed("provider")
    metrics.upstream_bytes_received("provider", 10)
    metrics.upstream_messages_deleted("provider", 3)
    up = "popproxy_upstream_"
    assert value(metrics, up + "logins_total", upstream="provider", result="ok") == 1
    assert value(metrics, up + "logins_total", upstream="provider", result="failed") == 1
    assert value(metrics, up + "errors_total", upstream="provider", kind="auth_rejected") == 1
    assert value(metrics, up + "errors_total", upstream="provider", kind="timeout") == 1
    assert value(metrics, up + "connect_duration_seconds_sum", upstream="provider") == 0.02
    assert value(metrics, up + "login_duration_seconds_count", upstream="provider") == 1
    assert (
        value(
            metrics,
            up + "command_duration_seconds_bucket",
            upstream="provider",
            verb="RETR",
            le="2.5",
        )
        == 1
    )
    assert (
        value(
            metrics,
            up + "command_duration_seconds_bucket",
            upstream="provider",
            verb="RETR",
            le="1.0",
        )
        == 0
    )
    assert value(metrics, up + "sessions_active", upstream="provider") == 1
    assert value(metrics, up + "received_bytes_total", upstream="provider") == 10
    assert value(metrics, up + "messages_deleted_total", upstream="provider") == 3


def test_policy_and_state() -> None:
    metrics = new_metrics()
    metrics.policy_action("20-default", PolicyAction.HIDDEN)
    metrics.policy_action("20-default", PolicyAction.DELETED, 4)
    metrics.policy_overdue("20-default", 2)
    metrics.state_operation(StateOperation.LOAD, 0.001)
    metrics.state_error(StateOperation.PRUNE)
    assert value(metrics, "popproxy_policy_actions_total", rule="20-default", action="hidden") == 1
    assert value(metrics, "popproxy_policy_actions_total", rule="20-default", action="deleted") == 4
    assert value(metrics, "popproxy_policy_overdue_messages_total", rule="20-default") == 2
    assert value(metrics, "popproxy_state_operation_duration_seconds_count", operation="load") == 1
    assert value(metrics, "popproxy_state_errors_total", operation="prune") == 1


# -- closed sets, enforced ------------------------------------------------------------------


class Stray(enum.Enum):
    OOPS = "oops"


def test_a_plain_string_where_an_enum_is_required_is_refused() -> None:
    """mypy rejects these calls (the ignores would be unused otherwise); at run time, TypeError."""
    metrics = new_metrics()
    with pytest.raises(TypeError):
        metrics.login(LoginMechanism.USER, "ok")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.login("user", LoginResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.command("RETR", CommandResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream_error("provider", "connect")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.policy_action("10-archive", "deleted")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.state_operation("load", 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.tls_handshake("none", "ok")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.session_ended("none", "quit")  # type: ignore[arg-type]


def test_a_member_of_the_wrong_enum_is_refused() -> None:
    metrics = new_metrics()
    with pytest.raises(TypeError):
        metrics.login(LoginMechanism.USER, TlsResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream_command("provider", Stray.OOPS, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.session_ended("none", Stray.OOPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream_error("provider", Stray.OOPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream_login_failed("provider", Stray.OOPS)  # type: ignore[arg-type]


def test_names_must_be_declared_first() -> None:
    """A user name or an address cannot become a label: it was never declared."""
    metrics = new_metrics()
    with pytest.raises(ValueError, match="not declared"):
        metrics.session_started("alice@example.net")
    with pytest.raises(ValueError, match="not declared"):
        metrics.upstream_error("pop.example.net", UpstreamFailure.CONNECT)
    with pytest.raises(ValueError, match="not declared"):
        metrics.policy_overdue("no-such-rule", 1)
    assert value(metrics, "popproxy_sessions_started_total", listener="alice@example.net") is None


@pytest.mark.parametrize("bad", ["", "two\nlines", "tab\there", "x" * 129])
def test_declared_names_are_short_and_printable(bad: str) -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        metrics.declare(upstreams=[bad])


def test_a_failed_label_check_changes_nothing() -> None:
    metrics = new_metrics()
    metrics.session_started("none")
    with pytest.raises(TypeError):
        metrics.session_ended("none", Stray.OOPS)  # type: ignore[arg-type]
    assert value(metrics, "popproxy_sessions_active", listener="none") == 1


# -- the exporter ----------------------------------------------------------------------------


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, str, int]]:
    """A running exporter on a dynamic loopback port."""
    metrics = new_metrics()
    exercise_every_metric(metrics)
    async with trio.open_nursery() as nursery:
        address, port = await nursery.start(
            serve_metrics, MetricsConfig(address="127.0.0.1", port=0), metrics.registry
        )
        yield metrics, address, port
        nursery.cancel_scope.cancel()


async def tcp_request(address: str, port: int, request: bytes) -> bytes:
    """Send ``request`` over a new connection and read until the server closes it.

    A connection the server reset (closed without reading) reads as b"".
    """
    with trio.fail_after(TEST_DEADLINE_SECONDS):
        stream = await trio.open_tcp_stream(address, port)
        async with stream:
            try:
                await stream.send_all(request)
                return await read_to_eof(stream)
            except trio.BrokenResourceError:
                return b""


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some(65536):
        received += data
    return bytes(received)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, field = line.partition(":")
        headers[name.strip().lower()] = field.strip()
    return int(status), headers, body


async def test_exporter_serves_the_registry_over_tcp(served: tuple[Metrics, str, int]) -> None:
    _, address, port = served
    assert address == "127.0.0.1"
    assert port != 0
    raw = await tcp_request(
        address, port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
    )
    status, headers, body = parse_response(raw)
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert b"popproxy_build_info{" in body
    assert b'popproxy_sessions_started_total{listener="starttls"} 1.0' in body


async def test_exporter_with_a_real_http_client(served: tuple[Metrics, str, int]) -> None:
    metrics, address, port = served

    def fetch(path: str, method: str = "GET") -> tuple[int, str, bytes]:
        request = urllib.request.Request(f"http://{address}:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=TEST_DEADLINE_SECONDS) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read()

    status, content_type, body = await trio.to_thread.run_sync(fetch, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    assert body == generate_latest(metrics.registry)
    status, _, body = await trio.to_thread.run_sync(fetch, "/metrics?name[]=x")
    assert status == 200
    status, _, body = await trio.to_thread.run_sync(fetch, "/")
    assert status == 200
    assert b"/metrics" in body
    status, _, _ = await trio.to_thread.run_sync(fetch, "/favicon.ico")
    assert status == 404
    status, _, _ = await trio.to_thread.run_sync(fetch, "/metrics", "POST")
    assert status == 405
    status, _, body = await trio.to_thread.run_sync(fetch, "/metrics", "HEAD")
    assert (status, body) == (200, b"")


async def exchange(request: bytes, *, byte_by_byte: bool = False) -> bytes:
    """Run one connection's handler over memory streams; return all it sent."""
    metrics = new_metrics()
    exercise_every_metric(metrics)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        if byte_by_byte:
            for i in range(len(request)):
                await client.send_all(request[i : i + 1])
        else:
            await client.send_all(request)
        await client.send_eof()
        raw = await read_to_eof(client)
    await client.aclose()
    return raw


REQUESTS = {
    "metrics": (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "bare LF": (b"GET /metrics HTTP/1.0\nHost: x\n\n", 200),
    "index": (b"GET / HTTP/1.1\r\n\r\n", 200),
    "not found": (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    "post": (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    "delete": (b"DELETE / HTTP/1.1\r\n\r\n", 405),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "http/2": (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    "no version": (b"GET /metrics\r\n\r\n", 400),
}


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("case", REQUESTS)
async def test_exporter_requests(case: str, byte_by_byte: bool) -> None:
    request, expected = REQUESTS[case]
    status, headers, body = parse_response(await exchange(request, byte_by_byte=byte_by_byte))
    assert status == expected
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_exporter_head_has_the_length_but_no_body() -> None:
    status, headers, body = parse_response(await exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) > 1000


async def test_exporter_refuses_an_overlong_request_head() -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n\r\n"
    status, _, _ = parse_response(await exchange(request))
    assert status == 431


async def test_exporter_accepts_a_head_just_under_the_limit() -> None:
    start = b"GET /metrics HTTP/1.1\r\nX-Pad: "
    request = start + b"a" * (MAX_REQUEST_HEAD_BYTES - len(start)) + b"\r\n\r\n"
    status, _, _ = parse_response(await exchange(request))
    assert status == 200


async def test_exporter_drops_a_client_that_never_finishes_its_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = new_metrics()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        await client.send_all(b"GET /metrics HTTP/1.1\r\n")
        started = trio.current_time()
        assert await read_to_eof(client) == b""
        assert trio.current_time() - started == pytest.approx(REQUEST_READ_TIMEOUT_SECONDS)


@pytest.mark.parametrize("request_head", [b"", b"GET /metrics HTTP/1.1\r\n"])
async def test_exporter_does_not_answer_a_client_that_closes_before_the_blank_line(
    request_head: bytes,
) -> None:
    assert await exchange(request_head) == b""


async def test_a_broken_collector_gives_500_not_a_crash() -> None:
    metrics = new_metrics()

    class Broken(Collector):
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("collector bug")

    metrics.registry.register(Broken())
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_http_connection, server, metrics.registry)
        await client.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        status, _, body = parse_response(await read_to_eof(client))
    assert status == 500
    assert b"collector bug" not in body


async def test_exporter_bounds_concurrent_connections(served: tuple[Metrics, str, int]) -> None:
    _, address, port = served
    idle = [await trio.open_tcp_stream(address, port) for _ in range(MAX_EXPORTER_CONNECTIONS)]
    try:
        await trio.testing.wait_all_tasks_blocked()
        # Every slot is held by a client that has not sent its request: one more is
        # closed at once, without a reply.
        assert await tcp_request(address, port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    finally:
        for stream in idle:
            await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    status, _, _ = parse_response(await tcp_request(address, port, b"GET / HTTP/1.1\r\n\r\n"))
    assert status == 200


def test_the_exporter_module_has_named_limits() -> None:
    assert metrics_module.MAX_REQUEST_HEAD_BYTES == 8192
    assert metrics_module.REQUEST_READ_TIMEOUT_SECONDS > 0
    assert metrics_module.RESPONSE_SEND_TIMEOUT_SECONDS > 0
