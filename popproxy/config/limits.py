"""The ``limits`` section: timeouts, counts and the throttling of logins (docs/configuration.md)."""

from __future__ import annotations

from popproxy.config.fields import ConfigSection
from popproxy.config.model import LimitsConfig
from popproxy.policy.fields import keys_of
from popproxy.pop3.limits import (
    COMMAND_LINE_CEILING_OCTETS,
    MAX_COMMAND_LINE_OCTETS,
    SASL_LINE_CEILING_OCTETS,
    SASL_PAYLOAD_CEILING_OCTETS,
    SASL_PAYLOAD_FLOOR_OCTETS,
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
# A known source older than ten years is not "lately"; the per-user count is the state
# store's bound (popproxy/state/checks.py MAX_KNOWN_SOURCES).
MAX_KNOWN_SOURCE_DAYS_LIMIT = 3650
MAX_KNOWN_SOURCES_PER_USER_LIMIT = 1000

_LIMIT_KEYS = keys_of(LimitsConfig)


def build_limits(top: ConfigSection) -> LimitsConfig:
    """The ``limits`` section, defaults for what it does not give."""
    default = LimitsConfig()
    if not top.has("limits"):
        return default
    section = ConfigSection.of(top.issues, "limits", top.raw("limits"), _LIMIT_KEYS)
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
        auth_known_source_days=count(
            "auth_known_source_days",
            default.auth_known_source_days,
            MAX_KNOWN_SOURCE_DAYS_LIMIT,
            lo=0,
        ),
        auth_known_sources_per_user=count(
            "auth_known_sources_per_user",
            default.auth_known_sources_per_user,
            MAX_KNOWN_SOURCES_PER_USER_LIMIT,
        ),
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
