"""Named limits of the POP3 wire protocol, each with its source.

Every buffer and count in ``pop3/`` is bounded by one of these. The line and
payload limits are the defaults of settings the operator may change in config
(``limits`` and ``upstreams.NAME``), but only between the floor and the ceiling
given here: where an RFC says a peer MUST NOT exceed a length, the floor is that
length, so a compliant peer is never refused; the ceiling keeps a hostile peer's
buffer small whatever the config says.
"""

from __future__ import annotations

# RFC 2449 §4: "Commands ... MUST NOT exceed 255 octets, including the terminating CRLF".
# The floor of limits.max_command_line_bytes: a client within the RFC is always heard.
MAX_COMMAND_LINE_OCTETS = 255
# Room for clients that break RFC 2449 §4 with long passwords; 16 times the RFC's length
# is still a small per-session buffer.
COMMAND_LINE_CEILING_OCTETS = 4096

# RFC 5034 §4 leaves SASL continuation lines unbounded; an AUTH PLAIN response is
# authzid NUL authcid NUL password, base64-encoded. 8 KiB is Dovecot-sized room for
# long credentials while keeping a hostile client's buffer small.
MAX_SASL_LINE_OCTETS = 8192
# The most limits.max_sasl_line_bytes may allow (its floor is the command line limit:
# an AUTH line is at least as long as any command may be).
SASL_LINE_CEILING_OCTETS = 65536

# The decoded SASL payload (RFC 5034 §4), checked after base64 decoding. For PLAIN
# (RFC 4616 §2) it is authzid NUL authcid NUL password, and a server MUST accept each
# of the three up to 255 octets: that is the floor. The default is what a line at
# MAX_SASL_LINE_OCTETS decodes to, so the two bounds agree unless one is changed; the
# ceiling is what a line at SASL_LINE_CEILING_OCTETS decodes to.
MAX_SASL_PAYLOAD_OCTETS = MAX_SASL_LINE_OCTETS * 3 // 4
SASL_PAYLOAD_FLOOR_OCTETS = 3 * 255 + 2
SASL_PAYLOAD_CEILING_OCTETS = SASL_LINE_CEILING_OCTETS * 3 // 4

# RFC 2449 §4: "Responses ... MUST NOT exceed 512 octets, including the terminating CRLF".
# The floor of upstreams.NAME.max_reply_line_bytes: a compliant upstream is always read.
MAX_REPLY_LINE_OCTETS = 512
# Room for upstreams that break RFC 2449 §4 (long greetings or CAPA lines); a status line
# longer than this is an attack or a broken server, and the connection is dropped.
REPLY_LINE_CEILING_OCTETS = 65536

# aiosmtpd and Dovecot both close a session after a run of bad commands (Dovecot's
# CLIENT_MAX_BAD_COMMANDS is 20); a smaller budget costs a misbehaving client little.
MAX_BAD_COMMANDS = 10

# Message numbers are positive decimal integers without sign (RFC 1939 §3); ten digits
# and 2**31 - 1 keep them in every peer's 32-bit signed int.
MAX_NUMBER_DIGITS = 10
MAX_MESSAGE_NUMBER = 2**31 - 1

# RFC 1939 §7: a UIDL "consists of one to 70 characters in the range 0x21 to 0x7E".
MAX_UIDL_OCTETS = 70

# A login name must fit in a USER command line of MAX_COMMAND_LINE_OCTETS
# (RFC 2449 §4: 255 octets with "USER " and CRLF), so every configured user can log in
# with USER/PASS from a client that keeps to the RFC.
MAX_LOGIN_NAME_OCTETS = MAX_COMMAND_LINE_OCTETS - len(b"USER \r\n")
