"""``popproxy check-config``: its options, and what it prints: the effective config, the
retention policy of each user, and with ``--against`` what a reload would apply
(docs/configuration.md, docs/rules.md "Checking rules", docs/operations.md "Reloading")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from popproxy.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Subcommands, load
from popproxy.config import Config, ConfigError, FetchSource
from popproxy.maildrop.route import MaildirRoute, UpstreamRoute, route_of
from popproxy.policy import EXPIRE_NEVER, AccountPolicy, Action, Setting
from popproxy.reload import ConfigChanges, NamedChanges, config_changes


def add_parser(commands: Subcommands) -> None:
    """Declare ``popproxy check-config`` and its options."""
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


def run(args: argparse.Namespace) -> int:
    """Print the summary, and the changes against the other config or the running one."""
    config = load(Path(args.config), on_this_host=True)
    if config is None:
        return EXIT_USAGE
    print(summarize(config))
    if args.against is not None:
        against = Path(args.against)
        old = load(against)
        if old is None:
            return EXIT_USAGE
        print(describe_changes(config_changes(old, config), str(against)))
    if args.against_running:
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
    print(describe_changes(config_changes(snapshot.config, config), label))
    return EXIT_OK


def describe_changes(changes: ConfigChanges, against: str) -> str:
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
            if up.oauth2 is not None:
                oauth2 = up.oauth2
                provider = f" provider={oauth2.provider.value}" if oauth2.provider else ""
                secret = " client_secret=set" if oauth2.client_secret else ""
                extra += (
                    f" auth={up.auth.value}{provider} client_id={oauth2.client_id}{secret}"
                    f" token_url={oauth2.token_url} scope={oauth2.scope!r}"
                )
            lines.append(f"  {up.name}: {_host_port(up.host, up.port)} tls={up.tls.value}{extra}")
    lines.append(f"users: {len(config.users)}")
    for user in config.users.values():
        match route_of(user, config.upstreams):
            case MaildirRoute(path):
                missing = "" if path.is_dir() else " (does not exist yet)"
                lines.append(f"  {user.name}: maildir {path}{missing}")
                for source in user.fetch:
                    token = source.upstream_refresh_token_file
                    how = f" with the refresh token in {token}" if token is not None else ""
                    lines.append(f"    fetch: {source.label}{how}")
            case UpstreamRoute(upstream, upstream_user):
                token = user.upstream_refresh_token_file
                how = f" with the refresh token in {token}" if token is not None else ""
                lines.append(f"  {user.name}: upstream {upstream.name} as {upstream_user}{how}")
    lines.append(f"state: {config.state.url}")
    if config.rules_dir is not None:
        lines.append(f"rules_dir: {config.rules_dir}")
    lines.extend(describe_policy(config))
    if config.metrics is not None:
        lines.append(f"metrics: {_host_port(config.metrics.address, config.metrics.port)}")
    gateway = config.gateway
    if config.gateway_users:
        lines.append(
            "gateway: "
            + " ".join(
                f"{name}={getattr(gateway, name):g}" for name in type(gateway).__dataclass_fields__
            )
        )
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
    For each gateway source: its rules and what a poll does upstream.
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
                for fetched in user.fetch:
                    account = policy.for_user(user.name, fetched.upstream)
                    lines.extend(_source_effects(account, fetched))
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


def _source_effects(account: AccountPolicy, source: FetchSource) -> list[str]:
    """What a poll of a gateway source does upstream, with the rule that says so."""
    lines = [f"    fetch {source.label}:"]
    lines.append("      rules, in order:" if account.rules else "      rules: none")
    lines.extend(f"        {r.name} ({r.source}): {r.summary()}" for r in account.rules)
    after: list[str] = []
    for outcome in account.outcomes(Setting.ACTION):
        match outcome.value:
            case Action.KEEP:
                after.append(f"kept upstream [{outcome.rule}]")
            case Action.DELETE | Action.DELETE_AFTER_RETRIEVE:
                after.append(f"deleted upstream at that poll's QUIT [{outcome.rule}]")
            case Action.HIDE:
                after.append(f"not fetched, left upstream [{outcome.rule}]")
    expiry = [
        f"never [{o.rule}]"
        if o.value is None
        else f"deleted upstream after {o.value} days [{o.rule}]"
        for o in account.outcomes(Setting.EXPIRE_AFTER_DAYS)
    ]
    skipped = [
        f"over {o.value} bytes [{o.rule}]"
        for o in account.outcomes(Setting.MAX_SIZE_BYTES)
        if o.value is not None
    ]
    lines.append("      after the download: " + "; ".join(dict.fromkeys(after)))
    lines.append("      expiry: " + "; ".join(expiry))
    lines.append("      left upstream unfetched: " + ("; ".join(skipped) or "none"))
    return lines


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
