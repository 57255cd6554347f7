"""The pure parsers of upstream replies (popproxy.pop3.client_replies).

Listings against a reference parser written by regular expression (RFC 1939 §5,
§7), with hypothesis; the body splitter fed whole and in every split; the RFC 3206
mapping of login refusals case by case.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.outcomes import UpstreamFailure
from popproxy.pop3.client_replies import (
    CREDENTIALS_REJECTED,
    UNAVAILABLE,
    BodyLines,
    ClientReply,
    ListedMessage,
    ListingError,
    login_refusal,
    parse_capabilities,
    parse_listings,
)
from popproxy.pop3.replies import Err, ResponseCode

# No per-example deadline: on a loaded machine (the suite's parallel workers, other
# jobs) one example of a few microseconds' work can take longer than hypothesis's
# 200 ms and fail as flaky; what these tests check does not depend on time.
UNTIMED = settings(deadline=None)

# -- CAPA (RFC 2449 §5) -------------------------------------------------------------------


def test_capabilities_are_tags_upper_cased_with_their_arguments() -> None:
    lines = [b"uidl", b"SASL PLAIN  xoauth2", b"", b"   ", b"EXPIRE 30 USER", b"Pipelining"]
    assert parse_capabilities(lines) == {
        "UIDL": (),
        "SASL": ("PLAIN", "xoauth2"),
        "EXPIRE": ("30", "USER"),
        "PIPELINING": (),
    }


def test_a_repeated_capability_keeps_the_last_and_bad_octets_do_not_raise() -> None:
    assert parse_capabilities([b"TOP", b"top x", b"X-\xff\x00"]) == {
        "TOP": ("x",),
        "X-\ufffd\x00": (),
    }


@UNTIMED
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_capa_lines_parse(lines: list[bytes]) -> None:
    parsed = parse_capabilities(lines)
    assert all(tag == tag.upper() and tag for tag in parsed)


# -- splitting a body into bounded lines (RFC 1939 §3, RFC 2449 §4) ---------------------------


def split(body: bytes, cuts: Sequence[int], **limits: int) -> list[bytes]:
    lines = BodyLines(**({"max_lines": 100, "max_line_octets": 20, "max_octets": 1000} | limits))
    start = 0
    for cut in [*sorted(cuts), len(body)]:
        lines.feed(body[start:cut])
        start = max(start, cut)
    return lines.finish()


@UNTIMED
@given(st.lists(st.binary(max_size=18).filter(lambda b: b"\n" not in b), max_size=20), st.data())
def test_lines_are_the_same_however_the_body_is_cut(
    lines: list[bytes], data: st.DataObject
) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    expected = lines  # each without its CRLF, whatever else it holds
    assert split(body, []) == expected
    assert split(body, cuts) == expected
    assert split(body, range(len(body))) == expected


@pytest.mark.parametrize(
    ("body", "limits", "reason"),
    [
        (b"x" * 20 + b"\r\n", {}, "listing line too long"),  # 22 octets > 20
        (b"x" * 20, {}, "listing line too long"),  # refused before its end arrives
        (b"a\r\nb\r\nc\r\n", {"max_lines": 2}, "listing too long"),
        (b"abcd\r\nefgh\r\n", {"max_octets": 11}, "listing too long"),
        (b"a\r\nb", {}, "listing ends inside a line"),
    ],
)
def test_bounds_and_an_unfinished_line_are_errors(
    body: bytes, limits: dict[str, int], reason: str
) -> None:
    every_octet: Sequence[int] = range(len(body))
    for cuts in ([], every_octet):
        with pytest.raises(ListingError, match=reason):
            split(body, cuts, **limits)


def reference_lines(body: bytes, cuts: Sequence[int], **limits: int) -> list[bytes] | str:
    """The body's lines or the ``ListingError`` text, line by line as RFC 1939 §3 and
    RFC 2449 §4 say, each chunk's bounds checked once the chunk is in."""
    lines: list[bytes] = []
    partial, total, start = b"", 0, 0
    for cut in [*sorted(cuts), len(body)]:
        *complete, partial = (partial + body[start:cut]).split(b"\n")
        start = max(start, cut)
        for line in complete:
            if len(line) + 1 > limits["max_line_octets"]:
                return "listing line too long"
            total += len(line) + 1
            lines.append(line[:-1] if line.endswith(b"\r") else line)
        if len(partial) >= limits["max_line_octets"]:
            return "listing line too long"
        if len(lines) > limits["max_lines"] or total > limits["max_octets"]:
            return "listing too long"
    return "listing ends inside a line" if partial else lines


@UNTIMED
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=24).filter(lambda b: b"\n" not in b),
            st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b""]),
        ),
        max_size=12,
    ),
    st.data(),
)
def test_lines_and_errors_agree_with_a_line_by_line_reference(
    parts: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    body = b"".join(line + end for line, end in parts)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=6))
    # Bounds at, just under and just over what the body holds, and anywhere.
    lengths = [len(line) + len(end) for line, end in parts]
    near = {n + step for n in lengths for step in (-1, 0, 1)}
    totals = {sum(lengths[:k]) + step for k in range(len(parts) + 1) for step in (-1, 0, 1)}
    limits = {
        "max_lines": data.draw(st.integers(1, 14)),
        "max_line_octets": data.draw(st.sampled_from(sorted(n for n in near if n >= 2) or [2]))
        if data.draw(st.booleans())
        else data.draw(st.integers(2, 30)),
        "max_octets": data.draw(st.sampled_from(sorted(n for n in totals if n >= 1)))
        if data.draw(st.booleans())
        else data.draw(st.integers(1, 300)),
    }
    expected = reference_lines(body, cuts, **limits)
    if isinstance(expected, str):
        with pytest.raises(ListingError, match=f"^{expected}$"):
            split(body, cuts, **limits)
    else:
        assert split(body, cuts, **limits) == expected


def test_bounds_are_inclusive() -> None:
    assert split(b"x" * 18 + b"\r\n", []) == [b"x" * 18]
    assert split(b"a\r\nb\r\n", [], max_lines=2) == [b"a", b"b"]
    assert split(b"abcd\r\nefgh\r\n", [], max_octets=12) == [b"abcd", b"efgh"]


# -- login refusals (RFC 3206, RFC 2449 §8.1) -------------------------------------------------


@pytest.mark.parametrize(
    ("code", "failure", "client_code"),
    [
        (ResponseCode.IN_USE, UpstreamFailure.IN_USE, ResponseCode.IN_USE),
        (ResponseCode.LOGIN_DELAY, UpstreamFailure.LOGIN_DELAY, ResponseCode.LOGIN_DELAY),
        (ResponseCode.SYS_TEMP, UpstreamFailure.REJECTED, ResponseCode.SYS_TEMP),
        (ResponseCode.AUTH, UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM),
        (ResponseCode.SYS_PERM, UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM),
        (None, UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM),
    ],
)
def test_login_refusal_mapping(
    code: ResponseCode | None, failure: UpstreamFailure, client_code: ResponseCode
) -> None:
    refusal = login_refusal(Err("upstream text is never passed on", code))
    assert refusal.failure is failure
    assert refusal.code is client_code
    assert "upstream text" not in refusal.text


def test_refused_credentials_and_a_temporary_refusal_have_the_documented_texts() -> None:
    assert login_refusal(Err("no")) == ClientReply(
        UpstreamFailure.AUTH_REJECTED, ResponseCode.SYS_PERM, CREDENTIALS_REJECTED
    )
    assert login_refusal(Err("later", ResponseCode.SYS_TEMP)).text == UNAVAILABLE


# -- listings (RFC 1939 §5, §7) ---------------------------------------------------------------

uid_octets = st.binary(min_size=1, max_size=70).map(
    lambda b: bytes(0x21 + (octet % (0x7F - 0x21)) for octet in b)
)


@st.composite
def valid_listings(
    draw: st.DrawFn,
) -> tuple[list[bytes], list[bytes], list[ListedMessage]]:
    n = draw(st.integers(0, 12))
    # Half numbered 1..n in order, as servers send them (parsed over the whole listing
    # at once), half any numbers in any order (parsed line by line).
    in_order = draw(st.booleans())
    numbers = (
        list(range(1, n + 1))
        if in_order
        else draw(st.lists(st.integers(1, 2**31 - 1), min_size=n, max_size=n, unique=True))
    )
    uids = draw(st.lists(uid_octets, min_size=n, max_size=n, unique=True))
    sizes = draw(st.lists(st.integers(0, 10**12), min_size=n, max_size=n))
    uidl = [b"%d %s" % (number, uid) for number, uid in zip(numbers, uids, strict=True)]
    lst = [b"%d %d" % (number, size) for number, size in zip(numbers, sizes, strict=True)]
    if not in_order:
        uidl = draw(st.permutations(uidl))
        lst = draw(st.permutations(lst))
    order = sorted(range(n), key=lambda i: numbers[i])
    return uidl, lst, [ListedMessage(numbers[i], uids[i].decode(), sizes[i]) for i in order]


@UNTIMED
@given(valid_listings())
def test_parse_listings_round_trips(
    listing: tuple[list[bytes], list[bytes], list[ListedMessage]],
) -> None:
    uidl, sizes, expected = listing
    assert parse_listings(uidl, sizes) == expected


_LINE = re.compile(rb"\s*([0-9]+)\s+(\S+)\s*")


def reference_listing(uidl: Sequence[bytes], sizes: Sequence[bytes]) -> list[ListedMessage] | None:
    """RFC 1939 §5/§7, by regular expression (words separated by ASCII white space)."""

    def parse(lines: Sequence[bytes]) -> dict[int, bytes] | None:
        out: dict[int, bytes] = {}
        for line in lines:
            match = _LINE.fullmatch(line)
            if match is None or int(match[1]) in out or int(match[1]) == 0:
                return None
            out[int(match[1])] = match[2]
        return out

    uids, lengths = parse(uidl), parse(sizes)
    if uids is None or lengths is None or set(uids) != set(lengths):
        return None
    if len(set(uids.values())) != len(uids):
        return None
    for uid in uids.values():
        if not re.fullmatch(rb"[\x21-\x7e]{1,70}", uid):
            return None
    if not all(re.fullmatch(rb"[0-9]+", size) for size in lengths.values()):
        return None
    return [ListedMessage(n, uids[n].decode(), int(lengths[n])) for n in sorted(uids)]


def assert_agrees_with_reference(uidl: Sequence[bytes], sizes: Sequence[bytes]) -> None:
    """``parse_listings`` refuses what the reference refuses, and else gives what it gives."""
    expected = reference_listing(uidl, sizes)
    if expected is None:
        with pytest.raises(ListingError):
            parse_listings(uidl, sizes)
    else:
        assert parse_listings(uidl, sizes) == expected


@UNTIMED
@given(valid_listings(), st.data())
def test_parse_listings_mutations_are_rejected_or_parsed_consistently(
    listing: tuple[list[bytes], list[bytes], list[ListedMessage]], data: st.DataObject
) -> None:
    uidl, sizes, _ = listing
    sides = [list(uidl), list(sizes)]
    for _ in range(data.draw(st.integers(1, 3))):
        side = sides[data.draw(st.integers(0, 1))]
        kind = data.draw(
            st.sampled_from(["drop", "duplicate", "set", "insert", "delete", "swap-values", "add"])
        )
        if kind == "add":
            side.append(data.draw(st.binary(max_size=12)))
            continue
        if not side:
            continue
        i = data.draw(st.integers(0, len(side) - 1))
        line = side[i]
        pos = data.draw(st.integers(0, len(line)))
        octet = bytes([data.draw(st.integers(0, 255))])
        match kind:
            case "drop":
                del side[i]
            case "duplicate":
                side.insert(i, line)
            case "set":
                side[i] = line[:pos] + octet + line[pos + 1 :]
            case "insert":
                side[i] = line[:pos] + octet + line[pos:]
            case "delete":
                side[i] = line[:pos] + line[pos + 1 :]
            case "swap-values":
                j = data.draw(st.integers(0, len(side) - 1))
                a, b = side[i].split(b" ", 1), side[j].split(b" ", 1)
                if len(a) == len(b) == 2:
                    side[i], side[j] = a[0] + b" " + b[1], b[0] + b" " + a[1]
    assert_agrees_with_reference(sides[0], sides[1])


@pytest.mark.parametrize(
    "odd",
    [
        b"2 ",
        b" 2 b",
        b"2 b ",
        b"2  b",
        b"2\tb",
        b"2 b\r",
        b"02 b",
        b"2 b c",
        b"2",
        b"+2 b",
        b"2 \xff",
    ],
)
def test_a_line_out_of_the_usual_form_is_parsed_as_the_reference_parses_it(odd: bytes) -> None:
    """Listings numbered in order, with line 2 of one or the other in some other form."""
    uidl = [b"1 a", b"2 b", b"3 c"]
    sizes = [b"1 10", b"2 20", b"3 30"]
    odd_uidl = [uidl[0], odd, uidl[2]]
    odd_sizes = [sizes[0], odd.replace(b"b", b"20"), sizes[2]]
    for uidl_side, sizes_side in ((odd_uidl, sizes), (uidl, odd_sizes)):
        assert_agrees_with_reference(uidl_side, sizes_side)


def test_a_space_moved_from_one_line_to_the_next_is_refused() -> None:
    """Words that pair up as numbers 1..n and values only across lines: line 2 has
    one word, line 3 three."""
    with pytest.raises(ListingError, match="malformed listing line"):
        parse_listings([b"1 a", b"2", b"3 3 c"], [b"1 10", b"2 20", b"3 30"])


@UNTIMED
@given(st.integers(1, 8), st.data())
def test_in_order_listings_with_white_space_and_digits_moved_agree_with_the_reference(
    n: int, data: st.DataObject
) -> None:
    uidl = [b"%d u%d" % (i, i) for i in range(1, n + 1)]
    sizes = [b"%d %d" % (i, 10 * i) for i in range(1, n + 1)]
    side = data.draw(st.sampled_from([uidl, sizes]))
    for _ in range(data.draw(st.integers(1, 2))):
        i = data.draw(st.integers(0, n - 1))
        pos = data.draw(st.integers(0, len(side[i])))
        octet = data.draw(st.sampled_from([b" ", b"\t", b"\r", b"\x0b", b"\x0c", b"0", b"1"]))
        if data.draw(st.booleans()):
            side[i] = side[i][:pos] + octet + side[i][pos:]
        else:
            side[i] = side[i][:pos] + side[i][pos + 1 :]
    assert_agrees_with_reference(uidl, sizes)
