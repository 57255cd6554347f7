"""YAML config -> a frozen, validated :class:`Config` (DESIGN.md, "Config (the contract)").

Every problem is reported, not just the first, each naming the file, the key path
and what was expected: ``popproxy.yaml: users.alice.password_hash: expected a PHC
hash string``. Secrets are never inline: an upstream password is read at load, from
the file or environment variable the config names, into a :class:`Secret`. Relative
paths (Maildirs, certificates, rules, the sqlite file) resolve against the working
directory at load time; the loaded config holds absolute paths.
docs/configuration.md lists every key.

The package, by job:

- ``model.py``: the frozen dataclasses; a section's keys are its fields' names.
- ``reader.py``: the strict YAML reader (YAML 1.2 scalars, duplicate keys refused).
- ``fields.py``: the config's own field checks (TLS modes, paths, hosts); the
  generic ones are shared with the rule files, in ``popproxy/policy/fields.py``.
- ``schema.py`` (with ``users.py`` and ``limits.py``): each section checked and built.
- ``rules.py``: the files of ``rules_dir``; ``popproxy/policy/schema.py`` builds their rules.
- ``snapshot.py``: the copy of the loaded files ``run`` keeps (``check-config
  --against-running``); ``host_checks.py``: what ``run`` needs of this host.
"""

from __future__ import annotations

from popproxy.config.fields import MAX_HOST_CHARS
from popproxy.config.limits import (
    MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT,
    MAX_AUTH_CACHE_SIZE_LIMIT,
    MAX_BAD_COMMANDS_LIMIT,
    MAX_LOCKOUT_FAILURES_LIMIT,
    MAX_PENDING_VERIFICATIONS_LIMIT,
    MAX_SESSIONS_LIMIT,
)
from popproxy.config.model import (
    Config,
    ConfigError,
    FetchSource,
    GatewayConfig,
    IPNetwork,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    OAuth2Config,
    OAuth2Provider,
    StateConfig,
    TlsConfig,
    TlsMode,
    UpstreamAuth,
    UpstreamConfig,
    UpstreamLogin,
    UserConfig,
)
from popproxy.config.reader import MAX_CONFIG_BYTES
from popproxy.config.rules import MAX_RULE_FILE_BYTES, MAX_RULE_FILES, MAX_RULES_DIR_ENTRIES
from popproxy.config.schema import (
    MAX_PORT,
    MAX_STATE_BUSY_TIMEOUT_SECONDS,
    MAX_UPSTREAM_NAME_CHARS,
    POP3_PORT,
    POP3S_PORT,
    load_config,
)
from popproxy.config.secrets import MAX_SECRET_FILE_BYTES
from popproxy.policy.fields import ConfigIssue

__all__ = [
    "MAX_ADDRESS_LOCKOUT_FAILURES_LIMIT",
    "MAX_AUTH_CACHE_SIZE_LIMIT",
    "MAX_BAD_COMMANDS_LIMIT",
    "MAX_CONFIG_BYTES",
    "MAX_HOST_CHARS",
    "MAX_LOCKOUT_FAILURES_LIMIT",
    "MAX_PENDING_VERIFICATIONS_LIMIT",
    "MAX_PORT",
    "MAX_RULES_DIR_ENTRIES",
    "MAX_RULE_FILES",
    "MAX_RULE_FILE_BYTES",
    "MAX_SECRET_FILE_BYTES",
    "MAX_SESSIONS_LIMIT",
    "MAX_STATE_BUSY_TIMEOUT_SECONDS",
    "MAX_UPSTREAM_NAME_CHARS",
    "POP3S_PORT",
    "POP3_PORT",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "FetchSource",
    "GatewayConfig",
    "IPNetwork",
    "LimitsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "OAuth2Config",
    "OAuth2Provider",
    "StateConfig",
    "TlsConfig",
    "TlsMode",
    "UpstreamAuth",
    "UpstreamConfig",
    "UpstreamLogin",
    "UserConfig",
    "load_config",
]
