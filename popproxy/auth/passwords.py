"""Password hashes as PHC strings: stdlib scrypt, and argon2id when argon2-cffi is installed.

Pure and standard library only (argon2-cffi is imported lazily, if at all): no trio,
no I/O. Hashing is slow on purpose, so callers run it in a worker thread
(:mod:`popproxy.auth.authenticator`).

The scrypt format follows the PHC string format
(https://github.com/P-H-C/phc-string-format/blob/master/phc-sf-spec.md) as passlib
writes it: ``$scrypt$ln=15,r=8,p=1$<salt>$<hash>``, where N = 2**ln, and salt and
hash are standard base64 without padding. Passwords are hashed as the octets the
client sends (a :class:`~popproxy.secret.Secret`), without normalisation.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from popproxy.secret import Secret

# RFC 7914 §2 parameters. ln=15 (N=32768), r=8, p=1 needs 128*r*N = 32 MiB and is
# the cost OWASP's password storage cheat sheet lists as scrypt's minimum (N=2**15...2**17).
DEFAULT_SCRYPT_LN = 15
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1

# 16 salt octets from `secrets`: NIST SP 800-63B §5.1.1.2 asks for at least 32 bits;
# 128 bits is what argon2-cffi and passlib use.
SALT_BYTES = 16
# A 256-bit derived key, as argon2-cffi's default hash_len.
HASH_BYTES = 32

# Bounds on what a hash string may ask for, so that a typo (ln=51) in a config cannot
# make a login allocate terabytes: at most 1 GiB of scrypt memory (ln=20 with r=8).
MAX_SCRYPT_LN = 20
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16
MAX_SCRYPT_MEMORY_BYTES = 1 << 30  # also bounds argon2id m (KiB)
# PHC string format: salts "SHOULD" be at least 8 octets, outputs at most 64.
MIN_SALT_BYTES = 8
MAX_SALT_BYTES = 64
MIN_HASH_BYTES = 16
MAX_HASH_BYTES = 64
# A PHC string is short; anything longer is not a hash we wrote.
MAX_PHC_CHARS = 512

_B64_RE = re.compile(r"[A-Za-z0-9+/]+")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,9}")


class PasswordHashError(ValueError):
    """A password hash string is malformed, or needs a library that is not installed.

    The message is safe to show an operator: it never contains the hash itself.
    """


class Algorithm(enum.Enum):
    """The hash algorithms popproxy verifies."""

    SCRYPT = "scrypt"
    ARGON2ID = "argon2id"


@dataclass(frozen=True, slots=True)
class HashParams:
    """What a PHC string says about its cost: algorithm, parameters and lengths.

    Two hashes with equal ``HashParams`` cost the same work to verify; the
    authenticator uses that to make an unknown user as slow as a wrong password.
    """

    algorithm: Algorithm
    params: tuple[tuple[str, int], ...]  # in the order they are written, e.g. (("ln", 15), ...)
    salt_bytes: int
    hash_bytes: int


@dataclass(frozen=True, slots=True)
class _Parsed:
    info: HashParams
    salt: bytes
    digest: bytes


def argon2_available() -> bool:
    """Say whether argon2id hashes can be verified (the optional ``argon2`` extra)."""
    return _argon2_module() is not None


def hash_password(
    password: Secret,
    *,
    ln: int = DEFAULT_SCRYPT_LN,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
) -> str:
    """Hash ``password`` with scrypt (RFC 7914) and a fresh random salt; return the PHC string.

    Slow on purpose (tens of milliseconds at the defaults): call it from a worker thread
    in async code. Raises :class:`PasswordHashError` for parameters out of bounds.
    """
    _check_scrypt_params(ln, r, p)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password.reveal(), salt, ln=ln, r=r, p=p, dklen=HASH_BYTES)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(phc: str, password: Secret) -> bool:
    """Say whether ``password`` matches the PHC hash string ``phc``, in constant time.

    scrypt is compared with :func:`hmac.compare_digest`; argon2id is verified by
    argon2-cffi. Raises :class:`PasswordHashError` if ``phc`` is malformed, or is
    argon2id and argon2-cffi is not installed.
    """
    algorithm = _algorithm_of(phc)
    if algorithm is Algorithm.ARGON2ID:
        return _argon2_verify(phc, password)
    parsed = _parse_scrypt(phc)
    values = dict(parsed.info.params)
    digest = _scrypt(
        password.reveal(),
        parsed.salt,
        ln=values["ln"],
        r=values["r"],
        p=values["p"],
        dklen=len(parsed.digest),
    )
    return hmac.compare_digest(digest, parsed.digest)


def parse_hash(phc: str) -> HashParams:
    """Check that ``phc`` is a hash popproxy can verify, and return its cost parameters.

    Raises :class:`PasswordHashError` with a message fit for a config error.
    """
    match _algorithm_of(phc):
        case Algorithm.SCRYPT:
            return _parse_scrypt(phc).info
        case Algorithm.ARGON2ID:
            return _parse_argon2id(phc)


def dummy_hash(like: str | None = None) -> str:
    """Return a hash that no password matches and that costs as much to check as ``like``.

    Same algorithm, parameters, salt and digest lengths as ``like`` (the default
    scrypt parameters when ``like`` is None), with random salt and digest octets.
    Verifying any password against it runs the full hash and returns False, so an
    unknown user costs the same work as a wrong password. Nothing is hashed here.
    """
    if like is None:
        info = HashParams(
            Algorithm.SCRYPT,
            (("ln", DEFAULT_SCRYPT_LN), ("r", DEFAULT_SCRYPT_R), ("p", DEFAULT_SCRYPT_P)),
            SALT_BYTES,
            HASH_BYTES,
        )
    else:
        info = parse_hash(like)
    return format_hash(
        info, secrets.token_bytes(info.salt_bytes), secrets.token_bytes(info.hash_bytes)
    )


def format_hash(info: HashParams, salt: bytes, digest: bytes) -> str:
    """Write a PHC string from its parts (the inverse of parsing)."""
    params = ",".join(f"{name}={value}" for name, value in info.params)
    match info.algorithm:
        case Algorithm.SCRYPT:
            return f"$scrypt${params}${_b64encode(salt)}${_b64encode(digest)}"
        case Algorithm.ARGON2ID:
            # argon2 puts the version in its own field: $argon2id$v=19$m=...,t=...,p=...$
            version = dict(info.params).get("v", 19)
            params = ",".join(f"{name}={value}" for name, value in info.params if name != "v")
            return f"$argon2id$v={version}${params}${_b64encode(salt)}${_b64encode(digest)}"


# -- scrypt ---------------------------------------------------------------------------


def _scrypt(password: bytes, salt: bytes, *, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    # OpenSSL needs 128*r*N for V plus 128*r*p for B and a little more; twice the
    # main term leaves room without letting a bad hash ask for unbounded memory.
    maxmem = 2 * 128 * r * (n + p) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


def _check_scrypt_params(ln: int, r: int, p: int) -> None:
    if not 1 <= ln <= MAX_SCRYPT_LN:
        raise PasswordHashError(f"scrypt ln must be 1..{MAX_SCRYPT_LN}, got {ln}")
    if not 1 <= r <= MAX_SCRYPT_R:
        raise PasswordHashError(f"scrypt r must be 1..{MAX_SCRYPT_R}, got {r}")
    if not 1 <= p <= MAX_SCRYPT_P:
        raise PasswordHashError(f"scrypt p must be 1..{MAX_SCRYPT_P}, got {p}")
    if 128 * r * (1 << ln) > MAX_SCRYPT_MEMORY_BYTES:
        raise PasswordHashError(
            f"scrypt ln={ln}, r={r} needs more than {MAX_SCRYPT_MEMORY_BYTES} bytes of memory"
        )


def _parse_scrypt(phc: str) -> _Parsed:
    parts = phc.split("$")
    # "", "scrypt", "ln=..,r=..,p=..", salt, hash
    if len(parts) != 5:
        raise PasswordHashError(
            "expected a PHC hash string $scrypt$ln=N,r=N,p=N$<salt>$<hash>"
            " (make one with `popproxy hash-password`)"
        )
    params = _parse_params(parts[2], ("ln", "r", "p"))
    _check_scrypt_params(params["ln"], params["r"], params["p"])
    salt = _b64decode(parts[3], "salt")
    digest = _b64decode(parts[4], "hash")
    _check_lengths(salt, digest)
    info = HashParams(
        Algorithm.SCRYPT,
        (("ln", params["ln"]), ("r", params["r"]), ("p", params["p"])),
        len(salt),
        len(digest),
    )
    return _Parsed(info, salt, digest)


def _parse_params(text: str, names: tuple[str, ...]) -> Mapping[str, int]:
    values: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise PasswordHashError(f"expected parameters {','.join(n + '=N' for n in names)}")
        if name in values:
            raise PasswordHashError(f"parameter {name} given twice")
        if not _DECIMAL_RE.fullmatch(value):
            raise PasswordHashError(f"parameter {name} must be a decimal integer")
        values[name] = int(value)
    missing = [n for n in names if n not in values]
    if missing:
        raise PasswordHashError(f"missing parameter {', '.join(missing)}")
    return values


def _check_lengths(salt: bytes, digest: bytes) -> None:
    if not MIN_SALT_BYTES <= len(salt) <= MAX_SALT_BYTES:
        raise PasswordHashError(
            f"salt must be {MIN_SALT_BYTES}..{MAX_SALT_BYTES} octets, got {len(salt)}"
        )
    if not MIN_HASH_BYTES <= len(digest) <= MAX_HASH_BYTES:
        raise PasswordHashError(
            f"hash must be {MIN_HASH_BYTES}..{MAX_HASH_BYTES} octets, got {len(digest)}"
        )


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    # PHC string format: standard base64 alphabet, no padding.
    if not _B64_RE.fullmatch(text) or len(text) % 4 == 1:
        raise PasswordHashError(f"{what} is not unpadded base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise PasswordHashError(f"{what} is not unpadded base64") from exc


def _algorithm_of(phc: object) -> Algorithm:
    if not isinstance(phc, str):
        raise PasswordHashError("expected a PHC hash string")
    if len(phc) > MAX_PHC_CHARS:
        raise PasswordHashError(f"expected a PHC hash string of at most {MAX_PHC_CHARS} characters")
    if phc.startswith("$scrypt$"):
        return Algorithm.SCRYPT
    if phc.startswith("$argon2id$"):
        return Algorithm.ARGON2ID
    if phc.startswith(("$argon2i$", "$argon2d$")):
        raise PasswordHashError("only argon2id is accepted among the argon2 variants")
    raise PasswordHashError(
        "expected a PHC hash string starting with $scrypt$ or $argon2id$"
        " (make one with `popproxy hash-password`)"
    )


# -- argon2id (optional) -----------------------------------------------------------------


def _argon2_module() -> ModuleType | None:
    try:
        import argon2
    except ImportError:
        return None
    return argon2


def _require_argon2() -> ModuleType:
    module = _argon2_module()
    if module is None:
        raise PasswordHashError(
            "argon2id hashes need argon2-cffi, which is not installed"
            " (install the extra: pip install 'popproxy[argon2]')"
        )
    return module


def _parse_argon2id(phc: str) -> HashParams:
    argon2 = _require_argon2()
    try:
        found = argon2.extract_parameters(phc)
    except argon2.exceptions.InvalidHashError as exc:
        raise PasswordHashError(
            "expected a PHC hash string $argon2id$v=19$m=N,t=N,p=N$<salt>$<hash>"
        ) from exc
    parts = phc.split("$")
    # "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
    if len(parts) != 6:
        raise PasswordHashError(
            "expected a PHC hash string $argon2id$v=19$m=N,t=N,p=N$<salt>$<hash>"
        )
    if int(found.memory_cost) * 1024 > MAX_SCRYPT_MEMORY_BYTES:
        raise PasswordHashError(
            f"argon2id m={found.memory_cost} needs more than {MAX_SCRYPT_MEMORY_BYTES} bytes"
        )
    salt = _b64decode(parts[4], "salt")
    digest = _b64decode(parts[5], "hash")
    _check_lengths(salt, digest)
    return HashParams(
        Algorithm.ARGON2ID,
        (
            ("v", int(found.version)),
            ("m", int(found.memory_cost)),
            ("t", int(found.time_cost)),
            ("p", int(found.parallelism)),
        ),
        len(salt),
        len(digest),
    )


def _argon2_verify(phc: str, password: Secret) -> bool:
    argon2 = _require_argon2()
    _parse_argon2id(phc)
    try:
        # argon2-cffi reads the parameters from the hash and compares in constant time (in C).
        return bool(argon2.PasswordHasher().verify(phc, password.reveal()))
    except argon2.exceptions.VerifyMismatchError:
        return False
    except argon2.exceptions.InvalidHashError as exc:
        raise PasswordHashError("malformed argon2id hash") from exc
    except argon2.exceptions.VerificationError:
        return False
