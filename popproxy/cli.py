"""The ``popproxy`` command: argv, logging setup, signals, ``trio.run`` and exit codes.

Commands::

    popproxy run -c FILE [--log-format logfmt|json] [--log-level info]
    popproxy check-config -c FILE [--against RUNNING_FILE]
    popproxy explain -c FILE --user USER
    popproxy fetch --once -c FILE [--user USER] [--log-format logfmt|json] [--log-level info]
    popproxy hash-password [--ln 15]
    popproxy oauth-login (--provider google|microsoft | -c FILE --upstream NAME) --client-id ID
                         --out FILE [--device]
    popproxy state show -c FILE [--upstream NAME] [--upstream-user USER]
    popproxy state prune -c FILE --gone-days N [--dry-run]
    popproxy audit -c FILE [--user U] [--upstream NAME] [--rule R] [--uid UIDL]
                   [--since DATE] [--limit N] [--json]
    popproxy version

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. This is the only
module that reads argv, installs signal handlers, configures logging or exits; what
``check-config``, ``state`` and ``audit`` print is built in ``popproxy/commands/``.

Signals for ``run``: SIGTERM or SIGINT start a graceful shutdown (a second one
cancels everything); SIGHUP reloads the config file (popproxy/reload.py); SIGUSR1
polls every gateway source now (docs/gateway.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import trio

from popproxy import __version__
from popproxy.auth.passwords import (
    DEFAULT_SCRYPT_LN,
    MAX_SCRYPT_LN,
    PasswordHashError,
    hash_password,
)
from popproxy.commands import check_config
from popproxy.config import (
    MAX_PORT,
    Config,
    ConfigError,
    MetricsConfig,
    OAuth2Provider,
    load_config,
)
from popproxy.config.host_checks import host_problems
from popproxy.logfmt import JsonFormatter, LogfmtFormatter, SessionFilter
from popproxy.reload import ConfigLoader, config_changes
from popproxy.sdnotify import Notifier
from popproxy.secret import Secret

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# A password read by hash-password: longer than any POP3 PASS line (RFC 2449 §4, 255
# octets) or AUTH PLAIN response could carry is a mistake (a whole file piped in).
MAX_PASSWORD_BYTES = 1024

LOG_LEVELS = ("debug", "info", "warning", "error")

# `state prune --gone-days`: a century is more than any retention; the bound keeps the
# cutoff a valid datetime.
MAX_GONE_DAYS = 36_500

# `audit --limit`: a screenful of the newest decisions by default; at most one row less
# than a store call returns (popproxy.state.base.MAX_AUDIT_ROWS; tests/commands keeps
# them so), as one more row is read to tell whether the limit cut the list.
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 99_999

# Reloads waiting to run: one is enough, as it reads the file as it is when it runs;
# a SIGHUP while one is already waiting is folded into it.
MAX_PENDING_RELOADS = 1
# SIGUSR1 requests waiting for the gateway: one polls every source; more add nothing.
MAX_PENDING_POLL_REQUESTS = 1

log = logging.getLogger("popproxy")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``popproxy`` with ``argv`` (``sys.argv[1:]`` when None); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    match args.command:
        case "run":
            return _cmd_run(Path(args.config), args.log_format, args.log_level, args.metrics_port)
        case "check-config":
            against = Path(args.against) if args.against is not None else None
            return _cmd_check_config(Path(args.config), against, running=args.against_running)
        case "explain":
            return _cmd_explain(Path(args.config), args.user)
        case "fetch":
            return _cmd_fetch(Path(args.config), args.user, args.log_format, args.log_level)
        case "hash-password":
            return _cmd_hash_password(args.ln, sys.stdin, sys.stdout, sys.stderr)
        case "oauth-login":
            return _cmd_oauth_login(args)
        case "state":
            return _cmd_state(args)
        case "audit":
            return _cmd_audit(args)
        case "version":
            print(f"popproxy {__version__}")
            return EXIT_OK
        case _:
            parser.print_help(sys.stderr)
            return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popproxy", description="A POP3 proxy and fetch gateway on Trio."
    )
    parser.add_argument("--version", action="version", version=f"popproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="serve POP3 as configured, until SIGTERM or SIGINT; SIGHUP reloads"
    )
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument(
        "--log-format",
        choices=("logfmt", "json"),
        default="logfmt",
        help="log line format on stderr (default: logfmt)",
    )
    run.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="lowest level logged (default: info)",
    )
    run.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve /metrics on this port instead of metrics.port (one per instance of"
        " several sharing a config; docs/scaling.md)",
    )

    check = commands.add_parser(
        "check-config", help="validate a config file and print what it sets up"
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    against = check.add_mutually_exclusive_group()
    against.add_argument(
        "--against",
        metavar="OLD_FILE",
        help=(
            "also compare with another config file: say what a reload (SIGHUP) from it"
            " would apply and which changes need a restart (its rules are read from its"
            " own rules_dir)"
        ),
    )
    against.add_argument(
        "--against-running",
        action="store_true",
        help=(
            "compare with the files popproxy run last loaded (the copy it keeps in"
            " snapshot_dir): what a reload now would change, rules included"
        ),
    )

    login = commands.add_parser(
        "oauth-login",
        help="get an upstream account's OAuth2 refresh token (docs/oauth2.md)",
        description=(
            "Sign in to the mail provider as the account's owner and write the refresh"
            " token to --out (mode 0600), for upstream_refresh_token_file. The settings come"
            " from --provider and the options, or from an upstream of a config (-c, --upstream);"
            " options given override them."
        ),
    )
    login.add_argument("--provider", choices=[p.value for p in OAuth2Provider])
    login.add_argument("-c", "--config", metavar="FILE", help="take the settings from this config")
    login.add_argument("--upstream", metavar="NAME", help="the config's upstream (with -c)")
    login.add_argument("--client-id", metavar="ID")
    login.add_argument("--client-secret-file", metavar="FILE")
    login.add_argument("--tenant", metavar="TENANT", help="Microsoft directory (default: common)")
    login.add_argument("--scope", metavar="SCOPES")
    login.add_argument("--token-url", metavar="URL")
    login.add_argument("--authorization-url", metavar="URL")
    login.add_argument("--device-authorization-url", metavar="URL")
    login.add_argument(
        "--device",
        action="store_true",
        help="the device flow: enter a code on any device (default: a browser on this machine)",
    )
    login.add_argument("--out", required=True, metavar="FILE", help="the refresh-token file")

    explain_cmd = commands.add_parser(
        "explain",
        help="dry-run the retention rules against a user's live upstream listing",
        description=(
            "Log in upstream as USER's sessions would, and print what the rules make of"
            " each message: shown or hidden, what a DELE or a RETR would lead to, when it"
            " expires. Changes nothing upstream or in the state store."
        ),
    )
    explain_cmd.add_argument(
        "-c", "--config", required=True, metavar="FILE", help="YAML config file"
    )
    explain_cmd.add_argument("--user", required=True, help="the local user name")

    fetch = commands.add_parser(
        "fetch",
        help="poll the gateway's fetch sources once and exit (for cron and systemd timers)",
        description=(
            "Poll every fetch source of every gateway user (or of USER) once, as a running"
            " server would, and exit: 0 if every poll succeeded, 1 if any failed."
        ),
    )
    fetch.add_argument("--once", action="store_true", required=True, help="one poll per source")
    fetch.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    fetch.add_argument("--user", help="only this local user's sources")
    fetch.add_argument(
        "--log-format", choices=("logfmt", "json"), default="logfmt", help="default: logfmt"
    )
    fetch.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")

    hashpw = commands.add_parser(
        "hash-password",
        help="hash a password for users.NAME.password_hash",
        description=(
            "Read a password (one line from standard input when it is not a terminal,"
            " else asked twice) and print its scrypt PHC hash on one line."
        ),
    )
    hashpw.add_argument(
        "--ln",
        type=int,
        default=DEFAULT_SCRYPT_LN,
        metavar="N",
        help=f"scrypt cost: N = 2**ln (default: {DEFAULT_SCRYPT_LN}, at most {MAX_SCRYPT_LN})",
    )

    _state_parser(commands)
    _audit_parser(commands)
    commands.add_parser("version", help="print the version")
    return parser


def _state_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    state = commands.add_parser(
        "state",
        help="inspect or prune the state store (docs/state.md)",
        description="Inspect or prune the state store named by state.url in the config.",
    )
    actions = state.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", help="print the stored UIDLs: sizes, first and last seen, retrievals, hides"
    )
    show.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    show.add_argument("--upstream", metavar="NAME", help="only accounts of this upstream")
    show.add_argument("--upstream-user", metavar="USER", help="only accounts of this user name")
    prune = actions.add_parser(
        "prune", help="forget UIDLs gone from their upstream's listing for N days"
    )
    prune.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    prune.add_argument(
        "--gone-days",
        type=int,
        required=True,
        metavar="N",
        help=f"forget UIDLs last listed more than N days ago (0-{MAX_GONE_DAYS})",
    )
    prune.add_argument("--dry-run", action="store_true", help="only count what would be forgotten")


def _audit_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="list the hides and upstream deletions and the rules behind them",
        description=(
            "List the audit log of the state store named by state.url: every message a"
            " QUIT hid for its user or deleted upstream, with the time, session, user,"
            " upstream account, UIDL, size, rule and action, newest first. Reads only."
        ),
    )
    audit.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    audit.add_argument("--user", metavar="U", help="only this local user's rows")
    audit.add_argument("--upstream", metavar="NAME", help="only rows of this upstream")
    audit.add_argument("--rule", metavar="R", help="only rows of this rule")
    audit.add_argument("--uid", metavar="UIDL", help="only rows of this UIDL")
    audit.add_argument(
        "--since",
        type=_since,
        metavar="DATE",
        help="only rows at or after DATE: 2024-05-01 (UTC), 2024-05-01T12:00:00Z, or 7d (days ago)",
    )
    audit.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_AUDIT_LIMIT,
        metavar="N",
        help=f"at most N rows, the newest (default: {DEFAULT_AUDIT_LIMIT}, at most"
        f" {MAX_AUDIT_LIMIT})",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines)")


def _since(text: str) -> datetime:
    """``--since`` for argparse: a bad value is a usage error (exit 2) saying what fits."""
    from popproxy.commands.audit import parse_since

    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- explain ---------------------------------------------------------------------------


def _cmd_explain(path: Path, user: str) -> int:
    # The upstream client stack is imported only when it is needed, as for run.
    from popproxy.explain import ExplainError, describe_failure, explain, format_explanation
    from popproxy.maildrop.base import MaildropError
    from popproxy.maildrop.retention import utc_now
    from popproxy.state.base import StateError
    from popproxy.tls import TlsError

    config = _load(path)
    if config is None:
        return EXIT_USAGE
    configure_logging("logfmt", "warning")  # the upstream's own lines, as run writes them
    gateway_user = config.users.get(user)
    if gateway_user is not None and gateway_user.fetch:
        from popproxy.gateway.dryrun import explain_user, format_sources

        try:
            explained = trio.run(explain_user, config, gateway_user, utc_now)
        except (MaildropError, StateError, TlsError) as exc:
            print(f"popproxy explain: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        sys.stdout.write(format_sources(user, explained))
        return EXIT_OK
    try:
        rows = trio.run(explain, config, user, utc_now)
    except ExplainError as exc:
        print(f"popproxy explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MaildropError, StateError, TlsError) as exc:
        print(f"popproxy explain: {describe_failure(exc, config, user)}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(format_explanation(user, rows))
    return EXIT_OK


# -- fetch --once ----------------------------------------------------------------------


def _cmd_fetch(path: Path, user: str | None, log_format: str, log_level: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_USAGE
    names = [u.name for u in config.gateway_users]
    if user is not None and user not in names:
        print(f"popproxy fetch: {user!r} is not a user with fetch sources", file=sys.stderr)
        return EXIT_USAGE
    if not names:
        print("popproxy fetch: no user has fetch sources", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(log_format, log_level)
    from popproxy.state import StateError

    try:
        results = trio.run(_fetch_once, config, None if user is None else [user])
    except StateError as exc:
        log.error("state_unavailable", extra={"fields": {"reason": str(exc)}})  # noqa: TRY400
        return EXIT_FAILURE
    return EXIT_OK if all(ok for ok in results) else EXIT_FAILURE


async def _fetch_once(config: Config, users: list[str] | None) -> list[bool]:
    from popproxy.gateway.fetcher import Fetcher
    from popproxy.gateway.leases import LeasedPoller, poll_locks
    from popproxy.gateway.schedule import poll_once
    from popproxy.maildrop.retention import utc_now
    from popproxy.outcomes import PollResult
    from popproxy.state import open_store
    from popproxy.state.base import GatewayStore

    store = await open_store(config.state)

    async def get() -> GatewayStore:
        return store

    wait = config.limits.account_wait_seconds
    try:
        async with poll_locks(config.state) as locks:
            poller = LeasedPoller(Fetcher(get, clock=utc_now), locks, wait_seconds=wait)
            reports = await poll_once(poller, config, users)
    finally:
        await store.aclose()
    # busy: another instance (a running server) was polling the source meanwhile
    return [report.result in {PollResult.OK, PollResult.BUSY} for report in reports]


# -- check-config ----------------------------------------------------------------------


def _load(path: Path, *, on_this_host: bool = False) -> Config | None:
    """Load the config, printing every problem to stderr as FILE: key.path: message.

    ``on_this_host``: also what ``run`` would meet at start here (``check-config`` and
    ``run`` itself; see popproxy/config/host_checks.py).
    """
    try:
        config = load_config(path)
        issues = host_problems(config) if on_this_host else ()
    except ConfigError as exc:
        issues = exc.issues
    else:
        if not issues:
            return config
    for issue in issues:
        print(issue, file=sys.stderr)
    print(f"{path}: {len(issues)} problem(s) found", file=sys.stderr)
    return None


def _cmd_oauth_login(args: argparse.Namespace) -> int:
    from popproxy.commands.oauth_login import LoginOptions, UsageError, login_settings
    from popproxy.oauth2.flows import LoginFailed, code_flow, device_flow
    from popproxy.oauth2.token_file import TokenFileError

    def path(value: str | None) -> Path | None:
        return Path(value) if value is not None else None

    options = LoginOptions(
        provider=OAuth2Provider(args.provider) if args.provider else None,
        config=path(args.config),
        upstream=args.upstream,
        client_id=args.client_id,
        client_secret_file=path(args.client_secret_file),
        tenant=args.tenant,
        scope=args.scope,
        token_url=args.token_url,
        authorization_url=args.authorization_url,
        device_authorization_url=args.device_authorization_url,
    )
    try:
        oauth2 = login_settings(options)
    except UsageError as exc:
        print(f"popproxy oauth-login: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    flow = device_flow if args.device else code_flow
    try:
        flow(oauth2, Path(args.out), say)
    except (LoginFailed, TokenFileError) as exc:
        print(f"popproxy oauth-login: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_check_config(path: Path, against: Path | None = None, *, running: bool = False) -> int:
    config = _load(path, on_this_host=True)
    if config is None:
        return EXIT_USAGE
    print(check_config.summarize(config))
    if against is not None:
        old = _load(against)
        if old is None:
            return EXIT_USAGE
        print(check_config.describe_changes(config_changes(old, config), str(against)))
    if running:
        return _against_running(config)
    return EXIT_OK


def _against_running(config: Config) -> int:
    """check-config --against-running: compare with what ``run`` last loaded."""
    from popproxy.config.snapshot import SnapshotError, load_snapshot, snapshot_dir_of

    directory = snapshot_dir_of(config)
    if directory is None:
        print(
            "popproxy check-config: no snapshot to compare with: set snapshot_dir (a"
            " PostgreSQL state has no directory of its own for it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        snapshot = load_snapshot(directory)
    except SnapshotError as exc:
        print(f"popproxy check-config: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{directory}: the running config's copy no longer loads", file=sys.stderr)
        return EXIT_FAILURE
    label = f"the running config (loaded {snapshot.loaded_at}, copy in {directory})"
    print(check_config.describe_changes(config_changes(snapshot.config, config), label))
    return EXIT_OK


# -- hash-password ---------------------------------------------------------------------


def _cmd_hash_password(ln: int, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    if stdin.isatty():
        first = getpass.getpass("Password: ").encode("utf-8")
        second = getpass.getpass("Again: ").encode("utf-8")
        if first != second:
            print("popproxy: the passwords do not match", file=stderr)
            return EXIT_USAGE
        raw = first
    else:
        # The octets as given, so a non-UTF-8 password hashes as the client will send it.
        source = getattr(stdin, "buffer", None)
        line = (
            source.readline(MAX_PASSWORD_BYTES + 2)
            if source is not None
            else stdin.readline(MAX_PASSWORD_BYTES + 2).encode("utf-8")
        )
        raw = line.removesuffix(b"\n").removesuffix(b"\r")
        if len(raw) > MAX_PASSWORD_BYTES:
            print(
                f"popproxy: the password is longer than {MAX_PASSWORD_BYTES} octets",
                file=stderr,
            )
            return EXIT_USAGE
    if not raw:
        print("popproxy: refusing to hash an empty password", file=stderr)
        return EXIT_USAGE
    try:
        phc = hash_password(Secret(raw), ln=ln)
    except PasswordHashError as exc:
        print(f"popproxy: {exc}", file=stderr)
        return EXIT_USAGE
    print(phc, file=stdout)
    return EXIT_OK


# -- state -----------------------------------------------------------------------------


def _state_missing(config: Config) -> bool:
    """Whether the config names a sqlite file that does not exist (and say so)."""
    path = config.state.sqlite_path
    if path is not None and not path.exists():
        print(
            f"popproxy: no state store at {path} (popproxy creates it when it first runs)",
            file=sys.stderr,
        )
        return True
    return False


def _cmd_state(args: argparse.Namespace) -> int:
    config = _load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    if _state_missing(config):
        return EXIT_FAILURE
    # The state store is imported only when it is needed, as for run.
    from popproxy.commands import state
    from popproxy.state import StateError

    try:
        match args.state_command:
            case "show":
                rows = trio.run(
                    state.stored_messages, config.state, args.upstream, args.upstream_user
                )
                print(state.format_stored(rows))
                sources = trio.run(
                    state.gateway_sources, config.state, args.upstream, args.upstream_user
                )
                if sources:
                    print()
                    print(state.format_sources(sources))
            case "prune":
                if not 0 <= args.gone_days <= MAX_GONE_DAYS:
                    print(f"popproxy: --gone-days must be 0-{MAX_GONE_DAYS}", file=sys.stderr)
                    return EXIT_USAGE
                now = datetime.now(UTC)
                cutoff = now - timedelta(days=args.gone_days)
                retention = config.state.audit_retention_days
                audit_cutoff = now - timedelta(days=retention)
                count, trimmed = trio.run(
                    state.prune, config.state, cutoff, audit_cutoff, args.dry_run
                )
                verb = "would forget" if args.dry_run else "forgot"
                print(
                    f"{verb} {count} UIDL(s) gone from their upstream and last listed"
                    f" before {state.utc(cutoff)}"
                )
                verb = "would delete" if args.dry_run else "deleted"
                print(
                    f"{verb} {trimmed} audit row(s) from before {state.utc(audit_cutoff)}"
                    f" (state.audit_retention_days: {retention})"
                )
    except StateError as exc:
        print(f"popproxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# -- audit -----------------------------------------------------------------------------


def _cmd_audit(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_AUDIT_LIMIT:
        print(f"popproxy audit: --limit must be 1-{MAX_AUDIT_LIMIT}", file=sys.stderr)
        return EXIT_USAGE
    config = _load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    if _state_missing(config):
        return EXIT_FAILURE
    # The state store is imported only when it is needed, as for run.
    from popproxy.commands import audit
    from popproxy.state import StateError
    from popproxy.state.base import AuditQuery

    query = AuditQuery(
        user=args.user,
        upstream=args.upstream,
        rule=args.rule,
        uid=args.uid,
        since=args.since,
        limit=args.limit + 1,  # one more tells whether the limit cut the list
    )
    try:
        rows = trio.run(audit.audit_entries, config.state, query)
    except ValueError as exc:  # a filter no config could name (empty, too long, NUL)
        print(f"popproxy audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"popproxy audit: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    shown = rows[: args.limit]
    if args.json:
        sys.stdout.write(audit.format_json_lines(shown))
    else:
        print(audit.format_table(shown))
    if len(rows) > args.limit:
        print(
            f"popproxy audit: showing the newest {args.limit} rows; narrow with --user,"
            " --upstream, --rule, --uid or --since, or raise --limit",
            file=sys.stderr,
        )
    return EXIT_OK


# -- run -------------------------------------------------------------------------------


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Send the ``popproxy`` loggers to ``stream`` (stderr) as logfmt or JSON lines."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    handler.addFilter(SessionFilter())
    root = logging.getLogger("popproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"expected a port number 0-{MAX_PORT}, got {text!r}")
    return port


def _with_metrics_port(config: Config, port: int | None) -> Config:
    """``config`` with its exporter on ``port`` (``--metrics-port``), if one is given."""
    if port is None:
        return config
    return dataclasses.replace(
        config, metrics=dataclasses.replace(config.metrics or MetricsConfig(), port=port)
    )


def _cmd_run(path: Path, log_format: str, log_level: str, metrics_port: int | None = None) -> int:
    loaded = _load(path, on_this_host=True)
    if loaded is None:
        return EXIT_USAGE
    config = _with_metrics_port(loaded, metrics_port)
    configure_logging(log_format, log_level)
    from popproxy import serve  # the server stack is imported only when it is needed

    try:
        trio.run(_run, config, path, Notifier.from_environ(os.environ), metrics_port)
    except Exception as exc:
        # Errors from inside nurseries arrive wrapped in ExceptionGroups.
        group = exc if isinstance(exc, ExceptionGroup) else ExceptionGroup("run", [exc])
        expected, unexpected = group.split(serve.ServeError)
        for error in _leaves(expected):
            log.error("startup_failed", extra={"fields": {"reason": str(error)}})  # noqa: TRY400
        if unexpected is not None:
            log.error("crashed", exc_info=unexpected)  # noqa: TRY400
        return EXIT_FAILURE
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException] | None) -> list[BaseException]:
    if group is None:
        return []
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _run(
    config: Config, path: Path, notifier: Notifier, metrics_port: int | None = None
) -> None:
    from prometheus_client import CollectorRegistry

    from popproxy.metrics import Metrics
    from popproxy.serve import serve

    # The one Metrics of this process, on a registry of its own (never the library's
    # global one); serve() declares the configured names and runs the exporter.
    metrics = Metrics(CollectorRegistry())
    shutdown = trio.Event()
    send_reload, receive_reload = trio.open_memory_channel[ConfigLoader](MAX_PENDING_RELOADS)
    send_poll, receive_poll = trio.open_memory_channel[None](MAX_PENDING_POLL_REQUESTS)

    def reload_config() -> Config:  # the same file, read afresh each time
        return _with_metrics_port(load_config(path), metrics_port)

    async with trio.open_nursery() as nursery, send_reload, send_poll:
        await nursery.start(
            _watch_signals,
            shutdown,
            nursery.cancel_scope,
            send_reload,
            reload_config,
            send_poll,
        )
        await serve(
            config,
            shutdown=shutdown,
            reloads=receive_reload,
            notifier=notifier,
            metrics=metrics,
            poll_requests=receive_poll,
        )
        nursery.cancel_scope.cancel()


async def _watch_signals(
    shutdown: trio.Event,
    cancel_scope: trio.CancelScope,
    reloads: trio.MemorySendChannel[ConfigLoader],
    reload_config: ConfigLoader,
    polls: trio.MemorySendChannel[None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM/SIGINT: the first starts a graceful shutdown, a second cancels everything.

    SIGHUP asks the server to reload the config (``reload_config``), unless a reload
    is already waiting or the server is shutting down. SIGUSR1 asks the gateway to
    poll every source now (folded into one that is already waiting).
    """
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    with trio.open_signal_receiver(*watched) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _request_reload(shutdown, reloads, reload_config)
            elif signum == signal.SIGUSR1:
                action = "poll_now"
                try:
                    polls.send_nowait(None)
                except trio.WouldBlock:
                    action = "poll_already_pending"
                log.info("signal", extra={"fields": {"signal": name, "action": action}})
            elif not shutdown.is_set():
                log.info("signal", extra={"fields": {"signal": name, "action": "shutdown"}})
                shutdown.set()
            else:
                log.warning("signal", extra={"fields": {"signal": name, "action": "cancel"}})
                cancel_scope.cancel()
                return


def _request_reload(
    shutdown: trio.Event,
    reloads: trio.MemorySendChannel[ConfigLoader],
    reload_config: ConfigLoader,
) -> None:
    fields: dict[str, object] = {"signal": "SIGHUP", "action": "reload"}
    if shutdown.is_set():
        fields["action"] = "ignored_shutting_down"
    else:
        try:
            reloads.send_nowait(reload_config)
        except trio.WouldBlock:
            fields["action"] = "reload_already_pending"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            fields["action"] = "ignored_not_serving"
    log.info("signal", extra={"fields": fields})
