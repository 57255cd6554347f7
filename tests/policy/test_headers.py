"""parse_headers: TOP n 0 output -> Headers (RFC 1939 §7, RFC 5322 §2.2.3, RFC 2047)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.policy import MAX_HEADER_FIELDS, MAX_HEADER_OCTETS, Headers, parse_headers


def test_fields_by_lower_cased_name_in_order() -> None:
    headers = parse_headers(
        b"Received: from a\r\nSubject: Hello\r\nreceived: from b\r\nFrom: x@example.net\r\n\r\n"
    )
    assert headers["subject"] == ("Hello",)
    assert headers["Received"] == ("from a", "from b")
    assert list(headers) == ["received", "subject", "from"]
    assert "FROM" in headers
    assert "to" not in headers
    assert headers.get("to", ()) == ()


def test_folded_lines_are_unfolded() -> None:
    # RFC 5322 §2.2.3: unfolding removes the CRLF before the white space, nothing else.
    headers = parse_headers(b"Subject: a long\r\n subject\r\n\tand more\r\nTo: b\r\n\r\n")
    assert headers["subject"] == ("a long subject\tand more",)
    assert headers["to"] == ("b",)


def test_stops_at_the_empty_line() -> None:
    headers = parse_headers(b"Subject: s\r\n\r\nX-Body: not a header\r\n")
    assert dict(headers) == {"subject": ("s",)}


def test_bare_lf_line_ends() -> None:
    assert parse_headers(b"Subject: s\n continued\nTo: t\n\n")["subject"] == ("s continued",)


def test_without_the_empty_line_every_line_is_a_header() -> None:
    assert parse_headers(b"Subject: s")["subject"] == ("s",)


def test_body_white_space_is_trimmed_and_empty_bodies_kept() -> None:
    headers = parse_headers(b"Subject:   spaced  \r\nX-Empty:\r\n\r\n")
    assert headers["subject"] == ("spaced",)
    assert headers["x-empty"] == ("",)


def test_malformed_lines_are_skipped() -> None:
    data = (
        b" orphan continuation\r\n"
        b"no colon here\r\n"
        b"Bad Name: space in the name\r\n"
        b": no name\r\n"
        b"Subject : obsolete white space before the colon\r\n"
        b"\r\n"
    )
    assert dict(parse_headers(data)) == {"subject": ("obsolete white space before the colon",)}


def test_eight_bit_octets_are_decoded_with_replacement() -> None:
    headers = parse_headers("Subject: Grüße\r\n".encode() + b"X-Latin1: caf\xe9\r\n\r\n")
    assert headers["subject"] == ("Grüße",)
    assert headers["x-latin1"] == ("caf\ufffd",)


def test_encoded_words_are_decoded() -> None:
    headers = parse_headers(
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?ISO-8859-1?B?S/Zsbg==?=\r\n\r\n"
    )
    assert headers["subject"] == ("Grüße aus Köln",)


def test_bad_encoded_words_stay_as_written() -> None:
    raw = "=?x-no-such-charset?q?abc?="
    assert parse_headers(f"Subject: {raw}\r\n\r\n".encode())["subject"] == (raw,)
    # Undecodable base64 is the standard library's business: no exception, some text.
    assert isinstance(parse_headers(b"Subject: =?utf-8?b?!!!?=\r\n\r\n")["subject"][0], str)


def test_octets_past_the_limit_are_not_parsed() -> None:
    filler = b"X-Fill: " + b"a" * (MAX_HEADER_OCTETS - 20) + b"\r\n"
    headers = parse_headers(filler + b"Subject: too late\r\n\r\n")
    assert "subject" not in headers
    assert "x-fill" in headers


def test_fields_past_the_limit_are_not_parsed() -> None:
    data = b"".join(b"Received: %d\r\n" % n for n in range(MAX_HEADER_FIELDS)) + b"To: late\r\n"
    headers = parse_headers(data)
    assert len(headers["received"]) == MAX_HEADER_FIELDS
    assert "to" not in headers


def test_continuation_after_the_field_limit_does_not_extend_the_last_field() -> None:
    data = b"".join(b"A: %d\r\n" % n for n in range(MAX_HEADER_FIELDS)) + b"B: x\r\n more\r\n"
    assert parse_headers(data)["a"][-1] == str(MAX_HEADER_FIELDS - 1)


def test_headers_are_immutable_hashable_and_compare_by_content() -> None:
    one = Headers({"Subject": ["x"], "subject": ["y"]})
    assert one["SUBJECT"] == ("x", "y")
    assert one == Headers({"subject": ("x", "y")})
    assert hash(one) == hash(Headers({"subject": ("x", "y")}))
    assert len(one) == 1
    with pytest.raises(AttributeError):
        one._fields = {}
    assert "Headers(" in repr(one)


@given(st.binary(max_size=2000))
def test_any_octets_parse_to_bounded_headers(data: bytes) -> None:
    headers = parse_headers(data)
    assert sum(len(values) for values in headers.values()) <= MAX_HEADER_FIELDS
    for name, values in headers.items():
        assert name == name.lower()
        assert ":" not in name
        assert all(isinstance(value, str) for value in values)


_NAMES = st.sampled_from(["Subject", "From", "To", "X-Spam-Flag", "Received"])
_VALUES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)


@given(st.lists(st.tuples(_NAMES, st.lists(_VALUES, min_size=1, max_size=4)), max_size=10))
def test_folding_anywhere_between_words_unfolds_to_the_same_fields(
    fields: list[tuple[str, list[str]]],
) -> None:
    flat = b"".join(f"{name}: {' '.join(words)}\r\n".encode() for name, words in fields)
    fold = "\r\n "
    folded = b"".join(f"{name}: {fold.join(words)}\r\n".encode() for name, words in fields)
    assert parse_headers(flat + b"\r\n") == parse_headers(folded + b"\r\n")
