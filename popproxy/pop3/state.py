"""Every legal phase transition of a POP3 session, in one table (RFC 1939 §§3-6).

The server role consults ``ALLOWED`` when a command arrives, ``ON_COMMAND``
for the phase it enters while the reply is due, and ``ON_REPLY`` for the phase
after the reply has been sent; anything not listed there keeps the phase.
``ON_TRIGGER`` holds the moves that no command's reply makes (a refused
greeting, a fatal ``-ERR``, a finished TLS handshake); a trigger not listed for
the phase is a bug (``LocalProtocolError``). The phase moves only through
these tables (``next_phase`` and ``phase_after``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from popproxy.pop3.commands import Verb
from popproxy.pop3.errors import LocalProtocolError


class Phase(enum.Enum):
    """Session phases: RFC 1939's three, plus the SASL and STLS sub-states."""

    AUTHORIZATION = "authorization"  # RFC 1939 §4
    SASL = "sasl"  # RFC 5034 §4: inside an AUTH exchange, lines are SASL responses
    TLS_HANDSHAKE = "tls-handshake"  # RFC 2595 §4: after +OK to STLS, until the handshake ends
    TRANSACTION = "transaction"  # RFC 1939 §5
    UPDATE = "update"  # RFC 1939 §6: after QUIT in TRANSACTION, until its reply
    CLOSED = "closed"

    # Members are singletons compared by identity: hash them by identity, in C. Enum's
    # own __hash__ is Python code, and these key the tables below on every command.
    __hash__ = object.__hash__


class Outcome(enum.Enum):
    """How the server answered a command."""

    OK = "ok"
    ERR = "err"
    CONTINUE = "continue"  # a SASL "+ " challenge (RFC 5034 §4)
    # A multi-line +OK (a listing or a message). No transition is keyed on it, so a
    # bare AUTH, which only lists mechanisms, can never count as a login.
    LISTED = "listed"

    # Members are singletons compared by identity: hash them by identity, in C. Enum's
    # own __hash__ is Python code, and these key the tables below on every command.
    __hash__ = object.__hash__


_AUTHORIZATION_VERBS = frozenset(
    {Verb.USER, Verb.PASS, Verb.APOP, Verb.AUTH, Verb.STLS, Verb.CAPA, Verb.QUIT}
)
_TRANSACTION_VERBS = frozenset(
    {
        Verb.STAT, Verb.LIST, Verb.RETR, Verb.DELE, Verb.NOOP, Verb.RSET, Verb.QUIT,
        Verb.TOP, Verb.UIDL, Verb.CAPA,
    }
)  # fmt: skip

ALLOWED: Mapping[Phase, frozenset[Verb]] = MappingProxyType(
    {
        Phase.AUTHORIZATION: _AUTHORIZATION_VERBS,
        Phase.SASL: frozenset({Verb.AUTH}),
        Phase.TLS_HANDSHAKE: frozenset(),
        Phase.TRANSACTION: _TRANSACTION_VERBS,
        Phase.UPDATE: frozenset(),
        Phase.CLOSED: frozenset(),
    }
)

ON_COMMAND: Mapping[tuple[Phase, Verb], Phase] = MappingProxyType(
    {
        (Phase.TRANSACTION, Verb.QUIT): Phase.UPDATE,  # RFC 1939 §6
    }
)

ON_REPLY: Mapping[tuple[Phase, Verb, Outcome], Phase] = MappingProxyType(
    {
        (Phase.AUTHORIZATION, Verb.PASS, Outcome.OK): Phase.TRANSACTION,
        (Phase.AUTHORIZATION, Verb.AUTH, Outcome.OK): Phase.TRANSACTION,
        (Phase.AUTHORIZATION, Verb.AUTH, Outcome.CONTINUE): Phase.SASL,
        (Phase.SASL, Verb.AUTH, Outcome.OK): Phase.TRANSACTION,
        (Phase.SASL, Verb.AUTH, Outcome.ERR): Phase.AUTHORIZATION,
        (Phase.AUTHORIZATION, Verb.STLS, Outcome.OK): Phase.TLS_HANDSHAKE,
        (Phase.AUTHORIZATION, Verb.QUIT, Outcome.OK): Phase.CLOSED,
        (Phase.AUTHORIZATION, Verb.QUIT, Outcome.ERR): Phase.CLOSED,
        (Phase.UPDATE, Verb.QUIT, Outcome.OK): Phase.CLOSED,
        (Phase.UPDATE, Verb.QUIT, Outcome.ERR): Phase.CLOSED,
    }
)


class Trigger(enum.Enum):
    """What moves the phase besides a command and its reply."""

    GREETING_ERR = "greeting-err"  # RFC 1939 §4: a -ERR greeting; the connection closes
    # A -ERR after which the connection closes: too many bad commands, or STLS with
    # octets pipelined behind it (RFC 2595 §4).
    FATAL_ERR = "fatal-err"
    TLS_ESTABLISHED = "tls-established"  # RFC 2595 §4: the handshake after +OK to STLS is done

    # Members are singletons compared by identity: hash them by identity, in C. Enum's
    # own __hash__ is Python code, and these key the tables below on every command.
    __hash__ = object.__hash__


ON_TRIGGER: Mapping[tuple[Phase, Trigger], Phase] = MappingProxyType(
    {
        (Phase.AUTHORIZATION, Trigger.GREETING_ERR): Phase.CLOSED,
        (Phase.AUTHORIZATION, Trigger.FATAL_ERR): Phase.CLOSED,
        (Phase.TRANSACTION, Trigger.FATAL_ERR): Phase.CLOSED,
        # RFC 2595 §4: back to AUTHORIZATION, everything from before the handshake forgotten.
        (Phase.TLS_HANDSHAKE, Trigger.TLS_ESTABLISHED): Phase.AUTHORIZATION,
    }
)


def next_phase(phase: Phase, verb: Verb, outcome: Outcome) -> Phase:
    """The phase after answering ``verb`` with ``outcome`` in ``phase``."""
    return ON_REPLY.get((phase, verb, outcome), phase)


def phase_after(phase: Phase, trigger: Trigger) -> Phase:
    """The phase ``trigger`` moves ``phase`` to; LocalProtocolError if it cannot happen there."""
    try:
        return ON_TRIGGER[(phase, trigger)]
    except KeyError:
        raise LocalProtocolError(f"{trigger.name} in phase {phase.name}") from None
