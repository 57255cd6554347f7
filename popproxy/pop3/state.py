"""Every legal phase transition of a POP3 session, in one table (RFC 1939 §§3-6).

The server role consults ``ALLOWED`` when a command arrives, ``ON_COMMAND``
for the phase it enters while the reply is due, and ``ON_REPLY`` for the phase
after the reply has been sent. Anything not listed keeps the phase.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from popproxy.pop3.commands import Verb


class Phase(enum.Enum):
    """Session phases: RFC 1939's three, plus the SASL and STLS sub-states."""

    AUTHORIZATION = "authorization"  # RFC 1939 §4
    SASL = "sasl"  # RFC 5034 §4: inside an AUTH exchange, lines are SASL responses
    TLS_HANDSHAKE = "tls-handshake"  # RFC 2595 §4: after +OK to STLS, until the handshake ends
    TRANSACTION = "transaction"  # RFC 1939 §5
    UPDATE = "update"  # RFC 1939 §6: after QUIT in TRANSACTION, until its reply
    CLOSED = "closed"


class Outcome(enum.Enum):
    """How the server answered a command."""

    OK = "ok"
    ERR = "err"
    CONTINUE = "continue"  # a SASL "+ " challenge (RFC 5034 §4)
    # A multi-line +OK (a listing or a message). No transition is keyed on it, so a
    # bare AUTH, which only lists mechanisms, can never count as a login.
    LISTED = "listed"


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


def next_phase(phase: Phase, verb: Verb, outcome: Outcome) -> Phase:
    """The phase after answering ``verb`` with ``outcome`` in ``phase``."""
    return ON_REPLY.get((phase, verb, outcome), phase)
