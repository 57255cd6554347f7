"""``popproxy explain``: dry-run the retention rules against a user's live upstream
listing, or say what the next poll of a gateway user's sources would do (docs/rules.md,
docs/gateway.md). Changes nothing upstream, in a Maildir or in the state store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from popproxy.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, load


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy explain`` and its options."""
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


def run(args: argparse.Namespace) -> int:
    """Print what the rules make of each of the user's messages; the upstream's own
    lines are logged as ``run`` writes them (cli.py sets that up)."""
    # The upstream client stack is imported only when it is needed, as for run.
    from popproxy.explain import ExplainError, describe_failure, explain, format_explanation
    from popproxy.maildrop.base import MaildropError
    from popproxy.maildrop.retention import utc_now
    from popproxy.state.base import StateError
    from popproxy.tls import TlsError

    user: str = args.user
    config = load(Path(args.config))
    if config is None:
        return EXIT_USAGE
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
