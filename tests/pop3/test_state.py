"""The phase table (popproxy.pop3.state)."""

from __future__ import annotations

import pytest

from popproxy.pop3.commands import Verb
from popproxy.pop3.state import ALLOWED, ON_COMMAND, ON_REPLY, Outcome, Phase, next_phase


def test_every_phase_has_an_allowed_set() -> None:
    assert set(ALLOWED) == set(Phase)


def test_login_moves_to_transaction_only_on_ok() -> None:
    for verb in (Verb.PASS, Verb.AUTH):
        assert next_phase(Phase.AUTHORIZATION, verb, Outcome.OK) is Phase.TRANSACTION
        assert next_phase(Phase.AUTHORIZATION, verb, Outcome.ERR) is Phase.AUTHORIZATION


def test_sasl_exchange() -> None:
    assert next_phase(Phase.AUTHORIZATION, Verb.AUTH, Outcome.CONTINUE) is Phase.SASL
    assert next_phase(Phase.SASL, Verb.AUTH, Outcome.CONTINUE) is Phase.SASL
    assert next_phase(Phase.SASL, Verb.AUTH, Outcome.OK) is Phase.TRANSACTION
    assert next_phase(Phase.SASL, Verb.AUTH, Outcome.ERR) is Phase.AUTHORIZATION


def test_quit() -> None:
    assert ON_COMMAND[(Phase.TRANSACTION, Verb.QUIT)] is Phase.UPDATE
    for outcome in (Outcome.OK, Outcome.ERR):
        assert next_phase(Phase.AUTHORIZATION, Verb.QUIT, outcome) is Phase.CLOSED
        assert next_phase(Phase.UPDATE, Verb.QUIT, outcome) is Phase.CLOSED


def test_stls() -> None:
    assert next_phase(Phase.AUTHORIZATION, Verb.STLS, Outcome.OK) is Phase.TLS_HANDSHAKE
    assert next_phase(Phase.AUTHORIZATION, Verb.STLS, Outcome.ERR) is Phase.AUTHORIZATION
    assert Verb.STLS not in ALLOWED[Phase.TRANSACTION]  # RFC 2595 §4


@pytest.mark.parametrize("verb", list(Verb))
@pytest.mark.parametrize("outcome", list(Outcome))
def test_transaction_is_left_only_by_quit(verb: Verb, outcome: Outcome) -> None:
    phase = ON_COMMAND.get((Phase.TRANSACTION, verb), Phase.TRANSACTION)
    assert phase is (Phase.UPDATE if verb is Verb.QUIT else Phase.TRANSACTION)
    if verb is not Verb.QUIT:
        assert next_phase(Phase.TRANSACTION, verb, outcome) is Phase.TRANSACTION


def test_replies_answer_verbs_that_their_phase_reads() -> None:
    # A reply is due in a phase either because the phase reads the verb or
    # because ON_COMMAND moved there when the verb was read (QUIT -> UPDATE).
    entered = {(to, verb) for (_, verb), to in ON_COMMAND.items()}
    for phase, verb, _ in ON_REPLY:
        assert verb in ALLOWED[phase] or (phase, verb) in entered


def test_no_commands_in_closing_phases() -> None:
    for phase in (Phase.TLS_HANDSHAKE, Phase.UPDATE, Phase.CLOSED):
        assert ALLOWED[phase] == frozenset()


def test_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        ALLOWED[Phase.CLOSED] = frozenset({Verb.NOOP})  # type: ignore[index]
