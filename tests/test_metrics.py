"""popproxy.metrics: names, closed label sets, pre-created series, promtool.

Events are reported the way production reports them: client-session series through
the ``ListenerMetrics`` of ``Metrics.listener``, upstream series through the
``UpstreamMetrics`` of ``Metrics.upstream``. The exporter that serves the registry is
tested in tests/test_metrics_exporter.py.
"""

from __future__ import annotations

import enum
import platform
import shutil
import subprocess

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

import popproxy
from popproxy.metrics import (
    LATENCY_BUCKETS_SECONDS,
    UNKNOWN_VERB,
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

LISTENERS = ("none", "starttls", "implicit")
UPSTREAMS = ("provider", "backup")
RULES = ("10-archive", "20-default")
# Label names that would carry personal data or unbounded values (invariant 6).
FORBIDDEN_LABELS = frozenset({"user", "username", "address", "peer", "uidl", "host", "mailbox"})


def new_metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.declare(
        listeners=LISTENERS, upstreams=UPSTREAMS, rules=RULES, oauth2_upstreams=("provider",)
    )
    return metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exercise_every_metric(metrics: Metrics) -> None:
    """Report at least one event through every reporting method, so every metric has activity."""
    metrics.config_loaded(successful=True, timestamp=1_700_000_000.0)
    metrics.set_session_limit(1000)
    metrics.listener("starttls").session_started()
    metrics.listener("starttls").session_ended(SessionResult.QUIT)
    metrics.listener("implicit").session_started()
    metrics.listener("none").session_refused()
    metrics.listener("none").connection_rejected(ConnectionRejection.MAX_SESSIONS_PER_IP)
    metrics.listener("starttls").tls_handshake(TlsResult.OK)
    metrics.listener("implicit").tls_handshake(TlsResult.FAILED)
    metrics.login(LoginMechanism.USER, LoginResult.OK)
    metrics.login(LoginMechanism.PLAIN, LoginResult.THROTTLED)
    metrics.command(Verb.RETR, CommandResult.OK)
    metrics.command(None, CommandResult.ERR)
    metrics.listener("starttls").bytes_sent(1234)
    metrics.listener("starttls").bytes_received(56)
    metrics.upstream("provider").connected(0.012)
    metrics.upstream("provider").login_succeeded(0.2)
    metrics.upstream("backup").login_failed(UpstreamFailure.CONNECT)
    metrics.upstream("provider").error(UpstreamFailure.CLOSED)
    metrics.upstream("provider").command(Verb.LIST, 0.003)
    metrics.upstream("provider").session_opened()
    metrics.upstream("provider").bytes_received(4096)
    metrics.upstream("provider").messages_deleted(2)
    metrics.upstream("provider").poisoned_dot_lines(1)
    metrics.policy_action("10-archive", PolicyAction.EXPIRED, 2)
    metrics.policy_overdue("10-archive", 3)
    metrics.state_operation(StateOperation.COMMIT, 0.004)
    metrics.state_error(StateOperation.LOAD)
    metrics.gateway_poll(
        "provider",
        PollResult.OK,
        seconds=0.4,
        fetched=3,
        fetched_bytes=12_000,
        deleted_by_rule={"20-default": 3},
        timestamp=1_700_000_000.0,
    )
    metrics.gateway_backoff({"backup": 1})
    metrics.gateway_interval(300)
    metrics.oauth2_refresh("provider", TokenRefreshResult.OK)
    metrics.oauth2_refresh("provider", TokenRefreshResult.REVOKED)
    metrics.track_oauth2_token_age("provider", lambda: 42.0)
    metrics.track_oauth2_failing("provider", lambda upstream, result: 1)


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


def test_a_scrape_has_no_created_series() -> None:
    """prometheus_client's ``_created`` series are off (docs/metrics.md, Conventions).

    The library's switch is process-wide, so it is turned back on first: constructing
    Metrics must turn it off again, whatever ran before.
    """
    prometheus_client.enable_created_metrics()
    control = CollectorRegistry()
    Counter(
        "control_total",
        "A counter of the library's own, to show the check can fail.",
        registry=control,
    ).inc()
    assert b"control_created" in generate_latest(control)
    metrics = new_metrics()
    exercise_every_metric(metrics)
    scrape = generate_latest(metrics.registry)
    assert b"popproxy_sessions_started_total{" in scrape
    assert b"popproxy_upstream_command_duration_seconds_bucket{" in scrape
    assert [line for line in scrape.splitlines() if b"_created" in line] == []
    assert b"control_created" not in generate_latest(control)


def test_the_metrics_live_only_on_the_injected_registry() -> None:
    from prometheus_client import REGISTRY

    before = {family.name for family in REGISTRY.collect()}
    first, second = new_metrics(), new_metrics()  # a second one does not clash either
    first.listener("none").session_started()
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
        assert value(metrics, "popproxy_upstream_poisoned_dot_lines_total", upstream=upstream) == 0
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
    metrics.listener("none").session_started()
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
    metrics.listener("starttls").session_started()
    metrics.listener("starttls").session_started()
    assert value(metrics, "popproxy_sessions_active", listener="starttls") == 2
    metrics.listener("starttls").session_ended(SessionResult.TIMEOUT)
    assert value(metrics, "popproxy_sessions_active", listener="starttls") == 1
    assert value(metrics, "popproxy_sessions_started_total", listener="starttls") == 2
    assert (
        value(metrics, "popproxy_sessions_ended_total", listener="starttls", result="timeout") == 1
    )
    assert value(metrics, "popproxy_sessions_limit") == 50


def test_every_session_result_is_a_series() -> None:
    metrics = new_metrics()
    for result in SessionResult:
        metrics.listener("none").session_started()
        metrics.listener("none").session_ended(result)
        assert (
            value(metrics, "popproxy_sessions_ended_total", listener="none", result=result.value)
            == 1
        )


def test_every_upstream_failure_is_a_series() -> None:
    metrics = new_metrics()
    for failure in UpstreamFailure:
        metrics.upstream("provider").error(failure)
        metrics.upstream("backup").login_failed(failure)
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
    metrics.login(LoginMechanism.PLAIN, LoginResult.LOCKED_OUT)
    metrics.command(Verb.DELE, CommandResult.ERR)
    metrics.command(None, CommandResult.ERR)
    metrics.listener("implicit").tls_handshake(TlsResult.FAILED)
    metrics.listener("implicit").bytes_sent(100)
    metrics.listener("implicit").bytes_sent(23)
    metrics.listener("implicit").bytes_received(7)
    assert value(metrics, "popproxy_logins_total", mechanism="plain", result="locked_out") == 1
    assert value(metrics, "popproxy_commands_total", verb="DELE", result="err") == 1
    assert value(metrics, "popproxy_commands_total", verb=UNKNOWN_VERB, result="err") == 1
    assert (
        value(metrics, "popproxy_tls_handshakes_total", listener="implicit", result="failed") == 1
    )
    assert value(metrics, "popproxy_client_sent_bytes_total", listener="implicit") == 123
    assert value(metrics, "popproxy_client_received_bytes_total", listener="implicit") == 7


def test_upstream_logins_errors_and_latency() -> None:
    metrics = new_metrics()
    metrics.upstream("provider").connected(0.02)
    metrics.upstream("provider").login_succeeded(0.3)
    metrics.upstream("provider").login_failed(UpstreamFailure.AUTH_REJECTED)
    metrics.upstream("provider").error(UpstreamFailure.TIMEOUT)
    metrics.upstream("provider").command(Verb.RETR, 1.5)
    metrics.upstream("provider").session_opened()
    metrics.upstream("provider").session_opened()
    metrics.upstream("provider").session_closed()
    metrics.upstream("provider").bytes_received(10)
    metrics.upstream("provider").messages_deleted(3)
    metrics.upstream("provider").poisoned_dot_lines(2)
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
    assert value(metrics, up + "poisoned_dot_lines_total", upstream="provider") == 2


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
        metrics.upstream("provider").error("connect")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.policy_action("10-archive", "deleted")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.state_operation("load", 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.listener("none").tls_handshake("ok")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.listener("none").session_ended("quit")  # type: ignore[arg-type]


def test_a_member_of_the_wrong_enum_is_refused() -> None:
    metrics = new_metrics()
    with pytest.raises(TypeError):
        metrics.login(LoginMechanism.USER, TlsResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream("provider").command(Stray.OOPS, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.listener("none").session_ended(Stray.OOPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream("provider").error(Stray.OOPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.upstream("provider").login_failed(Stray.OOPS)  # type: ignore[arg-type]
    # A member of another Enum with the same value is not the member the series is for.
    with pytest.raises(TypeError):
        metrics.command(Verb.RETR, TlsResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.login(LoginMechanism.USER, CommandResult.OK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.state_operation(Stray.OOPS, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.listener("none").session_ended(TlsResult.OK)  # type: ignore[arg-type]


def test_a_negative_count_is_refused_and_changes_nothing() -> None:
    """Counters never go down (``rate()`` would read a reset), as prometheus_client's
    ``Counter.inc`` enforced before these series became plain numbers."""
    metrics = new_metrics()
    listener, upstream = metrics.listener("none"), metrics.upstream("provider")
    for count in (
        listener.bytes_sent,
        listener.bytes_received,
        upstream.bytes_received,
        upstream.messages_deleted,
        upstream.poisoned_dot_lines,
    ):
        with pytest.raises(ValueError, match="negative"):
            count(-1)
    assert value(metrics, "popproxy_client_sent_bytes_total", listener="none") == 0
    assert value(metrics, "popproxy_client_received_bytes_total", listener="none") == 0
    assert value(metrics, "popproxy_upstream_received_bytes_total", upstream="provider") == 0
    assert value(metrics, "popproxy_upstream_messages_deleted_total", upstream="provider") == 0
    assert value(metrics, "popproxy_upstream_poisoned_dot_lines_total", upstream="provider") == 0


def test_names_must_be_declared_first() -> None:
    """A user name or an address cannot become a label: it was never declared."""
    metrics = new_metrics()
    with pytest.raises(ValueError, match="not declared"):
        metrics.listener("alice@example.net")
    with pytest.raises(ValueError, match="not declared"):
        metrics.upstream("pop.example.net")
    with pytest.raises(ValueError, match="not declared"):
        metrics.policy_overdue("no-such-rule", 1)
    assert value(metrics, "popproxy_sessions_started_total", listener="alice@example.net") is None


# -- the unexported Metrics ----------------------------------------------------------------


def test_an_unexported_metrics_counts_on_a_registry_of_its_own() -> None:
    from prometheus_client import REGISTRY

    first, second = Metrics.unexported(), Metrics.unexported()
    exercise_every_metric(first)  # every name in it undeclared: declared at first use
    assert value(first, "popproxy_sessions_started_total", listener="starttls") == 1
    assert value(first, "popproxy_policy_actions_total", rule="10-archive", action="expired") == 2
    assert value(first, "popproxy_upstream_logins_total", upstream="backup", result="failed") == 1
    # A name declared at its first use gets all its series, as declare() gives them.
    assert value(first, "popproxy_upstream_errors_total", upstream="backup", kind="tls") == 0
    assert value(second, "popproxy_sessions_started_total", listener="starttls") is None
    assert not any(family.name.startswith("popproxy_") for family in REGISTRY.collect())


def test_an_unexported_metrics_checks_what_the_exported_one_checks() -> None:
    metrics = Metrics.unexported()
    with pytest.raises(TypeError):
        metrics.listener("none").session_ended(Stray.OOPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        metrics.login(LoginMechanism.USER, "ok")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="printable"):
        metrics.upstream("two\nlines")
    assert metrics.listener("none") is metrics.listener("none")  # bound once, as declared ones


@pytest.mark.parametrize("bad", ["", "two\nlines", "tab\there", "x" * 129])
def test_declared_names_are_short_and_printable(bad: str) -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        metrics.declare(upstreams=[bad])


def test_a_failed_label_check_changes_nothing() -> None:
    metrics = new_metrics()
    metrics.listener("none").session_started()
    with pytest.raises(TypeError):
        metrics.listener("none").session_ended(Stray.OOPS)  # type: ignore[arg-type]
    assert value(metrics, "popproxy_sessions_active", listener="none") == 1


def test_gateway_metrics_take_declared_names_and_closed_results_only() -> None:
    metrics = new_metrics()
    with pytest.raises(ValueError, match="not declared"):
        metrics.gateway_poll(
            "carol",  # a user name is never a label
            PollResult.OK,
            seconds=1,
            fetched=0,
            fetched_bytes=0,
            deleted_by_rule={},
            timestamp=1.0,
        )
    with pytest.raises(TypeError):
        metrics.gateway_poll(
            "provider",
            "ok",  # type: ignore[arg-type]
            seconds=1,
            fetched=0,
            fetched_bytes=0,
            deleted_by_rule={},
            timestamp=1.0,
        )
    metrics.gateway_poll(
        "provider",
        PollResult.AUTH_FAILED,
        seconds=2,
        fetched=0,
        fetched_bytes=0,
        deleted_by_rule={},
        timestamp=5.0,
    )
    value = metrics.registry.get_sample_value
    assert (
        value("popproxy_gateway_polls_total", {"upstream": "provider", "result": "auth_failed"})
        == 1
    )
    assert value("popproxy_gateway_polls_total", {"upstream": "backup", "result": "ok"}) == 0
    # No success yet: no last-success series (a 0 would read as 1970 to the alert).
    assert (
        value("popproxy_gateway_last_success_timestamp_seconds", {"upstream": "provider"}) is None
    )


def test_oauth2_series_exist_at_zero_and_count() -> None:
    metrics = new_metrics()
    for result in TokenRefreshResult:
        name = "popproxy_oauth2_token_refreshes_total"
        assert value(metrics, name, upstream="provider", result=result.value) == 0
    assert (
        value(metrics, "popproxy_oauth2_token_refreshes_total", upstream="backup", result="ok")
        is None
    )
    metrics.oauth2_refresh("provider", TokenRefreshResult.UNAVAILABLE)
    assert (
        value(
            metrics,
            "popproxy_oauth2_token_refreshes_total",
            upstream="provider",
            result="unavailable",
        )
        == 1
    )
    ages = iter([5.0, 7.5])
    metrics.track_oauth2_token_age("provider", lambda: next(ages))
    assert value(metrics, "popproxy_oauth2_token_age_seconds", upstream="provider") == 5.0
    assert value(metrics, "popproxy_oauth2_token_age_seconds", upstream="provider") == 7.5
    with pytest.raises(ValueError, match="not declared"):
        metrics.oauth2_refresh("backup", TokenRefreshResult.OK)


def test_oauth2_accounts_failing_is_read_per_failure_at_each_scrape() -> None:
    metrics = new_metrics()
    name = "popproxy_oauth2_accounts_failing"
    failures = [r for r in TokenRefreshResult if r is not TokenRefreshResult.OK]
    for result in failures:  # declared at 0, one series per failure
        assert value(metrics, name, upstream="provider", result=result.value) == 0
    assert value(metrics, name, upstream="provider", result="ok") is None
    failing = {TokenRefreshResult.REVOKED: 2}
    asked: list[tuple[str, TokenRefreshResult]] = []

    def count(upstream: str, result: TokenRefreshResult) -> int:
        asked.append((upstream, result))
        return failing.get(result, 0)

    metrics.track_oauth2_failing("provider", count)
    assert value(metrics, name, upstream="provider", result="revoked") == 2
    failing.clear()  # a refresh succeeded: read again at the next scrape
    assert value(metrics, name, upstream="provider", result="revoked") == 0
    assert {result for _, result in asked} == set(failures)
    assert {upstream for upstream, _ in asked} == {"provider"}
    with pytest.raises(ValueError, match="not declared"):
        metrics.track_oauth2_failing("backup", count)
