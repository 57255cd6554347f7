"""Password hashes: scrypt PHC strings, argon2id when available, malformed input."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.auth.passwords import (
    DEFAULT_SCRYPT_LN,
    Algorithm,
    HashParams,
    PasswordHashError,
    argon2_available,
    dummy_hash,
    hash_password,
    parse_hash,
    verify_password,
)
from popproxy.secret import Secret

PW = Secret.from_str("correct horse")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def test_default_parameters_and_format() -> None:
    phc = hash_password(PW)
    algorithm, params, salt, digest = phc.split("$")[1:]
    assert algorithm == "scrypt"
    assert params == f"ln={DEFAULT_SCRYPT_LN},r=8,p=1"
    assert DEFAULT_SCRYPT_LN == 15
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(digest + "=")) == 32
    assert "=" not in salt + digest  # PHC: no padding
    assert verify_password(phc, PW)


def test_hash_matches_stdlib_scrypt() -> None:
    """The PHC string is plain RFC 7914 scrypt, so other tools can check it."""
    phc = hash_password(PW, ln=4, r=8, p=1)
    salt = base64.b64decode(phc.split("$")[3] + "==")
    expected = hashlib.scrypt(b"correct horse", salt=salt, n=16, r=8, p=1, dklen=32)
    assert phc.split("$")[4] == b64(expected)


def test_verify_known_vector() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**4, r=8, p=1, dklen=32)
    phc = f"$scrypt$ln=4,r=8,p=1${b64(salt)}${b64(digest)}"
    assert verify_password(phc, Secret.from_str("pw"))
    assert not verify_password(phc, Secret.from_str("pW"))
    # Parameter order does not matter.
    assert verify_password(f"$scrypt$p=1,r=8,ln=4${b64(salt)}${b64(digest)}", Secret(b"pw"))


def test_salts_are_random() -> None:
    assert hash_password(PW, ln=4) != hash_password(PW, ln=4)


def test_wrong_password_and_empty_password() -> None:
    phc = hash_password(PW, ln=4)
    assert not verify_password(phc, Secret.from_str("correct horsf"))
    assert not verify_password(phc, Secret(b""))


def test_non_ascii_and_binary_passwords() -> None:
    for raw in ["pässwörd".encode(), b"\xff\x00\xfe", "🔑".encode()]:
        phc = hash_password(Secret(raw), ln=4)
        assert verify_password(phc, Secret(raw))
        assert not verify_password(phc, Secret(raw + b"x"))


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.binary(min_size=0, max_size=64))
def test_verify_is_exact(a: bytes, b: bytes) -> None:
    phc = hash_password(Secret(a), ln=1, r=1, p=1)
    # scrypt's PBKDF2 is HMAC-SHA256 keyed with the password, and HMAC pads a key of at
    # most SHA-256's 64-octet block with zero octets (RFC 2104 §2): passwords that differ
    # only by trailing NULs hash alike. No password can hold a NUL: the command parser
    # refuses control octets (pop3/wire.py) and SASL PLAIN splits on NUL (RFC 4616 §2).
    alike = max(len(a), len(b)) <= 64 and a.rstrip(b"\0") == b.rstrip(b"\0")
    assert verify_password(phc, Secret(b)) == (a == b or alike)


def test_passwords_that_differ_by_trailing_nuls_hash_alike() -> None:
    """The HMAC padding above, pinned: hypothesis finds such a pair only now and then."""
    phc = hash_password(Secret(b""), ln=1, r=1, p=1)
    assert verify_password(phc, Secret(b"\0"))
    assert not verify_password(phc, Secret(b"\0x"))


def test_parse_hash_reports_parameters() -> None:
    phc = hash_password(PW, ln=5, r=4, p=2)
    assert parse_hash(phc) == HashParams(Algorithm.SCRYPT, (("ln", 5), ("r", 4), ("p", 2)), 16, 32)


MALFORMED = [
    "",
    "plain text",
    "$scrypt$",
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ",
    "$scrypt$ln=4,r=8$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=4,r=8,p=1,x=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=4,ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=+4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=04,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=0,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=21,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,  # 2 GiB of memory
    "$scrypt$ln=4,r=0,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=4,r=8,p=1$c2FsdA$" + "A" * 43,  # 4-octet salt
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$AAAA",  # 3-octet hash
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0==$" + "A" * 43,  # padding
    "$scrypt$ln=4,r=8,p=1$c2Fsd.NhbHRzYWx0$" + "A" * 43,  # not base64
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43 + "$extra",
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 1000,
    "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$2b$12$abcdefghijklmnopqrstuu",  # bcrypt
]


@pytest.mark.parametrize("phc", MALFORMED)
def test_malformed_hashes_raise(phc: str) -> None:
    with pytest.raises(PasswordHashError):
        parse_hash(phc)
    with pytest.raises(PasswordHashError):
        verify_password(phc, PW)


def test_error_messages_do_not_contain_the_hash() -> None:
    phc = "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$SECRETSECRETSECRET"
    with pytest.raises(PasswordHashError) as info:
        parse_hash(phc)
    assert "SECRET" not in str(info.value)


def test_hash_password_refuses_out_of_bounds_parameters() -> None:
    with pytest.raises(PasswordHashError):
        hash_password(PW, ln=30)
    with pytest.raises(PasswordHashError):
        hash_password(PW, p=0)


def test_dummy_hash_has_same_cost_and_matches_nothing() -> None:
    phc = hash_password(PW, ln=5, r=2, p=1)
    dummy = dummy_hash(phc)
    assert dummy != phc
    assert parse_hash(dummy) == parse_hash(phc)
    assert not verify_password(dummy, PW)
    default = dummy_hash()
    assert parse_hash(default) == HashParams(
        Algorithm.SCRYPT, (("ln", 15), ("r", 8), ("p", 1)), 16, 32
    )


def test_passwords_module_is_pure() -> None:
    """DESIGN.md: the pure part of auth/ imports no trio, socket, ssl, yaml or prometheus."""
    code = (
        "import sys, popproxy.auth.passwords; "
        "print(' '.join(m for m in ('trio', 'socket', 'ssl', 'yaml', 'prometheus_client')"
        " if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == ""


# -- argon2id ---------------------------------------------------------------------------


def test_argon2id_without_argon2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "argon2", None)
    assert not argon2_available()
    phc = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43
    with pytest.raises(PasswordHashError, match="argon2-cffi") as info:
        verify_password(phc, PW)
    assert "popproxy[argon2]" in str(info.value)
    with pytest.raises(PasswordHashError, match="argon2-cffi"):
        parse_hash(phc)


def _argon2_hasher() -> object:
    import argon2  # the test extra installs argon2-cffi: this path is always tested

    return argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


def test_argon2id_verifies_when_installed() -> None:
    hasher = _argon2_hasher()
    phc = hasher.hash("correct horse")  # type: ignore[attr-defined]
    assert isinstance(phc, str)
    assert argon2_available()
    assert verify_password(phc, PW)
    assert not verify_password(phc, Secret.from_str("wrong"))
    params = parse_hash(phc)
    assert params.algorithm is Algorithm.ARGON2ID
    assert dict(params.params) == {"v": 19, "m": 64, "t": 1, "p": 1}


def test_argon2id_dummy_has_same_cost() -> None:
    hasher = _argon2_hasher()
    phc = hasher.hash("correct horse")  # type: ignore[attr-defined]
    dummy = dummy_hash(phc)
    assert parse_hash(dummy) == parse_hash(phc)
    assert not verify_password(dummy, PW)


def test_argon2id_malformed_when_installed() -> None:
    assert argon2_available()
    for phc in [
        "$argon2id$v=19$m=8$AAAA$AAAA",
        "$argon2id$m=8,t=1,p=1$" + "A" * 22 + "$" + "A" * 43,
    ]:
        with pytest.raises(PasswordHashError):
            parse_hash(phc)
