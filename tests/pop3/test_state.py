"""The phase table (popproxy.pop3.state)."""

from __future__ import annotations

import ast
import inspect

import pytest

from popproxy.pop3 import server
from popproxy.pop3.commands import Verb
from popproxy.pop3.errors import LocalProtocolError
from popproxy.pop3.state import (
    ALLOWED,
    ON_COMMAND,
    ON_REPLY,
    ON_TRIGGER,
    Outcome,
    Phase,
    Trigger,
    next_phase,
    phase_after,
)


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


def test_triggers_move_the_phase_outside_replies() -> None:
    assert phase_after(Phase.AUTHORIZATION, Trigger.GREETING_ERR) is Phase.CLOSED
    for phase in (Phase.AUTHORIZATION, Phase.TRANSACTION):
        assert phase_after(phase, Trigger.FATAL_ERR) is Phase.CLOSED
    assert phase_after(Phase.TLS_HANDSHAKE, Trigger.TLS_ESTABLISHED) is Phase.AUTHORIZATION


@pytest.mark.parametrize("trigger", list(Trigger))
@pytest.mark.parametrize("phase", list(Phase))
def test_a_trigger_the_table_does_not_list_is_a_local_error(phase: Phase, trigger: Trigger) -> None:
    if (phase, trigger) in ON_TRIGGER:
        return
    with pytest.raises(LocalProtocolError):
        phase_after(phase, trigger)


def test_the_server_role_moves_the_phase_only_through_the_tables() -> None:
    # Its docstring and this module's say so: every assignment to its phase but the
    # first reads a table (ON_COMMAND or ON_REPLY, or next_phase / phase_after over them).
    tree = ast.parse(inspect.getsource(server))
    assigned = [
        ast.unparse(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(ast.unparse(target) == "self.phase" for target in node.targets)
    ]
    assert assigned[0] == "Phase.AUTHORIZATION"  # the constructor
    assert assigned[1:]
    for value in assigned[1:]:
        assert value.startswith(
            ("next_phase(", "phase_after(", "ON_COMMAND.get(", "ON_REPLY.get(")
        ), value
