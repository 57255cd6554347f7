"""Header patterns: RE2 syntax, compiled at load, matched in linear time (policy/patterns.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from popproxy.policy.headers import MAX_HEADER_OCTETS, parse_headers
from popproxy.policy.patterns import (
    MAX_HEADER_PATTERN_PROGRAM,
    HeaderPattern,
    compile_header_pattern,
    header_pattern,
)
from popproxy.policy.rules import HeaderMatch


@pytest.mark.parametrize(
    ("pattern", "text", "found"),
    [
        ("(?i)invoice", "Your INVOICE 42", True),
        ("^YES$", "YES", True),
        ("^YES$", "YES, really", False),
        (r"\bspam\b", "no-spam-here", True),
        (r"(?i)grüße", "GRÜSSE und Grüße", True),  # Unicode case folding and text
        (r"^\p{Greek}+$", "αβγ", True),
        (r"\d{4}-\d{2}", "2024-06", True),
        ("(a+)+$", "aaaa!", False),  # accepted, and linear: RE2 does not backtrack
        ("", "anything", True),
    ],
)
def test_patterns_search_the_body_as_re2_does(pattern: str, text: str, found: bool) -> None:
    assert header_pattern(pattern).search(text) is found


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape sequence: \\1"),  # backreference
        ("x(?=y)", "invalid perl operator: (?="),  # lookahead
        ("(?<!x)y", "invalid perl operator: (?<!"),  # lookbehind
        ("a++", "bad repetition operator: ++"),  # possessive
        (r"end\Z", "invalid escape sequence: \\Z"),  # RE2 writes \z
        ("(unclosed", "missing ): (unclosed"),
        ("a{1001}", "invalid repetition size: {1001}"),
    ],
)
def test_what_re2_cannot_do_is_refused_with_its_reason(pattern: str, reason: str) -> None:
    assert compile_header_pattern(pattern) == (
        f"not a valid RE2 regular expression: {reason} (docs/rules.md, Header patterns)"
    )


def test_a_pattern_too_large_once_compiled_is_refused() -> None:
    problem = compile_header_pattern(r"[\p{L}\p{N}]{1,20}")
    assert isinstance(problem, str)
    assert problem.startswith("the regular expression compiles to 26863 RE2 instructions")
    assert f"more than {MAX_HEADER_PATTERN_PROGRAM}" in problem
    assert isinstance(compile_header_pattern(r"\p{L}+"), HeaderPattern)  # about 1200


def test_a_pattern_is_its_source() -> None:
    assert header_pattern("(?i)x") == header_pattern("(?i)x")
    assert header_pattern("(?i)x") != header_pattern("x")
    assert "(?i)x" in repr(header_pattern("(?i)x"))
    with pytest.raises(ValueError, match="missing"):
        header_pattern("(")


# -- Rules cannot hang the server ----------------------------------------------------------

# Each pattern is accepted by the loader; the body is what a sender can put in one header
# field (the whole header section is at most MAX_HEADER_OCTETS). With Python's re the
# first two backtrack through about 2^n paths (n of 35 000 and more: far longer than
# anyone waits); RE2 takes milliseconds. The last is the heaviest pattern found that the
# program ceiling still admits: it defeats RE2's DFA, so RE2 runs its NFA, linear with
# about 2000 instructions per octet; about 1-2 s on the 2-vCPU test machine.
BODY_OCTETS = MAX_HEADER_OCTETS - 100
PATHOLOGICAL = [
    ("(a+)+$", "a" * BODY_OCTETS + "!"),
    ("^(x+x+)+y$", "x" * BODY_OCTETS),
    ("(?:(?:a|b){1000})+(?:(?:a|b){990})+c", "a" * BODY_OCTETS),
]
# Generous: the slowest case takes about 2 s here; backtracking would take hours.
BOUND_SECONDS = 120

_MATCHER = textwrap.dedent(
    """
    import json, sys, time
    from popproxy.policy.headers import parse_headers
    from popproxy.policy.patterns import header_pattern
    from popproxy.policy.rules import HeaderMatch
    pattern, body = json.loads(sys.stdin.read())
    headers = parse_headers(b"X-Evil: " + body.encode() + b"\\r\\n\\r\\n")
    assert len(headers["x-evil"][0]) == len(body)
    start = time.perf_counter()
    found = HeaderMatch("x-evil", header_pattern(pattern)).matches(headers)
    print(json.dumps([found, time.perf_counter() - start]))
    """
)


@pytest.mark.parametrize(("pattern", "body"), PATHOLOGICAL, ids=["nested", "overlap", "nfa"])
def test_a_pathological_header_against_an_accepted_pattern_ends_in_bounded_time(
    pattern: str, body: str
) -> None:
    """Matching runs in a child process, so a regression to a backtracking engine fails
    this test at the bound instead of hanging the suite."""
    assert isinstance(compile_header_pattern(pattern), HeaderPattern)
    assert len(parse_headers(b"X-Evil: " + body.encode() + b"\r\n\r\n")["x-evil"][0]) > 100_000
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MATCHER],
            input=json.dumps([pattern, body]),
            capture_output=True,
            text=True,
            timeout=BOUND_SECONDS,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"matching {pattern!r} took more than {BOUND_SECONDS} s")
    found, seconds = json.loads(done.stdout)
    assert found is False
    assert seconds < BOUND_SECONDS


def test_header_match_uses_the_compiled_pattern() -> None:
    headers = parse_headers(b"Subject: Re: INVOICE\r\nX-Spam-Flag: YES\r\n\r\n")
    assert HeaderMatch("subject", header_pattern("(?i)invoice")).matches(headers)
    assert HeaderMatch("x-spam-flag", header_pattern("^YES$")).matches(headers)
    assert not HeaderMatch("x-missing", header_pattern("")).matches(headers)
