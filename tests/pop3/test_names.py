"""The safe set of login names (popproxy.pop3.names)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pop3_helpers import FAST

from popproxy.pop3.limits import MAX_LOGIN_NAME_OCTETS
from popproxy.pop3.names import login_name_problem

ACCEPTED = [
    "alice",
    "alice@example.net",
    "DOMAIN\\bob",
    "o'brien+tag",
    "!#$%&*-./:;<=>?[]^_`{|}~",
    "jürgen",
    "用户",
    "ζωή",
    "cafe\u0301",  # a combining mark (NFD): kept as given, not normalized
    "a" * MAX_LOGIN_NAME_OCTETS,
]
REFUSED = {
    "empty": "",
    "space": "al ice",
    "tab": "al\tice",
    "nul": "al\0ice",
    "cr-lf": "alice\r\nPASS x",
    "del": "alice\x7f",
    "c1-control": "alice\x85",
    "bidi-override": "alice\u202egnp.exe",
    "zero-width-space": "ali\u200bce",
    "line-separator": "alice\u2028x",
    "no-break-space": "al\u00a0ice",
    "private-use": "alice\ue000",
    "unassigned": "alice\U000e0080",
    "lone-surrogate": "alice\udcff",
    "too-long": "a" * (MAX_LOGIN_NAME_OCTETS + 1),
    "too-long-in-utf8": "ü" * (MAX_LOGIN_NAME_OCTETS // 2 + 1),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_names(name: str) -> None:
    assert login_name_problem(name) is None


@pytest.mark.parametrize("name", REFUSED.values(), ids=list(REFUSED))
def test_refused_names(name: str) -> None:
    assert login_name_problem(name) is not None


@FAST
@given(st.text(max_size=40))
def test_an_accepted_name_has_no_space_control_or_format_character(name: str) -> None:
    if login_name_problem(name) is None:
        assert name
        assert name.isprintable()
        assert not any(ch.isspace() for ch in name)
        assert all(unicodedata.category(ch)[0] not in "CZ" for ch in name)
        assert len(name.encode("utf-8")) <= MAX_LOGIN_NAME_OCTETS


@FAST
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80))
def test_every_printable_ascii_name_without_space_is_accepted(name: str) -> None:
    assert login_name_problem(name) is None


@FAST
@given(st.text(st.characters(max_codepoint=0x7F), max_size=80))
def test_an_ascii_name_is_accepted_exactly_when_every_character_is_0x21_to_0x7e(
    name: str,
) -> None:
    """The ASCII shortcut (``isprintable`` without space) is the character rule itself."""
    fits = 0 < len(name) <= MAX_LOGIN_NAME_OCTETS
    expected = fits and all(0x21 <= ord(ch) <= 0x7E for ch in name)
    assert (login_name_problem(name) is None) == expected
