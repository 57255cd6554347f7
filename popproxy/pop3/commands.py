"""POP3 commands as frozen values, and their parser and serializer.

The same values are events for the server role (what the client asked) and
inputs for the client role (what we ask an upstream). RFC 1939 §§4-7,
RFC 2449 §5 (CAPA), RFC 2595 §4 (STLS), RFC 5034 §4 (AUTH).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass
from typing import ClassVar

from popproxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from popproxy.pop3.limits import MAX_MESSAGE_NUMBER, MAX_NUMBER_DIGITS
from popproxy.pop3.replies import Err
from popproxy.pop3.wire import CONTROL_OCTET
from popproxy.secret import Secret


class Verb(enum.Enum):
    """Every command verb popproxy knows; the value is the wire spelling."""

    USER = "USER"
    PASS = "PASS"
    APOP = "APOP"
    AUTH = "AUTH"
    STLS = "STLS"
    CAPA = "CAPA"
    STAT = "STAT"
    LIST = "LIST"
    RETR = "RETR"
    DELE = "DELE"
    NOOP = "NOOP"
    RSET = "RSET"
    QUIT = "QUIT"
    TOP = "TOP"
    UIDL = "UIDL"

    # Members are singletons compared by identity: hash them by identity, in C. Enum's
    # own __hash__ is Python code, and these key pop3/state.py's tables on every command.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class User:
    """USER name (RFC 1939 §7)."""

    name: str
    verb: ClassVar[Verb] = Verb.USER


@dataclass(frozen=True, slots=True)
class Pass:
    """PASS string (RFC 1939 §7); the server role fills in the USER given before it."""

    password: Secret
    user: str = ""
    verb: ClassVar[Verb] = Verb.PASS


@dataclass(frozen=True, slots=True)
class Apop:
    """APOP name digest (RFC 1939 §7); parsed, and always refused by the server role."""

    name: str
    digest: str
    verb: ClassVar[Verb] = Verb.APOP


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH [mechanism [initial-response]] (RFC 5034 §4).

    ``mechanism`` is None for a bare AUTH (list mechanisms). ``initial_response``
    holds decoded octets: None when absent, ``Secret(b"")`` for ``=``.
    """

    mechanism: str | None = None
    initial_response: Secret | None = None
    verb: ClassVar[Verb] = Verb.AUTH


@dataclass(frozen=True, slots=True)
class SaslResponse:
    """A client's base64 line during a SASL exchange, decoded (RFC 5034 §4).

    The server role fills in the exchange's ``mechanism`` and the ``earlier``
    responses of the same exchange (an initial response included), so a LOGIN
    exchange's password line comes with its user name; a parsed line has neither.
    """

    data: Secret
    mechanism: str | None = None
    earlier: tuple[Secret, ...] = ()
    verb: ClassVar[Verb] = Verb.AUTH


@dataclass(frozen=True, slots=True)
class SaslEmpty:
    """An empty line during a SASL exchange (client role): how XOAUTH2 acknowledges an
    error challenge (Google's and Microsoft's documentation). ``SaslResponse`` with no
    data is ``=`` instead."""

    verb: ClassVar[Verb] = Verb.AUTH


@dataclass(frozen=True, slots=True)
class SaslCancel:
    """A ``*`` line: the client cancels the SASL exchange (RFC 5034 §4)."""

    verb: ClassVar[Verb] = Verb.AUTH


@dataclass(frozen=True, slots=True)
class Stls:
    """STLS (RFC 2595 §4)."""

    verb: ClassVar[Verb] = Verb.STLS


@dataclass(frozen=True, slots=True)
class Capa:
    """CAPA (RFC 2449 §5)."""

    verb: ClassVar[Verb] = Verb.CAPA


@dataclass(frozen=True, slots=True)
class Stat:
    """STAT (RFC 1939 §5)."""

    verb: ClassVar[Verb] = Verb.STAT


@dataclass(frozen=True, slots=True)
class List:
    """LIST [msg] (RFC 1939 §5)."""

    msg: int | None = None
    verb: ClassVar[Verb] = Verb.LIST


@dataclass(frozen=True, slots=True)
class Retr:
    """RETR msg (RFC 1939 §5)."""

    msg: int
    verb: ClassVar[Verb] = Verb.RETR


@dataclass(frozen=True, slots=True)
class Dele:
    """DELE msg (RFC 1939 §5)."""

    msg: int
    verb: ClassVar[Verb] = Verb.DELE


@dataclass(frozen=True, slots=True)
class Noop:
    """NOOP (RFC 1939 §5)."""

    verb: ClassVar[Verb] = Verb.NOOP


@dataclass(frozen=True, slots=True)
class Rset:
    """RSET (RFC 1939 §5)."""

    verb: ClassVar[Verb] = Verb.RSET


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT (RFC 1939 §§4, 6)."""

    verb: ClassVar[Verb] = Verb.QUIT


@dataclass(frozen=True, slots=True)
class Top:
    """TOP msg n (RFC 1939 §7)."""

    msg: int
    lines: int
    verb: ClassVar[Verb] = Verb.TOP


@dataclass(frozen=True, slots=True)
class Uidl:
    """UIDL [msg] (RFC 1939 §7)."""

    msg: int | None = None
    verb: ClassVar[Verb] = Verb.UIDL


Command = (
    User
    | Pass
    | Apop
    | Auth
    | Stls
    | Capa
    | Stat
    | List
    | Retr
    | Dele
    | Noop
    | Rset
    | Quit
    | Top
    | Uidl
)
SaslLine = SaslResponse | SaslEmpty | SaslCancel


def multiline_on_ok(command: Command | SaslLine) -> bool:
    """Whether a ``+OK`` to ``command`` is followed by a multi-line body (RFC 1939 §3)."""
    # The three that always are, by exact type: every reply's path.
    kind = type(command)
    if kind is Retr or kind is Top or kind is Capa:
        return True
    match command:  # class patterns: no union type built per call, as isinstance(c, A | B)
        case List(msg=msg) | Uidl(msg=msg):
            return msg is None
        case Auth(mechanism=mechanism):
            return mechanism is None
    return False


_DIGITS = re.compile(rb"[0-9]+")
_APOP_DIGEST = re.compile(rb"[0-9a-f]{32}")
_MECHANISM = re.compile(rb"[A-Z0-9_-]{1,20}")  # RFC 4422 §3.1: SASL mechanism names
# Each verb by its wire spelling (upper case), and back.
_VERBS = {verb.value.encode("ascii"): verb for verb in Verb}
_VERB_OCTETS = {verb: wire for wire, verb in _VERBS.items()}
_VERB_LINES = {verb: wire + b"\r\n" for verb, wire in _VERB_OCTETS.items()}


def _bad(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(Err(text))


def parse_number(raw: bytes, *, allow_zero: bool) -> int:
    """Parse a decimal argument strictly: digits only, bounded (RFC 1939 §3).

    No sign, no spaces, no leading zeros for a message number, nothing after it.
    """
    if not _DIGITS.fullmatch(raw) or len(raw) > MAX_NUMBER_DIGITS:
        raise _bad("Invalid number")
    value = int(raw)
    if value > MAX_MESSAGE_NUMBER:
        raise _bad("Number out of range")
    if not allow_zero and (value == 0 or raw.startswith(b"0")):
        raise _bad("Invalid message number")
    return value


def decode_base64(raw: bytes) -> Secret:
    """Decode a SASL base64 argument; ``=`` is an empty response (RFC 5034 §4)."""
    if raw == b"=":
        return Secret(b"")
    try:
        return Secret(base64.b64decode(raw, validate=True))
    except binascii.Error:
        raise _bad("Invalid base64 data") from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("Invalid UTF-8 in argument") from None


def _no_args(args: list[bytes], command: Command) -> Command:
    if args:
        raise _bad("Too many arguments")
    return command


def _optional_msg(args: list[bytes]) -> int | None:
    match args:
        case []:
            return None
        case [raw]:
            return parse_number(raw, allow_zero=False)
        case _:
            raise _bad("Too many arguments")


def _one_msg(args: list[bytes]) -> int:
    match args:
        case [raw]:
            return parse_number(raw, allow_zero=False)
        case []:
            raise _bad("Missing message number")
        case _:
            raise _bad("Too many arguments")


def parse_command(line: bytes) -> Command:
    """Parse one command line without its line end (RFC 1939 §3).

    Raises RemoteProtocolError carrying the ``-ERR`` to send for anything that
    is not a well-formed command: control bytes, unknown verbs, bad arguments.
    """
    bare = _BARE_COMMANDS.get(line)
    if bare is not None:  # STAT, LIST, UIDL, QUIT as clients send them: parsed once
        return bare
    if CONTROL_OCTET.search(line) is not None:
        raise _bad("Invalid characters in command")
    raw_verb, _, rest = line.partition(b" ")
    verb = _VERBS.get(raw_verb.upper())  # not ASCII letters: no verb
    if verb is None:
        raise _bad("Unknown command")
    if verb is Verb.PASS:
        # RFC 1939 §7: the password is the rest of the line and may contain spaces.
        if not rest:
            raise _bad("Missing password")
        return Pass(Secret(rest))
    # Trailing spaces are tolerated, as Dovecot does; spaces between arguments are not.
    rest = rest.rstrip(b" ")
    args = rest.split(b" ") if rest else []
    if b"" in args:
        raise _bad("Invalid argument separator")
    match verb:  # the commands of TRANSACTION first: they come most often
        case Verb.RETR:
            return Retr(_one_msg(args))
        case Verb.DELE:
            return Dele(_one_msg(args))
        case Verb.LIST:
            return List(_optional_msg(args))
        case Verb.UIDL:
            return Uidl(_optional_msg(args))
        case Verb.TOP:
            if len(args) != 2:
                raise _bad("TOP takes a message number and a line count")
            return Top(
                parse_number(args[0], allow_zero=False), parse_number(args[1], allow_zero=True)
            )
        case Verb.STAT:
            return _no_args(args, Stat())
        case Verb.NOOP:
            return _no_args(args, Noop())
        case Verb.USER:
            if len(args) != 1:
                raise _bad("USER takes exactly one argument")
            return User(_text(args[0]))
        case Verb.APOP:
            if len(args) != 2 or not _APOP_DIGEST.fullmatch(args[1]):
                raise _bad("APOP takes a name and a 32-digit MD5 digest")
            return Apop(_text(args[0]), args[1].decode("ascii"))
        case Verb.AUTH:
            return _parse_auth(args)
        case Verb.STLS:
            return _no_args(args, Stls())
        case Verb.CAPA:
            return _no_args(args, Capa())
        case Verb.RSET:
            return _no_args(args, Rset())
        case Verb.QUIT:
            return _no_args(args, Quit())


# The commands without arguments, as their upper-case lines parse: immutable, so one
# instance each serves every session (a line in any other form is parsed as above).
_BARE_COMMANDS: dict[bytes, Command] = {
    b"STAT": Stat(),
    b"LIST": List(),
    b"UIDL": Uidl(),
    b"QUIT": Quit(),
    b"NOOP": Noop(),
    b"RSET": Rset(),
    b"CAPA": Capa(),
    b"STLS": Stls(),
    b"AUTH": Auth(),
}


def _parse_auth(args: list[bytes]) -> Auth:
    match args:
        case []:
            return Auth()
        case [mech, *rest] if len(rest) <= 1:
            upper = mech.upper()
            if not _MECHANISM.fullmatch(upper):
                raise _bad("Invalid SASL mechanism name")
            initial = decode_base64(rest[0]) if rest else None
            return Auth(upper.decode("ascii"), initial)
        case _:
            raise _bad("Too many arguments")


def parse_sasl_line(line: bytes) -> SaslLine:
    """Parse a client's line inside a SASL exchange (RFC 5034 §4)."""
    if line == b"*":
        return SaslCancel()
    return SaslResponse(decode_base64(line))


def serialize_command(command: Command | SaslLine) -> bytes:
    """The wire form of a command, with CRLF (client role)."""
    match command:
        # First, without the line-break check (a number has none): every RETR's path.
        case Retr(msg=msg) | Dele(msg=msg):
            return b"%s %d\r\n" % (_VERB_OCTETS[command.verb], msg)
        case Top(msg=msg, lines=lines):
            return b"TOP %d %d\r\n" % (msg, lines)
        case User(name=name):
            words = [b"USER", name.encode("utf-8")]
        case Pass(password=password):
            words = [b"PASS", password.reveal()]
        case Apop(name=name, digest=digest):
            words = [b"APOP", name.encode("utf-8"), digest.encode("ascii")]
        case Auth(mechanism=None):
            words = [b"AUTH"]
        case Auth(mechanism=str(mech), initial_response=initial):
            words = [b"AUTH", mech.encode("ascii")]
            if initial is not None:
                words.append(_b64(initial))
        case SaslResponse(data=data):
            words = [_b64(data)]
        case SaslCancel():
            words = [b"*"]
        case SaslEmpty():
            words = [b""]
        case List(msg=None) | Uidl(msg=None) | Stls() | Capa() | Stat() | Noop() | Rset() | Quit():
            return _VERB_LINES[command.verb]  # no argument: the verb's line, made once
        case List(msg=int(msg)) | Uidl(msg=int(msg)):
            return b"%s %d\r\n" % (_VERB_OCTETS[command.verb], msg)
    line = b" ".join(words)
    if b"\r" in line or b"\n" in line:
        raise LocalProtocolError("line break inside a command")
    return line + b"\r\n"


def _b64(secret: Secret) -> bytes:
    value = secret.reveal()
    return base64.b64encode(value) if value else b"="
