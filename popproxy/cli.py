"""The ``popproxy`` command: argv, dispatch, logging setup, signals and exit codes.

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
module that reads argv, installs signal handlers, configures logging or exits. It
keeps the top-level parser, the dispatch, ``run`` and ``version``; every other
subcommand is a module of ``popproxy/commands/`` that declares its options
(``add_parser``), does its work and returns the exit code (``run``).

Signals for ``run``: SIGTERM or SIGINT start a graceful shutdown (a second one
cancels everything); SIGHUP reloads the config file (popproxy/reload.py); SIGUSR1
polls every gateway source now (docs/gateway.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

from popproxy import __version__
from popproxy.commands import (
    audit,
    check_config,
    explain,
    fetch,
    hash_password,
    oauth_login,
    state,
)
from popproxy.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, LOG_LEVELS, load
from popproxy.config import MAX_PORT, Config, MetricsConfig, load_config
from popproxy.logfmt import JsonFormatter, LogfmtFormatter, SessionFilter
from popproxy.reload import ConfigLoader
from popproxy.sdnotify import Notifier

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
            return check_config.run(args)
        case "explain":
            configure_logging("logfmt", "warning")  # the upstream's own lines, as run writes them
            return explain.run(args)
        case "fetch":
            configure_logging(args.log_format, args.log_level)
            return fetch.run(args)
        case "hash-password":
            return hash_password.run(args)
        case "oauth-login":
            return oauth_login.run(args)
        case "state":
            return state.run(args)
        case "audit":
            return audit.run(args)
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

    check_config.add_parser(commands)
    oauth_login.add_parser(commands)
    explain.add_parser(commands)
    fetch.add_parser(commands)
    hash_password.add_parser(commands)
    state.add_parser(commands)
    audit.add_parser(commands)
    commands.add_parser("version", help="print the version")
    return parser


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
    # Neither formatter writes a thread, process or multiprocessing name, so no record
    # looks them up (a few microseconds of every session_end line).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


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
    loaded = load(path, on_this_host=True)
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
