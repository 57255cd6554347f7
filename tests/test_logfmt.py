"""Log formatting: one line per record, whatever a peer puts in a value."""

from __future__ import annotations

import datetime
import enum
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy import logfmt
from popproxy.logfmt import JsonFormatter, LogfmtFormatter, logfmt_pairs
from popproxy.secret import Secret

HOSTILE = [
    "a\rb",
    "a\nb",
    "a\r\nfake=1 level=error",
    "nul\x00byte",
    'quote"inside',
    "back\\slash",
    "equals=sign",
    "tab\there",
    "del\x7f",
    "esc\x1b[31m",
    "c1\x85nel",
    "line\u2028sep",
    "para\u2029sep",
    "bidi\u202eevil",
    "surrogate\udcff",
    " leading space",
    "",
]


def make_record(
    msg: str = "session_end",
    fields: dict[str, object] | None = None,
    *,
    level: int = logging.INFO,
    exc: bool = False,
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            int("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("popproxy.session", level, __file__, 1, msg, None, exc_info)
    record.created = 1795716000.123456  # 2026-11-26T18:00:00.123Z
    record.msecs = 123.456
    if fields is not None:
        record.fields = fields
    return record


def unquote(value: str) -> str:
    """Decode one logfmt value the way a logfmt reader would."""
    if not value.startswith('"'):
        return value
    body = value[1:-1]
    return re.sub(
        r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt"\\])',
        lambda m: (
            {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}.get(m.group(1))
            or chr(int(m.group(1)[1:], 16))
        ),
        body,
    )


def parse_logfmt(line: str) -> dict[str, str]:
    pairs = re.findall(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|[^ ]*)', line)
    return {key: unquote(value) for key, value in pairs}


def test_contract_line() -> None:
    line = LogfmtFormatter().format(
        make_record("session_end", {"session": "ab12", "user": "demo", "commands": 7})
    )
    assert line == (
        "ts=2026-11-26T18:00:00.123Z level=info logger=popproxy.session msg=session_end"
        " session=ab12 user=demo commands=7"
    )


def test_levels_are_lowercase() -> None:
    line = LogfmtFormatter().format(make_record(level=logging.WARNING))
    assert " level=warning " in line


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_on_one_line_and_round_trip(value: str) -> None:
    line = LogfmtFormatter().format(make_record("m", {"user": value, "after": "x"}))
    assert "\n" not in line
    assert "\r" not in line
    assert "\x00" not in line
    assert "\u2028" not in line
    assert "\x85" not in line
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)
    parsed = parse_logfmt(line)
    assert parsed["user"] == value
    assert parsed["after"] == "x"
    assert "fake" not in parsed
    # UTF-8 output cannot fail, even for lone surrogates.
    line.encode("utf-8")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_in_json(value: str) -> None:
    line = JsonFormatter().format(make_record("m", {"user": value}))
    assert "\n" not in line
    assert "\r" not in line
    assert "\u2028" not in line
    line.encode("ascii")
    assert json.loads(line)["user"] == value


def test_hostile_message_and_logger_name() -> None:
    record = make_record("evil\nmsg=forged")
    record.name = "x y\nz"
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    parsed = parse_logfmt(line)
    assert parsed["msg"] == "evil\nmsg=forged"
    assert parsed["logger"] == "x y\nz"


def test_hostile_keys_are_sanitised() -> None:
    assert logfmt_pairs({"a b\n=c": 1, "": 2, "ünï": 3}) == "a_b__c=1 _=2 _n_=3"


@given(
    st.dictionaries(
        st.text(alphabet="abcxyz_", min_size=1, max_size=8), st.text(max_size=20), max_size=5
    )
)
def test_logfmt_pairs_never_break_a_line_and_round_trip(fields: dict[str, str]) -> None:
    out = logfmt_pairs(fields)
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in out)
    assert "\u2028" not in out
    assert "\u2029" not in out
    out.encode("utf-8")
    assert parse_logfmt(out) == fields


def test_unicode_printable_text_is_kept_readable() -> None:
    assert logfmt_pairs({"user": "jörg"}) == "user=jörg"
    assert logfmt_pairs({"user": "日本 語"}) == 'user="日本 語"'


class Color(enum.Enum):
    RED = "red"


def test_value_types() -> None:
    out = logfmt_pairs(
        {
            "none": None,
            "t": True,
            "f": False,
            "i": 3,
            "fl": 0.25,
            "inf": float("inf"),
            "b": b"by\xfftes",
            "e": Color.RED,
            "p": Path("/a b"),
            "pw": Secret.from_str("hunter2"),
        }
    )
    assert out == (
        'none=- t=true f=false i=3 fl=0.25 inf=inf b="by\\\\xfftes" e=red p="/a b" pw=***'
    )


def test_secrets_never_appear() -> None:
    secret = Secret.from_str("hunter2")
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(make_record("login", {"password": secret}))
        assert "hunter2" not in line
        assert "***" in line


def test_fields_cannot_overwrite_base_keys() -> None:
    line = LogfmtFormatter().format(make_record("real", {"msg": "fake", "level": "debug"}))
    parsed = parse_logfmt(line)
    assert parsed["msg"] == "real"
    assert parsed["level"] == "info"
    assert parsed["field_msg"] == "fake"
    data = json.loads(JsonFormatter().format(make_record("real", {"msg": "fake"})))
    assert data["msg"] == "real"
    assert data["field_msg"] == "fake"


def test_json_line() -> None:
    line = JsonFormatter().format(
        make_record("session_end", {"user": "demo", "bytes_out": 10, "ok": True, "x": None})
    )
    assert json.loads(line) == {
        "ts": "2026-11-26T18:00:00.123Z",
        "level": "info",
        "logger": "popproxy.session",
        "msg": "session_end",
        "user": "demo",
        "bytes_out": 10,
        "ok": True,
        "x": None,
    }


def test_exceptions_stay_on_one_line() -> None:
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(make_record("crashed", exc=True))
        assert "\n" not in line
        assert "boom" in line
        assert "second line" in line
        assert "ValueError" in line


def test_record_without_fields() -> None:
    line = LogfmtFormatter().format(make_record("ready"))
    assert line.endswith("msg=ready")


def test_works_through_the_logging_module(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("popproxy.test_logfmt")
    with caplog.at_level(logging.INFO, logger="popproxy.test_logfmt"):
        logger.info("session_end", extra={"fields": {"user": "a\nb"}})
    (record,) = caplog.records
    line = LogfmtFormatter().format(record)
    assert line.endswith('msg=session_end user="a\\nb"')


@given(st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=0x7F))))
def test_a_value_is_bare_exactly_when_no_character_needs_escaping(text: str) -> None:
    """The fast paths of ``_value`` (a regex for ASCII controls, the Unicode scan only
    for non-ASCII text) decide as the per-character escape does."""
    bare = bool(logfmt._BARE_VALUE_RE.fullmatch(text)) and all(
        logfmt._escape_char(ch) == ch for ch in text
    )
    quoted = '"' + "".join(logfmt._escape_char(ch) for ch in text) + '"'
    assert logfmt._value(text) == (text if bare else quoted)


@given(st.integers())
def test_an_int_renders_as_its_text_would(number: int) -> None:
    assert logfmt._value(number) == logfmt._value(str(number)) == str(number)


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_timestamp_is_the_records_time_in_utc(created: float) -> None:
    """The cached whole second (``_second``) gives what formatting the time gives,
    also for a fraction that ``fromtimestamp`` rounds up to the next second."""
    record = make_record()
    record.created = created
    record.msecs = (created - int(created)) * 1000
    when = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    expected = when.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
    assert logfmt._timestamp(record) == expected


def test_the_timestamp_of_a_time_rounded_up_to_the_next_second() -> None:
    record = make_record()
    record.created = 1795716000.9999997  # fromtimestamp keeps microseconds: 18:00:01
    record.msecs = 999.9997
    assert logfmt._timestamp(record) == "2026-11-26T18:00:01.999Z"


@given(st.text(alphabet=st.characters(max_codepoint=0x7F)))
def test_the_plain_ascii_fast_path_decides_as_the_full_check(text: str) -> None:
    if logfmt._PLAIN_BARE_RE.fullmatch(text):
        assert logfmt._BARE_VALUE_RE.fullmatch(text)
        assert not logfmt._needs_escape(text)
