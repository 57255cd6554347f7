"""The ``gateway`` section: how the fetcher schedules its polls (docs/gateway.md)."""

from __future__ import annotations

from popproxy.config.fields import ConfigSection
from popproxy.config.model import GatewayConfig
from popproxy.policy.fields import keys_of

# Sanity bounds: beyond these a value is a typo, not a plan.
# A day between polls is the longest wait that still fits "a mailbox that is fetched".
MAX_INTERVAL_SECONDS = 86_400
MAX_CONCURRENT_POLLS_LIMIT = 1000
MAX_CONNECTIONS_PER_UPSTREAM_LIMIT = 100
# RFC 2449 §6.6 sets no depth; past 100 queued RETRs nothing more is gained on any
# link (the upstream answers in order), and each one is a command line queued there.
MAX_PIPELINING_DEPTH = 100
# A week: an account whose login keeps failing is retried at least that often.
MAX_BACKOFF_SECONDS = 7 * 86_400

_GATEWAY_KEYS = keys_of(GatewayConfig)


def build_gateway(top: ConfigSection) -> GatewayConfig:
    """The ``gateway`` section, defaults for what it does not give."""
    default = GatewayConfig()
    if not top.has("gateway"):
        return default
    section = ConfigSection.of(top.issues, "gateway", top.raw("gateway"), _GATEWAY_KEYS)
    if section is None:
        return default

    def seconds(key: str, fallback: float, *, positive: bool = True, hi: float) -> float:
        value = section.seconds(key, positive=positive)
        if value is not None and value > hi:
            section.error(key, f"expected at most {hi:g} seconds, got {value:g}")
            return fallback
        return fallback if value is None else value

    def count(key: str, fallback: int, hi: int) -> int:
        value = section.integer(key, lo=1, hi=hi)
        return fallback if value is None else value

    interval = seconds("interval_seconds", default.interval_seconds, hi=MAX_INTERVAL_SECONDS)
    jitter = seconds(
        "jitter_seconds", default.jitter_seconds, positive=False, hi=MAX_INTERVAL_SECONDS
    )
    backoff = seconds(
        "backoff_initial_seconds", default.backoff_initial_seconds, hi=MAX_BACKOFF_SECONDS
    )
    backoff_max = seconds(
        "backoff_max_seconds", default.backoff_max_seconds, hi=MAX_BACKOFF_SECONDS
    )
    auth = seconds("auth_backoff_seconds", default.auth_backoff_seconds, hi=MAX_BACKOFF_SECONDS)
    auth_max = seconds(
        "auth_backoff_max_seconds", default.auth_backoff_max_seconds, hi=MAX_BACKOFF_SECONDS
    )
    if backoff_max < backoff:
        section.error(
            "backoff_max_seconds", f"expected at least backoff_initial_seconds ({backoff:g})"
        )
    if auth_max < auth:
        section.error(
            "auth_backoff_max_seconds", f"expected at least auth_backoff_seconds ({auth:g})"
        )
    return GatewayConfig(
        interval_seconds=interval,
        jitter_seconds=jitter,
        max_concurrent_polls=count(
            "max_concurrent_polls", default.max_concurrent_polls, MAX_CONCURRENT_POLLS_LIMIT
        ),
        max_connections_per_upstream=count(
            "max_connections_per_upstream",
            default.max_connections_per_upstream,
            MAX_CONNECTIONS_PER_UPSTREAM_LIMIT,
        ),
        pipelining_depth=count("pipelining_depth", default.pipelining_depth, MAX_PIPELINING_DEPTH),
        backoff_initial_seconds=backoff,
        backoff_max_seconds=backoff_max,
        auth_backoff_seconds=auth,
        auth_backoff_max_seconds=auth_max,
    )
