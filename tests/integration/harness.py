"""Harness for the real-client integration tests.

- A Maildir corpus with the awkward cases RFC 1939 cares about (dot-stuffing, 8-bit
  bodies, very long lines, a 50 MB message), with the sha256 of each message's
  CRLF form: the exact octets a POP3 client must end up with (RFC 1939 §3, §7).
- TLS files from a throwaway trustme CA.
- A config writer and a `popproxy run` subprocess whose logfmt stderr is read by a
  thread; readiness is the `msg=listening` line of every listener, then `msg=ready`.
- A small blocking POP3 client that hashes a RETR while reading it, so a 50 MB
  message is never held in the test process either.

Everything listens on loopback with ports picked by the kernel.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import poplib
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pop3client import SocketPop3

LOOPBACK = "127.0.0.1"

# How long a server may take from exec to `msg=ready` before the test fails with its log.
SERVER_START_DEADLINE_SECONDS = 20.0
# How long a server may take to exit after SIGTERM (its shutdown grace is set lower, below).
SERVER_STOP_DEADLINE_SECONDS = 15.0
# The shutdown grace written into test configs: sessions are all closed by then.
SERVER_SHUTDOWN_GRACE_SECONDS = 2.0
# The delay after a failed login in test configs (the default, 2 s, would slow the suite;
# the session tests check the delay itself).
AUTH_FAILURE_DELAY_SECONDS = 0.25
# The throttle's penalty stays on in test configs, smaller than the default 2 s to 15 s
# (tests/security checks the throttle itself with its own settings).
AUTH_PENALTY_INITIAL_SECONDS = 0.25
AUTH_PENALTY_MAX_SECONDS = 1.0
# Any single client subprocess (curl, fetchmail, getmail) must finish within this.
CLIENT_TIMEOUT_SECONDS = 120.0
# Socket timeout for the in-process POP3 clients.
SOCKET_TIMEOUT_SECONDS = 30.0
# Chunk size for reading files and sockets while hashing.
READ_CHUNK_BYTES = 1 << 20
# Size of the large message: "a 50 MB message" (issue 2, What it must show).
BIG_MESSAGE_BYTES = 50 * 1024 * 1024
# poplib refuses lines over 2048 octets (poplib._MAXLINE); RFC 1939 sets no such limit on
# message content and the corpus has a line of more than 10,000 characters.
CLIENT_MAX_LINE_BYTES = 1 << 20

# The user every client test logs in as. The password has characters that need care in
# URLs and config files, and none that needs quoting in a URL or a fetchmail rc string.
USER = "alice"
PASSWORD = "s3cret-pass_word.x"

# The three listener kinds of the config contract (config.TlsMode values).
LISTENER_KINDS = ("none", "starttls", "implicit")
# Messages of the seeded Dovecot accounts (`account`): small ones, so each test takes a
# moment only.
MESSAGES = 5


# ---------------------------------------------------------------------------------------------
# CRLF form and digests


@dataclass(slots=True)
class CrlfDigest:
    """Streaming sha256 and length of the CRLF form of some bytes.

    The CRLF form (what a POP3 server sends for a Maildir file, RFC 1939 §3): every bare LF
    becomes CRLF, an existing CRLF stays, and a final CRLF is added if the data does not end
    with one. Fed in chunks; never holds more than one chunk.
    """

    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    _last: bytes = b""  # the last two octets emitted, to handle chunk boundaries and the end

    def update(self, chunk: bytes) -> None:
        """Feed the next chunk of the original (Maildir, LF) bytes."""
        if not chunk:
            return
        out = bytearray()
        start = 0
        if self._last.endswith(b"\r") and chunk.startswith(b"\n"):
            out += b"\n"  # the CR ended the previous chunk: this CRLF already exists
            start = 1
        out += re.sub(rb"(?<!\r)\n", b"\r\n", chunk[start:])
        self._emit(bytes(out))

    def _emit(self, data: bytes) -> None:
        if data:
            self._hash.update(data)
            self.size += len(data)
            self._last = (self._last + data)[-2:]

    def finish(self) -> tuple[int, str]:
        """Add the final CRLF if missing; return (size, sha256 hex)."""
        if self._last != b"\r\n":
            self._emit(b"\r\n")
        return self.size, self._hash.hexdigest()


def crlf_form(data: bytes) -> bytes:
    """The CRLF form of a small message held in memory (see `CrlfDigest`)."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file as it is, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def crlf_digest_of_file(path: Path, *, skip_prefix: bytes = b"") -> tuple[int, str]:
    """(size, sha256) of the CRLF form of a file, read in chunks.

    `skip_prefix`: octets the file must start with and that are not part of the message
    (a header line a delivery agent added); AssertionError if the file does not start so.
    """
    digest = CrlfDigest()
    with path.open("rb") as f:
        if skip_prefix:
            head = f.read(len(skip_prefix))
            assert head == skip_prefix, f"{path} starts with {head!r}, not {skip_prefix!r}"
        while chunk := f.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.finish()


def sha256_hex(data: bytes) -> str:
    """sha256 of bytes, hex."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The Maildir corpus


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    """One message of the corpus and what a client must receive for it."""

    kind: str  # what it tests: "plain", "dots", ...
    key: str  # the Maildir unique name (file name up to ":")
    subdir: str  # "new" or "cur"
    filename: str  # the file name in subdir, flags included
    size: int  # octets of the CRLF form: what LIST must say and RETR must send
    sha256: str  # of the CRLF form
    crlf: bytes | None  # the CRLF form itself, for small messages (None for the big one)
    head: bytes  # the header and the blank line after it, CRLF form (what TOP n 0 sends)

    @property
    def relpath(self) -> str:
        """The path inside the Maildir."""
        return f"{self.subdir}/{self.filename}"

    def top(self, body_lines: int) -> bytes:
        """The expected un-stuffed TOP answer (RFC 1939 §7): header, blank line, n body lines."""
        if body_lines == 0:
            return self.head
        assert self.crlf is not None, "TOP n m>0 is only checked on small messages"
        body = self.crlf[len(self.head) :]
        lines = body.split(b"\r\n")[:-1]  # the CRLF form ends with CRLF
        return self.head + b"".join(line + b"\r\n" for line in lines[:body_lines])


@dataclass(frozen=True, slots=True)
class Corpus:
    """A Maildir (new/, cur/, tmp/) and its messages."""

    root: Path
    messages: tuple[CorpusMessage, ...]

    def by_kind(self, kind: str) -> CorpusMessage:
        """The message of one kind."""
        return next(m for m in self.messages if m.kind == kind)

    def by_sha256(self) -> dict[str, CorpusMessage]:
        """Messages by the sha256 of their CRLF form (all distinct)."""
        return {m.sha256: m for m in self.messages}

    @property
    def small(self) -> tuple[CorpusMessage, ...]:
        """The messages held in memory (all but the big one)."""
        return tuple(m for m in self.messages if m.crlf is not None)

    def copy_to(self, dest: Path, messages: Iterable[CorpusMessage] | None = None) -> Path:
        """A copy of the Maildir (or of just ``messages``) at `dest` made of hard links
        (instant even for 50 MB).

        The server only reads, renames and unlinks message files, never writes into
        them, so a hard-linked copy is as good as a real one and the original stays intact.
        """
        for sub in ("new", "cur", "tmp"):
            (dest / sub).mkdir(parents=True, exist_ok=True)
        for m in self.messages if messages is None else messages:
            src = self.root / m.relpath
            try:
                os.link(src, dest / m.relpath)
            except OSError:
                shutil.copyfile(src, dest / m.relpath)
        return dest


def maildir_keys(maildir: Path) -> set[str]:
    """Unique names of the messages now in a Maildir's new/ and cur/ (flags stripped)."""
    return {
        p.name.split(":", 1)[0]
        for sub in ("new", "cur")
        if (maildir / sub).is_dir()
        for p in (maildir / sub).iterdir()
    }


def _headers(subject: str, extra: Sequence[str] = ()) -> bytes:
    # Short unfolded ASCII header fields: some clients re-generate headers (getmail6 runs
    # them through Python's email package), which is an identity only for such fields.
    lines = [
        "From: Corpus Sender <sender@example.org>",
        "To: Test User <user@example.org>",
        f"Subject: {subject}",
        "Date: Thu, 26 Nov 2026 18:00:00 +0000",
        f"Message-ID: <{sha256_hex(subject.encode())[:16]}@corpus.example.org>",
        "MIME-Version: 1.0",
        *extra,
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _small_messages() -> list[tuple[str, bytes, bytes]]:
    """(kind, header + blank line, body) of the small messages; LF line ends as in a Maildir."""
    plain = b"Hello,\n\nthis is a plain message with a few lines.\nBye.\n"
    # Lines starting with "." must be dot-stuffed on the wire (RFC 1939 §3), including a
    # line that is just "." (it would end the response), one that is "..", and the last line.
    dots = (
        b"\n".join(
            [
                b"first line",
                b".",
                b"..",
                b"...",
                b".leading dot",
                b"..two leading dots",
                b" . not at start",
                b"",
                b".",
                b".",
            ]
        )
        + b"\n"
    )
    # 8-bit body: UTF-8 text and raw latin-1 octets (not valid UTF-8).
    eightbit = (
        "Grüße aus Köln, naïve café, 日本語, ✓ ✗ €\n".encode()
        + b"latin-1 bytes: caf\xe9 na\xefve \xa9 \xff\xfe end\n"
        + b"high octets: \x80\x81\x9f\xa0\n"
    )
    rng = random.Random(10_000)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .-_=+"
    long_line = "".join(rng.choice(alphabet) for _ in range(12_345)).encode()
    # A line of more than 10,000 characters, and one that also needs dot-stuffing.
    long = b"before\n" + long_line + b"\n." + long_line[:10_001] + b"\nafter\n"
    return [
        ("plain", _headers("plain message", ["Content-Type: text/plain; charset=us-ascii"]), plain),
        ("dots", _headers("lines starting with dots", ["Content-Type: text/plain"]), dots),
        (
            "8bit",
            _headers(
                "8-bit body",
                ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
            ),
            eightbit,
        ),
        ("long-line", _headers("a line longer than 10,000 characters"), long),
        # No final newline in the file: the server must add the CRLF (RFC 1939 §3).
        ("no-final-newline", _headers("no final newline"), b"last line has no newline"),
        ("empty-body", _headers("empty body"), b""),
    ]


def _big_message_blocks(total: int) -> Iterator[bytes]:
    """Deterministic pseudo-random LF lines, in ~1 MiB blocks, adding up to `total` octets.

    One block of random lines is made once; each block is that pool rotated at a different
    line boundary and tagged with its number, so blocks differ (a reordering or a repeated
    chunk changes the hash) and generation costs little more than the disk write.
    """
    rng = random.Random(1939)
    # Printable alphabet, dots included so dot-stuffing happens all through the stream.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,;:-_/()"
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    raw = rng.randbytes(READ_CHUNK_BYTES).translate(table)
    lines: list[bytes] = []
    pos = 0
    while pos < len(raw) - 200:
        n = rng.randrange(0, 120)
        line = raw[pos : pos + n]
        pos += n
        match rng.randrange(20):
            case 0:
                line = b"." + line  # needs stuffing
            case 1:
                line = b"."  # a lone dot line
            case _:
                pass
        lines.append(line + b"\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    pool = b"".join(lines)
    written = 0
    block_no = 0
    while written < total:
        cut = offsets[(block_no * 7919) % len(lines)]
        block = b"block %06d\n" % block_no + pool[cut:] + pool[:cut]
        block = block[: total - written]
        yield block
        written += len(block)
        block_no += 1


def _write_message(
    root: Path, kind: str, index: int, head: bytes, chunks: Iterable[bytes], *, keep: bool
) -> CorpusMessage:
    """Write head + chunks as message file number `index`; `keep` the CRLF form in memory."""
    # Maildir names (maildir(5)): new/ holds "time.unique.host", cur/ adds ":2,FLAGS".
    key = f"{1_764_180_000 + index}.M{index}P4242.corpus"
    subdir, filename = ("cur", key + ":2,S") if index % 2 else ("new", key)
    path = root / subdir / filename
    digest = CrlfDigest()
    kept = bytearray()
    with path.open("wb") as f:
        for chunk in itertools.chain([head], chunks):
            f.write(chunk)
            digest.update(chunk)
            if keep:
                kept += chunk
    size, sha = digest.finish()
    crlf = crlf_form(bytes(kept)) if keep else None
    if crlf is not None:
        assert (len(crlf), sha256_hex(crlf)) == (size, sha)
    mtime = 1_764_180_000 + index  # distinct, increasing mtimes: a stable, meaningful order
    os.utime(path, (mtime, mtime))
    return CorpusMessage(kind, key, subdir, filename, size, sha, crlf, crlf_form(head))


def make_corpus(root: Path, *, big_bytes: int = BIG_MESSAGE_BYTES) -> Corpus:
    """Write the corpus Maildir under `root`; the big message is skipped when big_bytes is 0."""
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    messages = [
        _write_message(root, kind, i, head, [body], keep=True)
        for i, (kind, head, body) in enumerate(_small_messages(), start=1)
    ]
    if big_bytes:
        head = _headers("50 MB of pseudo-random lines", ["Content-Type: text/plain"])
        blocks = _big_message_blocks(big_bytes - len(head))
        messages.append(_write_message(root, "big", len(messages) + 1, head, blocks, keep=False))
    return Corpus(root, tuple(messages))


# ---------------------------------------------------------------------------------------------
# TLS


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca_cert: Path
    server_cert: Path  # the chain, leaf first
    server_key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the host name."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def make_tls_files(directory: Path) -> TlsFiles:
    """Issue the test CA and server certificate with trustme and write them out."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    # fetchmail (6.4) wants a subject common name besides the subjectAltNames.
    cert = ca.issue_cert(LOOPBACK, "localhost", common_name="localhost")
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server-chain.pem",
        server_key=directory / "server-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    cert.private_key_pem.write_to_path(str(files.server_key))
    files.server_key.chmod(0o600)
    with files.server_cert.open("wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return files


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True, slots=True)
class User:
    """A local user of the test server: name, password, the Maildir it is served, and
    the scrypt cost of its hash (cheap unless a test needs the hash to take time)."""

    name: str
    password: str
    maildir: Path
    hash_ln: int = 4  # CHEAP_HASH_LN


@dataclass(frozen=True, slots=True)
class ProxyUser:
    """A local user routed to an upstream account (proxy mode, docs/proxy.md)."""

    name: str
    password: str
    upstream: str
    upstream_user: str
    upstream_password: str  # ignored with refresh_token_file
    # For an upstream with auth: xoauth2 or oauthbearer: the refresh-token file (0600).
    refresh_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """One `fetch:` source of a gateway user: an upstream account and its password."""

    upstream: str
    upstream_user: str
    upstream_password: str  # ignored with refresh_token_file
    # For an upstream with auth: xoauth2 or oauthbearer: the refresh-token file (0600).
    refresh_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class GatewayUser:
    """A local user whose Maildir the gateway fills from `sources` (docs/gateway.md)."""

    name: str
    password: str
    maildir: Path
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class Upstream:
    """An `upstreams:` entry: where the upstream listens and how to reach it."""

    host: str
    port: int
    tls: str = "none"  # none | starttls | implicit
    ca_file: Path | None = None
    settings: Mapping[str, object] = field(default_factory=dict)

    def as_config(self) -> dict[str, object]:
        entry: dict[str, object] = {"host": self.host, "port": self.port, "tls": self.tls}
        if self.ca_file is not None:
            entry["ca_file"] = str(self.ca_file)
        return {**entry, **self.settings}


def _user_entry(user: User | ProxyUser | GatewayUser, secrets_dir: Path) -> dict[str, object]:
    ln = user.hash_ln if isinstance(user, User) else CHEAP_HASH_LN
    entry: dict[str, object] = {"password_hash": password_hash(user.password, ln)}
    if isinstance(user, User):
        entry["maildir"] = str(user.maildir)
        return entry
    if isinstance(user, GatewayUser):
        entry["maildir"] = str(user.maildir)
        fetch: list[dict[str, str]] = []
        for index, source in enumerate(user.sources):
            account = {"upstream": source.upstream, "upstream_user": source.upstream_user}
            if source.refresh_token_file is not None:
                fetch.append(
                    {**account, "upstream_refresh_token_file": str(source.refresh_token_file)}
                )
                continue
            secret = secrets_dir / f"{user.name}.source{index}-password"
            secret.write_text(source.upstream_password + "\n", encoding="utf-8")
            secret.chmod(0o600)
            fetch.append({**account, "upstream_password_file": str(secret)})
        entry["fetch"] = fetch
        return entry
    entry.update(upstream=user.upstream, upstream_user=user.upstream_user)
    if user.refresh_token_file is not None:
        entry["upstream_refresh_token_file"] = str(user.refresh_token_file)
        return entry
    secret = secrets_dir / f"{user.name}.upstream-password"
    secret.write_text(user.upstream_password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    entry["upstream_password_file"] = str(secret)
    return entry


# The scrypt cost of test users' hashes unless a test asks for more: ln=4 keeps tests fast.
CHEAP_HASH_LN = 4
_hash_cache: dict[tuple[str, int], str] = {}


def password_hash(password: str, ln: int = CHEAP_HASH_LN) -> str:
    """A PHC scrypt hash made by popproxy itself, at cost ``ln`` (cheap by default)."""
    if (password, ln) not in _hash_cache:
        from popproxy.auth.passwords import hash_password
        from popproxy.secret import Secret

        _hash_cache[password, ln] = hash_password(Secret.from_str(password), ln=ln)
    return _hash_cache[password, ln]


# limits.max_sessions_per_ip in the configs written here: one address, many sessions.
LOOPBACK_MAX_SESSIONS = 1000


def write_config(
    path: Path,
    *,
    users: Sequence[User | ProxyUser | GatewayUser],
    tls: TlsFiles,
    listeners: Sequence[str] = LISTENER_KINDS,
    allow_plaintext_auth: bool = True,
    limits: Mapping[str, float | int] | None = None,
    upstreams: Mapping[str, Upstream] | None = None,
    metrics: Mapping[str, object] | None = None,
    rules: Mapping[str, str] | None = None,
    state: Path | str | None = None,
    gateway: Mapping[str, object] | None = None,
) -> Path:
    """Write a popproxy config (keys as in DESIGN.md "Config") with `port: 0` listeners.

    Upstream passwords go to files beside the config (mode 0600), never inline.
    `metrics` is the `metrics:` section (e.g. `{"address": LOOPBACK, "port": 0}`); none
    by default, so no exporter runs. `rules` maps rule file names (`10-keep.yaml`) to
    their YAML text, written to a `rules/` directory beside the config. `state` is the
    sqlite file (default: `state.db` beside the config; pass one to share it between
    servers, as a restart does), or a whole `state.url` such as a PostgreSQL one.
    """
    config: dict[str, object] = {
        "listen": [{"address": LOOPBACK, "port": 0, "tls": kind} for kind in listeners],
        "tls": {"cert_file": str(tls.server_cert), "key_file": str(tls.server_key)},
        "allow_plaintext_auth": allow_plaintext_auth,
        "upstreams": {name: u.as_config() for name, u in (upstreams or {}).items()},
        "users": {u.name: _user_entry(u, path.parent) for u in users},
        # Four slashes: an absolute path (DESIGN.md); the state stays in the test's tmp dir.
        "state": {"url": state_url(state or path.parent / "state.db")},
        "limits": {
            # Every test client comes from 127.0.0.1 (the 300-session test opens 300).
            "max_sessions_per_ip": LOOPBACK_MAX_SESSIONS,
            "shutdown_grace_seconds": SERVER_SHUTDOWN_GRACE_SECONDS,
            "auth_failure_delay_seconds": AUTH_FAILURE_DELAY_SECONDS,
            "auth_penalty_initial_seconds": AUTH_PENALTY_INITIAL_SECONDS,
            "auth_penalty_max_seconds": AUTH_PENALTY_MAX_SECONDS,
            **(limits or {}),
        },
    }
    if metrics is not None:
        config["metrics"] = dict(metrics)
    if gateway is not None:
        config["gateway"] = dict(gateway)
    if rules is not None:
        rules_dir = path.parent / "rules"
        rules_dir.mkdir(exist_ok=True)
        for name, text in rules.items():
            (rules_dir / name).write_text(text, encoding="utf-8")
        config["rules_dir"] = str(rules_dir)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# logfmt

_LOGFMT_PAIR = re.compile(r'([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """The key=value pairs of one logfmt line; quoted values are unescaped (JSON rules)."""
    fields: dict[str, str] = {}
    for key, raw in _LOGFMT_PAIR.findall(line):
        value = raw
        if raw.startswith('"'):
            try:
                value = str(json.loads(raw))
            except ValueError:
                value = raw[1:-1]
        fields[key] = value
    return fields


# ---------------------------------------------------------------------------------------------
# The server subprocess


class ServerFailed(AssertionError):
    """The server did not start, did not stop, or exited badly; the message holds its log."""


class ServerProcess:
    """`python -m popproxy run -c CONFIG` on loopback, with its stderr log captured.

    A reader thread records every stderr line; `wait_for_log` waits on it under a deadline.
    """

    def __init__(
        self, config: Path, *, listeners: Sequence[str], cwd: Path, log_level: str = "info"
    ) -> None:
        self.config = config
        self.listeners = tuple(listeners)
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.metrics_port: int | None = None  # the exporter's, from msg=metrics_listening
        self.crashed = False  # killed on purpose by a crash test (``crash``)
        self._cond = threading.Condition()
        self._eof = False
        self._stdout = (cwd / "server.stdout").open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "popproxy", "run", "-c", str(config)),
                *("--log-level", log_level),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The server's process id (for /proc/PID/status)."""
        return self.proc.pid

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        with self._cond:
            return "\n".join(self.lines)

    def records(self, msg: str | None = None) -> list[dict[str, str]]:
        """Parsed log lines so far, optionally only those with this `msg`."""
        with self._cond:
            parsed = [parse_logfmt(line) for line in self.lines]
        return [r for r in parsed if msg is None or r.get("msg") == msg]

    def wait_for_log(
        self,
        predicate: Callable[[list[dict[str, str]]], bool],
        *,
        timeout: float,
        what: str,
    ) -> list[dict[str, str]]:
        """Wait until predicate(all parsed records) holds; ServerFailed (with the log) if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                records = [parse_logfmt(line) for line in self.lines]
                if predicate(records):
                    return records
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    state = "exited" if self._eof else f"not within {timeout:g} s"
                    raise ServerFailed(
                        f"waiting for {what}: {state}\n--- log ---\n" + "\n".join(self.lines)
                    )
                self._cond.wait(remaining)

    def wait_sessions_ended(self, count: int, *, timeout: float = 10.0) -> list[dict[str, str]]:
        """Wait until `count` sessions have logged `msg=session_end`; return those records."""
        self.wait_for_log(
            lambda rs: sum(r.get("msg") == "session_end" for r in rs) >= count,
            timeout=timeout,
            what=f"{count} session_end lines",
        )
        return self.records("session_end")

    def wait_ready(self, timeout: float = SERVER_START_DEADLINE_SECONDS) -> None:
        """Wait for one `msg=listening` per listener, then `msg=ready`; record the ports."""

        def ready(records: list[dict[str, str]]) -> bool:
            return any(r.get("msg") == "ready" for r in records)

        try:
            records = self.wait_for_log(ready, timeout=timeout, what="msg=ready")
        except ServerFailed:
            self.kill()
            raise
        listening = [r for r in records if r.get("msg") == "listening"]
        kinds = [r.get("listener") for r in listening]
        if kinds != list(self.listeners):
            self.kill()
            raise ServerFailed(
                f"listening lines for {kinds}, expected {list(self.listeners)}\n--- log ---\n"
                + self.log_text()
            )
        for r in listening:
            assert r.get("address") == LOOPBACK, r
            self.ports[r["listener"]] = int(r["port"])
        for r in records:
            if r.get("msg") == "metrics_listening":
                self.metrics_port = int(r["port"])

    def port(self, kind: str) -> int:
        """The bound port of the listener of this kind ("none", "starttls", "implicit")."""
        return self.ports[kind]

    def rss_kib(self) -> int:
        """The server's resident set size now, in KiB (VmRSS of /proc/PID/status)."""
        return _proc_status_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        """The server's peak resident set size, in KiB (VmHWM of /proc/PID/status)."""
        return _proc_status_kib(self.pid, "VmHWM")

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (5 > /proc/PID/clear_refs); False if not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self, timeout: float = SERVER_STOP_DEADLINE_SECONDS) -> int:
        """SIGTERM, wait with a deadline, then SIGKILL; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerFailed(
                    f"no exit within {timeout:g} s of SIGTERM\n--- log ---\n" + self.log_text()
                ) from None
        self._close()
        return self.proc.returncode

    def crash(self) -> None:
        """SIGKILL on purpose (crash tests): the `start` fixture expects no clean exit."""
        self.crashed = True
        self.kill()

    def kill(self) -> None:
        """SIGKILL and reap (for a server that failed to start or stop)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(SERVER_STOP_DEADLINE_SECONDS)
        self._close()

    def _close(self) -> None:
        self._reader.join(SERVER_STOP_DEADLINE_SECONDS)
        self._stdout.close()


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # "VmRSS:     12345 kB"
    raise KeyError(key)


def state_url(state: Path | str) -> str:
    """The `state.url` for a sqlite file (four slashes: an absolute path), or ``state``
    itself when it is a URL already."""
    return state if isinstance(state, str) else "sqlite:///" + str(state)


def start_server(
    workdir: Path,
    *,
    listeners: Sequence[str] = LISTENER_KINDS,
    log_level: str = "info",
    **config: Any,
) -> ServerProcess:
    """Write a config into `workdir`, start the server there and wait until it is ready.

    ``config`` are `write_config`'s keywords (users, tls, limits, upstreams, ...).
    `log_level` is passed as `popproxy run --log-level` ("debug" to see everything).
    With `metrics` (the config section), `ServerProcess.metrics_port` is the exporter's port.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir / "popproxy.yaml", listeners=listeners, **config)
    server = ServerProcess(path, listeners=listeners, cwd=workdir, log_level=log_level)
    server.wait_ready()
    return server


# ---------------------------------------------------------------------------------------------
# A small streaming POP3 client


# The poplib connections `poplib_connection` opened; the integration conftest closes
# them after each test, whatever happened.
_POPLIB_OPENED: list[poplib.POP3] = []


def poplib_connection(
    port: int, *, host: str = LOOPBACK, tls: ssl.SSLContext | None = None
) -> poplib.POP3:
    """A poplib connection (implicit TLS with ``tls``), closed after the test whatever
    happens: a socket left to the garbage collector would surface as a ResourceWarning
    (an error here) in some later test."""
    pop: poplib.POP3
    if tls is None:
        pop = poplib.POP3(host, port, timeout=SOCKET_TIMEOUT_SECONDS)
    else:
        pop = poplib.POP3_SSL(host, port, context=tls, timeout=SOCKET_TIMEOUT_SECONDS)
    _POPLIB_OPENED.append(pop)
    return pop


def close_poplib_connections() -> None:
    """Close every connection `poplib_connection` opened."""
    while _POPLIB_OPENED:
        _POPLIB_OPENED.pop().close()


class Pop3Error(AssertionError):
    """A POP3 reply that was not +OK, or a broken response."""


class StreamingPop3(SocketPop3):
    """A raw client (tests/pop3client.py) whose commands must get +OK, and that hashes
    multi-line bodies as it reads them.

    poplib collects a whole RETR in a list; this one un-stuffs and hashes line by line,
    so the test process stays small while it reads 50 MB.
    """

    def __init__(
        self, port: int, *, tls: ssl.SSLContext | None = None, host: str = LOOPBACK
    ) -> None:
        super().__init__(
            port,
            tls=tls,
            greet=False,
            host=host,
            timeout=SOCKET_TIMEOUT_SECONDS,
            max_line_bytes=CLIENT_MAX_LINE_BYTES,
        )
        self.greeting = self._status()

    def _status(self) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise Pop3Error(line.decode("utf-8", "replace"))
        return line

    def command(self, line: str) -> bytes:
        """Send one command, return its +OK status line."""
        self.send(line.encode("ascii") + b"\r\n")
        return self._status()

    def login(self, user: str, password: str) -> bytes:
        """USER/PASS (RFC 1939 §7), each of which must get +OK; the reply to PASS."""
        self.command(f"USER {user}")
        return self.command(f"PASS {password}")

    def multiline(self, line: str) -> list[bytes]:
        """Send a command with a small multi-line reply; return its un-stuffed lines."""
        self.command(line)
        return self.body()

    def multiline_digest(self, line: str) -> tuple[int, str]:
        """Send a command with a multi-line reply; (octets, sha256) of the un-stuffed body."""
        self.command(line)
        h = hashlib.sha256()
        size = 0
        while (raw := self.line()) != b".":  # `Closed` if the body ends without it
            raw = raw[1:] if raw.startswith(b".") else raw  # RFC 1939 §3: the stuffed dot
            raw += b"\r\n"
            h.update(raw)
            size += len(raw)
        return size, h.hexdigest()


@dataclass
class RssSampler:
    """Samples a process's VmRSS in a thread until stopped; keeps the maximum (KiB)."""

    pid: int
    interval: float = 0.005
    peak_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kib = max(self.peak_kib, _proc_status_kib(self.pid, "VmRSS"))


def run_client(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a client program with a timeout, no stdin, output captured."""
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLIENT_TIMEOUT_SECONDS,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    """A client run's command, exit code and output, for assertion messages."""
    return (
        f"{' '.join(map(str, result.args))}\nexit {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:].decode('utf-8', 'replace')}\n"
        f"--- stderr ---\n{result.stderr[-4000:].decode('utf-8', 'replace')}"
    )
