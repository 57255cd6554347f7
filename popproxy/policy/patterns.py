"""Header patterns: RE2 syntax, matched in time linear in the length of the header.

A header rule's pattern is written by the operator, but the text it is matched
against comes from whoever sent the mail. Python's ``re`` backtracks, so a pattern
such as ``(a+)+$`` takes about 2^n steps on a field body of n ``a`` and a ``!``: one
message could stop the server. Patterns are therefore RE2 expressions (google-re2),
compiled once, when the rules are loaded, into an automaton whose matching time is
linear in the text: at most the text's length times the size of the compiled
program, which is bounded here. RE2 has no backreferences, lookaround, possessive
quantifiers, ``\\Z`` or verbose mode; such a pattern is a config error naming the
file, rule and key (docs/rules.md lists the differences from Python's ``re``).

Matching is done on the UTF-8 octets of the unfolded field body (``search``, not
anchored unless the pattern says so), so a Unicode pattern matches Unicode text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re2

# A header pattern is a line in a rule file: short.
MAX_HEADER_PATTERN_CHARS = 512
# The largest compiled RE2 program (instructions) a pattern may become. Matching costs
# at most the text's length times this, and only patterns that defeat RE2's DFA come
# near it: on this project's 2-vCPU test machine the worst pattern found at this size
# takes about 1-2 s on a 100 KiB field body (MAX_HEADER_OCTETS), an ordinary one well
# under a millisecond. 2000 admits ``\p{L}`` (about 1200 instructions) and every
# pattern in docs/rules.md, and refuses counted repetitions of large classes such as
# ``[\p{L}\p{N}]{1,20}`` (about 27000).
MAX_HEADER_PATTERN_PROGRAM = 2000


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported as a config error instead
    return options


_OPTIONS = _options()


@dataclass(frozen=True, slots=True)
class HeaderPattern:
    """A compiled header pattern; equal to another with the same source text."""

    source: str
    _regex: Any = field(compare=False, repr=False)

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in ``text`` (RE2, linear time)."""
        # surrogatepass: a body never holds lone surrogates (headers.py decodes with
        # replacement), but matching must not raise if one ever did.
        return self._regex.search(text.encode("utf-8", "surrogatepass")) is not None


def compile_header_pattern(source: str) -> HeaderPattern | str:
    """``source`` compiled as an RE2 pattern, or why it cannot be used: too long, not
    RE2 syntax (RE2's own message), or too large once compiled."""
    if len(source) > MAX_HEADER_PATTERN_CHARS:
        return f"expected a regular expression of at most {MAX_HEADER_PATTERN_CHARS} characters"
    try:
        regex = re2.compile(source.encode("utf-8", "surrogatepass"), _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        if "pattern too large" in str(reason):
            return _too_large(None)
        return f"not a valid RE2 regular expression: {reason} (docs/rules.md, Header patterns)"
    size = int(regex.programsize)
    if size > MAX_HEADER_PATTERN_PROGRAM:
        return _too_large(size)
    return HeaderPattern(source, regex)


def _too_large(size: int | None) -> str:
    many = f"{size} RE2 instructions" if size is not None else "too many RE2 instructions"
    return (
        f"the regular expression compiles to {many}, more than {MAX_HEADER_PATTERN_PROGRAM};"
        " use fewer or smaller counted repetitions (docs/rules.md, Header patterns)"
    )


def header_pattern(source: str) -> HeaderPattern:
    """``source`` compiled, for rules built in code; ``ValueError`` says why it cannot be."""
    match compile_header_pattern(source):
        case HeaderPattern() as compiled:
            return compiled
        case reason:
            raise ValueError(f"{source!r}: {reason}")
