"""The fail2ban filter of docs/operations.md against a running popproxy (issue 16, item 3).

popproxy logs one ``login_failed`` line per failed login, with the client's address and
no user name. The test reads the filter's ``failregex`` from the docs, expands
``<HOST>`` as fail2ban does (an IPv4 or IPv6 address, bracketed or not, or a host name,
in fail2ban's named groups ``ip4``/``ip6``/``dns``), fails logins of every kind against
a real server and checks, line by line, that the filter matches exactly the failures it
should ban (never a user lockout or a busy hash queue, which an attacker could cause for
someone else) and finds the client's address in them.
"""

from __future__ import annotations

import base64
import contextlib
import poplib
import re
import threading
from collections import Counter
from pathlib import Path

from pop3client import SocketPop3

from .conftest import StartServer
from .harness import LOOPBACK, PASSWORD, User, parse_logfmt, poplib_connection

REPO = Path(__file__).resolve().parents[2]
BANNED = {"bad_credentials", "malformed", "throttled"}
# fail2ban's <HOST>: an address (IPv4, optionally IPv4-mapped; IPv6), optionally in
# brackets, or else a DNS name; the groups named as fail2ban names them.
_IP4 = r"(?:::f{4,6}:)?(?P<ip4>(?:\d{1,3}\.){3}\d{1,3})"
_IP6 = r"(?P<ip6>(?:[0-9a-fA-F]{1,4}::?|::){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):))"
_DNS = r"(?P<dns>[\w\-.^_]*\w)"
HOST = rf"(?:\[?(?:{_IP4}|{_IP6})\]?|{_DNS})"
USER_LOCKOUT = 3
ADDRESS_LOCKOUT = 8


def documented_failregex() -> re.Pattern[str]:
    """The ``failregex`` of the filter in docs/operations.md, <HOST> expanded."""
    docs = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    [regex] = re.findall(r"^failregex = (.+)$", docs, flags=re.MULTILINE)
    return re.compile(regex.replace("<HOST>", HOST))


def host_of(pattern: re.Pattern[str], line: str) -> str | None:
    """What fail2ban would ban for ``line``: from the journal (the line as written) and
    from a log file (fail2ban cuts the time stamp out first); both must agree."""
    found = pattern.search(line)
    without_time = pattern.search(re.sub(r"^ts=\S+", "ts=", line))
    assert (found is None) == (without_time is None), line
    if found is None or without_time is None:
        return None
    hosts = {m.group("ip4") or m.group("ip6") or m.group("dns") for m in (found, without_time)}
    assert len(hosts) == 1, line
    return hosts.pop()


def fail(port: int, user: str, password: str) -> bytes:
    pop = poplib_connection(port)
    try:
        pop.user(user)
        pop.pass_(password)
    except poplib.error_proto as exc:
        return bytes(exc.args[0])
    finally:
        with contextlib.suppress(poplib.error_proto, OSError):
            pop.quit()
    raise AssertionError(f"{user} logged in")


def malformed_auth_plain(port: int) -> bytes:
    with SocketPop3(port) as pop:
        # Base64 that decodes, but not to authzid NUL authcid NUL password (RFC 4616 §2).
        reply = pop.cmd(b"AUTH PLAIN " + base64.b64encode(b"no separators"))
        pop.cmd(b"QUIT")
        return reply


def test_the_documented_filter_bans_guessers_and_only_them(
    start: StartServer, small_maildir: Path
) -> None:
    server = start(
        users=[User("demo", PASSWORD, small_maildir)],
        listeners=["none"],
        limits={
            "auth_lockout_failures": USER_LOCKOUT,
            "auth_lockout_address_failures": ADDRESS_LOCKOUT,
        },
    )
    port = server.port("none")
    for n in range(USER_LOCKOUT):  # distinct wrong passwords (a retry is not counted twice)
        assert fail(port, "demo", f"wrong-{n}").startswith(b"-ERR [AUTH]")
    assert fail(port, "demo", PASSWORD).startswith(b"-ERR [AUTH]")  # demo is now locked out
    assert malformed_auth_plain(port).startswith(b"-ERR")
    for n in range(ADDRESS_LOCKOUT - USER_LOCKOUT):  # names nobody has: the address's count
        assert fail(port, f"nobody-{n}", "guess").startswith(b"-ERR [AUTH]")
    assert fail(port, "another", "guess").startswith(b"-ERR [AUTH]")  # the address is locked out

    records = server.wait_for_log(
        lambda rs: sum(r.get("msg") == "login_failed" for r in rs) >= ADDRESS_LOCKOUT + 3,
        timeout=10,
        what="the login_failed lines",
    )
    lines = [line for line in server.lines if parse_logfmt(line).get("msg") == "login_failed"]
    reasons = [parse_logfmt(line)["reason"] for line in lines]
    assert Counter(reasons) == {
        "bad_credentials": ADDRESS_LOCKOUT,
        "locked_out": 1,
        "malformed": 1,
        "throttled": 1,
    }, reasons
    pattern = documented_failregex()
    for line in lines:
        fields = parse_logfmt(line)
        assert "user" not in fields and "demo" not in line and "nobody" not in line, line
        assert fields["mechanism"] == ("plain" if fields["reason"] == "malformed" else "user")
        expected = LOOPBACK if fields["reason"] in BANNED else None
        assert host_of(pattern, line) == expected, line
    # Nothing else popproxy logged here is taken for a failure.
    others = [line for line in server.lines if parse_logfmt(line).get("msg") != "login_failed"]
    assert others and not any(host_of(pattern, line) for line in others)
    assert len(records) >= len(lines)


def test_a_busy_hash_queue_is_logged_and_not_banned(
    start: StartServer, small_maildir: Path
) -> None:
    # A costly hash (scrypt ln=16) and no waiting room: of eight logins at once, the two
    # hash threads take two and the others are refused as busy.
    server = start(
        users=[User("demo", PASSWORD, small_maildir, hash_ln=16)],
        listeners=["none"],
        limits={"auth_max_pending_verifications": 0},
    )
    port = server.port("none")
    barrier = threading.Barrier(8)
    replies: list[bytes] = []

    def log_in() -> None:
        pop = poplib_connection(port)
        pop.user("demo")
        barrier.wait()
        try:
            replies.append(pop.pass_(PASSWORD))
        except poplib.error_proto as exc:
            replies.append(bytes(exc.args[0]))
        finally:
            with contextlib.suppress(poplib.error_proto, OSError):
                pop.quit()

    threads = [threading.Thread(target=log_in) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    busy = [r for r in replies if r.startswith(b"-ERR [SYS/TEMP]")]
    assert busy, replies
    server.wait_for_log(
        lambda rs: sum(r.get("msg") == "login_failed" for r in rs) >= len(busy),
        timeout=10,
        what="the login_failed lines",
    )
    lines = [line for line in server.lines if parse_logfmt(line).get("msg") == "login_failed"]
    assert [parse_logfmt(line)["reason"] for line in lines] == ["busy"] * len(busy)
    pattern = documented_failregex()
    assert not any(host_of(pattern, line) for line in lines)


def test_the_host_expansion_takes_ipv6_peers_as_popproxy_writes_them() -> None:
    pattern = documented_failregex()
    line = (
        "ts=2026-11-26T18:00:00.123Z level=info logger=popproxy.session msg=login_failed"
        " session=ab12cd34 peer=[2001:db8::7]:50412 mechanism=user reason=bad_credentials"
    )
    assert host_of(pattern, line) == "2001:db8::7"
    # A client's text that imitates the line is inside a quoted value: never matched.
    forged = (
        "ts=2026-11-26T18:00:00.123Z level=info logger=popproxy.session msg=something"
        ' session=ab12cd34 value="x msg=login_failed session=ab12cd34 peer=198.51.100.9:1'
        ' mechanism=user reason=bad_credentials"'
    )
    assert host_of(pattern, forged) is None
