"""The ``popproxy`` command: argv, logging setup, signals, ``trio.run`` and exit codes.

Commands::

    popproxy run -c FILE [--log-format logfmt|json] [--log-level info]
    popproxy check-config -c FILE [--against RUNNING_FILE]
    popproxy explain -c FILE --user USER
    popproxy hash-password [--ln 15]
    popproxy state show -c FILE [--upstream NAME] [--upstream-user USER]
    popproxy state prune -c FILE --gone-days N [--dry-run]
    popproxy version

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. This is the only
module that reads argv, installs signal handlers, configures logging or exits.

Signals for ``run``: SIGTERM or SIGINT start a graceful shutdown (a second one
cancels everything); SIGHUP reloads the config file (popproxy/reload.py).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import trio

from popproxy import __version__
from popproxy.auth.passwords import (
    DEFAULT_SCRYPT_LN,
    MAX_SCRYPT_LN,
    PasswordHashError,
    hash_password,
)
from popproxy.config import Config, ConfigError, load_config
from popproxy.logfmt import JsonFormatter, LogfmtFormatter
from popproxy.maildrop.route import MaildirRoute, UpstreamRoute, route_of
from popproxy.policy import EXPIRE_NEVER, AccountPolicy, Action, Setting
from popproxy.reload import ConfigChanges, ConfigLoader, NamedChanges, config_changes
from popproxy.sdnotify import Notifier
from popproxy.secret import Secret

if TYPE_CHECKING:
    from popproxy.config import StateConfig
    from popproxy.state.base import AccountKey, StoredMessage

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

# Reloads waiting to run: one is enough, as it reads the file as it is when it runs;
# a SIGHUP while one is already waiting is folded into it.
MAX_PENDING_RELOADS = 1

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
            return _cmd_run(Path(args.config), args.log_format, args.log_level)
        case "check-config":
            against = Path(args.against) if args.against is not None else None
            return _cmd_check_config(Path(args.config), against)
        case "explain":
            return _cmd_explain(Path(args.config), args.user)
        case "hash-password":
            return _cmd_hash_password(args.ln, sys.stdin, sys.stdout, sys.stderr)
        case "state":
            return _cmd_state(args)
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

    check = commands.add_parser(
        "check-config", help="validate a config file and print what it sets up"
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    check.add_argument(
        "--against",
        metavar="RUNNING_FILE",
        help=(
            "also compare with the config popproxy runs with (a copy of it): say what a"
            " reload (SIGHUP) would apply and which changes need a restart"
        ),
    )

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


# -- explain ---------------------------------------------------------------------------


def _cmd_explain(path: Path, user: str) -> int:
    # The upstream client stack is imported only when it is needed, as for run.
    from popproxy.explain import ExplainError, explain, format_explanation
    from popproxy.maildrop.base import MaildropError
    from popproxy.maildrop.retention import utc_now
    from popproxy.state.base import StateError
    from popproxy.tls import TlsError

    config = _load(path)
    if config is None:
        return EXIT_USAGE
    try:
        rows = trio.run(explain, config, user, utc_now)
    except ExplainError as exc:
        print(f"popproxy explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MaildropError, StateError, TlsError) as exc:
        print(f"popproxy explain: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(format_explanation(user, rows))
    return EXIT_OK


# -- check-config ----------------------------------------------------------------------


def _load(path: Path) -> Config | None:
    """Load the config, printing every problem to stderr as FILE: key.path: message."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{path}: {len(exc.issues)} problem(s) found", file=sys.stderr)
        return None


def _cmd_check_config(path: Path, against: Path | None = None) -> int:
    config = _load(path)
    if config is None:
        return EXIT_USAGE
    print(summarize(config))
    if against is not None:
        running = _load(against)
        if running is None:
            return EXIT_USAGE
        print(describe_changes(config_changes(running, config), against))
    return EXIT_OK


def describe_changes(changes: ConfigChanges, against: Path) -> str:
    """What check-config --against prints: the changes a reload applies, those needing a restart."""
    if not changes:
        return f"against {against}: no changes"
    lines = [f"against {against}:"]
    if changes.reloadable:
        notes = {
            **_entry_notes("users", changes.users),
            **_entry_notes("upstreams", changes.upstreams),
        }
        lines.append("  applied by a reload (SIGHUP):")
        lines.extend(f"    {path}{notes.get(path, '')}" for path in changes.reloadable)
    if changes.restart_required:
        lines.append("  restart required (a reload logs these and leaves them as they run):")
        lines.extend(f"    {path}" for path in changes.restart_required)
    lines.append(f"restart required: {'yes' if changes.restart_required else 'no'}")
    return "\n".join(lines)


def _entry_notes(section: str, named: NamedChanges) -> dict[str, str]:
    notes = {f"{section}.{name}": " (added)" for name in named.added}
    notes.update({f"{section}.{name}": " (removed)" for name in named.removed})
    return notes


def summarize(config: Config) -> str:
    """A short human summary of the effective config (what check-config prints)."""
    lines = [f"{config.source}: ok"]
    lines.append("listen:")
    for listener in config.listen:
        proxy = " proxy_protocol=true" if listener.proxy_protocol else ""
        where = _host_port(listener.address, listener.port)
        lines.append(f"  {where} tls={listener.tls.value}{proxy}")
    if config.trusted_proxies:
        lines.append("trusted_proxies: " + " ".join(str(n) for n in config.trusted_proxies))
    if config.tls is not None:
        lines.append(f"tls: cert_file={config.tls.cert_file} key_file={config.tls.key_file}")
    lines.append(f"allow_plaintext_auth: {'true' if config.allow_plaintext_auth else 'false'}")
    if config.upstreams:
        lines.append("upstreams:")
        for up in config.upstreams.values():
            extra = "" if up.verify else " verify=false"
            if up.ca_file is not None:
                extra += f" ca_file={up.ca_file}"
            lines.append(f"  {up.name}: {_host_port(up.host, up.port)} tls={up.tls.value}{extra}")
    lines.append(f"users: {len(config.users)}")
    for user in config.users.values():
        match route_of(user, config.upstreams):
            case MaildirRoute(path):
                missing = "" if path.is_dir() else " (does not exist yet)"
                lines.append(f"  {user.name}: maildir {path}{missing}")
            case UpstreamRoute(upstream, upstream_user):
                lines.append(f"  {user.name}: upstream {upstream.name} as {upstream_user}")
    lines.append(f"state: {config.state.url}")
    if config.rules_dir is not None:
        lines.append(f"rules_dir: {config.rules_dir}")
    lines.extend(describe_policy(config))
    if config.metrics is not None:
        lines.append(f"metrics: {_host_port(config.metrics.address, config.metrics.port)}")
    limits = config.limits
    lines.append(
        "limits: "
        + " ".join(
            f"{name}={getattr(limits, name):g}" for name in type(limits).__dataclass_fields__
        )
    )
    return "\n".join(lines)


def describe_policy(config: Config) -> list[str]:
    """The effective retention policy of each local user (docs/rules.md, Checking rules).

    For each user routed to an upstream: the rules that can apply, in order, then
    what DELE and RETR do, the expiry and hiding that can apply, each with the rule
    that says so (``[default]`` when none does), and the EXPIRE value (RFC 2449 §6.7).
    """
    policy = config.policy
    files = sorted({rule.source for rule in policy.rules})
    lines = [f"rules: {len(policy.rules)} in {len(files)} file(s)"]
    for source in files:
        names = ", ".join(rule.name for rule in policy.rules if rule.source == source)
        lines.append(f"  {source}: {names}")
    lines.append(f"policy: EXPIRE before login: {policy.expire_before_login()}")
    for user in config.users.values():
        match route_of(user, config.upstreams):
            case MaildirRoute():
                effects = f"maildir, no rules; DELE deletes; EXPIRE {EXPIRE_NEVER}"
                lines.append(f"  {user.name}: {effects}")
            case UpstreamRoute(upstream):
                account = policy.for_user(user.name, upstream.name)
                lines.append(f"  {user.name} (upstream {upstream.name}):")
                lines.append("    rules, in order:" if account.rules else "    rules: none")
                lines.extend(f"      {r.name} ({r.source}): {r.summary()}" for r in account.rules)
                lines.extend(f"    {line}" for line in _account_effects(account))
                lines.append(f"    EXPIRE {account.expire}")
    return lines


def _account_effects(account: AccountPolicy) -> list[str]:
    """What DELE, RETR, expiry and hiding can do for this account, each with its rule."""
    actions = account.outcomes(Setting.ACTION)
    dele: list[str] = []
    retr: list[str] = []
    hidden: list[str] = []
    for outcome in actions:
        match outcome.value:
            case Action.KEEP:
                dele.append(f"hides it for this user [{outcome.rule}]")
                retr.append(f"left upstream [{outcome.rule}]")
            case Action.DELETE:
                dele.append(f"deletes upstream [{outcome.rule}]")
                retr.append(f"left upstream [{outcome.rule}]")
            case Action.DELETE_AFTER_RETRIEVE:
                dele.append(f"deletes upstream [{outcome.rule}]")
                retr.append(f"deleted upstream at QUIT [{outcome.rule}]")
            case Action.HIDE:
                hidden.append(f"hide [{outcome.rule}]")
    expiry = [
        f"never [{o.rule}]" if o.value is None else f"after {o.value} days [{o.rule}]"
        for o in account.outcomes(Setting.EXPIRE_AFTER_DAYS)
    ]
    hidden.extend(
        f"over {o.value} bytes [{o.rule}]"
        for o in account.outcomes(Setting.MAX_SIZE_BYTES)
        if o.value is not None
    )
    return [
        "DELE: " + ("; ".join(dele) or "no message is shown"),
        "RETR without DELE: " + ("; ".join(dict.fromkeys(retr)) or "no message is shown"),
        "expiry: " + "; ".join(expiry),
        "not shown: " + ("; ".join(hidden) or "none"),
        "headers read at login (TOP n 0): " + ("yes" if account.needs_headers else "no"),
    ]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def _cmd_state(args: argparse.Namespace) -> int:
    config = _load(Path(args.config))
    if config is None:
        return EXIT_USAGE
    path = config.state.sqlite_path
    if path is not None and not path.exists():
        print(
            f"popproxy: no state store at {path} (popproxy creates it when it first runs)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    from popproxy.state import StateError

    try:
        match args.state_command:
            case "show":
                rows = trio.run(_stored_messages, config.state, args.upstream, args.upstream_user)
                print(format_stored(rows))
            case "prune":
                if not 0 <= args.gone_days <= MAX_GONE_DAYS:
                    print(f"popproxy: --gone-days must be 0-{MAX_GONE_DAYS}", file=sys.stderr)
                    return EXIT_USAGE
                cutoff = datetime.now(UTC) - timedelta(days=args.gone_days)
                count = trio.run(_prune, config.state, cutoff, args.dry_run)
                verb = "would forget" if args.dry_run else "forgot"
                print(
                    f"{verb} {count} UIDL(s) gone from their upstream and last listed"
                    f" before {_utc(cutoff)}"
                )
    except StateError as exc:
        print(f"popproxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _stored_messages(
    state: StateConfig, upstream: str | None, upstream_user: str | None
) -> Sequence[StoredMessage]:
    from popproxy.state import open_store
    from popproxy.state.base import AccountKey

    store = await open_store(state)
    try:
        if upstream is not None and upstream_user is not None:
            return await store.messages(AccountKey(upstream, upstream_user))
        rows = await store.messages()
    finally:
        await store.aclose()
    return [
        row
        for row in rows
        if upstream in (None, row.account.upstream)
        and upstream_user in (None, row.account.upstream_user)
    ]


async def _prune(state: StateConfig, cutoff: datetime, dry_run: bool) -> int:
    from popproxy.state import open_store

    store = await open_store(state)
    try:
        if dry_run:
            return sum(row.is_gone(cutoff) for row in await store.messages())
        return await store.prune(cutoff)
    finally:
        await store.aclose()


_STORED_COLUMNS = (
    "UIDL",
    "SIZE",
    "FIRST SEEN",
    "LAST SEEN",
    "RETRIEVED BY",
    "HIDDEN FOR",
    "DELETED UPSTREAM",
)


def format_stored(rows: Sequence[StoredMessage]) -> str:
    """What ``state show`` prints: per account a header line and a table of its UIDLs."""
    if not rows:
        return "no UIDLs stored"
    accounts: dict[AccountKey, list[StoredMessage]] = {}
    for row in rows:
        accounts.setdefault(row.account, []).append(row)
    blocks = []
    for account, messages in accounts.items():
        listed = messages[0].account_last_listed
        header = f"{account.upstream} {account.upstream_user}: {len(messages)} UIDL(s)" + (
            f", last listed {_utc(listed)}" if listed is not None else ""
        )
        table = [_STORED_COLUMNS, *(_stored_cells(m) for m in messages)]
        widths = [max(len(cells[i]) for cells in table) for i in range(len(_STORED_COLUMNS))]
        lines = [
            "  "
            + "  ".join(
                cell.rjust(width) if column == 1 else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
            for cells in table
        ]
        blocks.append("\n".join([header, *lines]))
    return "\n\n".join(blocks)


def _stored_cells(row: StoredMessage) -> tuple[str, ...]:
    retrieved = ", ".join(f"{user} {_utc(at)}" for user, at in row.retrieved_by)
    hidden = ", ".join(f"{user} by {rule} {_utc(at)}" for user, rule, at in row.hidden_for)
    deleted = (
        f"{_utc(row.deleted_upstream_at)} by {row.deleted_by_rule}"
        if row.deleted_upstream_at is not None
        else ""
    )
    return (
        row.uid,
        str(row.size),
        _utc(row.first_seen),
        _utc(row.last_seen),
        retrieved or "-",
        hidden or "-",
        deleted or "-",
    )


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# -- run -------------------------------------------------------------------------------


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Send the ``popproxy`` loggers to ``stream`` (stderr) as logfmt or JSON lines."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger("popproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def _cmd_run(path: Path, log_format: str, log_level: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_USAGE
    configure_logging(log_format, log_level)
    from popproxy import serve  # the server stack is imported only when it is needed

    try:
        trio.run(_run, config, path, Notifier.from_environ(os.environ))
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


async def _run(config: Config, path: Path, notifier: Notifier) -> None:
    from prometheus_client import CollectorRegistry

    from popproxy.metrics import Metrics
    from popproxy.serve import serve

    # The one Metrics of this process, on a registry of its own (never the library's
    # global one); serve() declares the configured names and runs the exporter.
    metrics = Metrics(CollectorRegistry())
    shutdown = trio.Event()
    send_reload, receive_reload = trio.open_memory_channel[ConfigLoader](MAX_PENDING_RELOADS)
    reload_config = functools.partial(load_config, path)  # the same file, read afresh each time
    async with trio.open_nursery() as nursery, send_reload:
        await nursery.start(
            _watch_signals, shutdown, nursery.cancel_scope, send_reload, reload_config
        )
        await serve(
            config,
            shutdown=shutdown,
            reloads=receive_reload,
            notifier=notifier,
            metrics=metrics,
        )
        nursery.cancel_scope.cancel()


async def _watch_signals(
    shutdown: trio.Event,
    cancel_scope: trio.CancelScope,
    reloads: trio.MemorySendChannel[ConfigLoader],
    reload_config: ConfigLoader,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM/SIGINT: the first starts a graceful shutdown, a second cancels everything.

    SIGHUP asks the server to reload the config (``reload_config``), unless a reload
    is already waiting or the server is shutting down.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                _request_reload(shutdown, reloads, reload_config)
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
