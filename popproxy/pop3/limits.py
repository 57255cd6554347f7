"""Named limits of the POP3 wire protocol, each with its source.

Every buffer and count in ``pop3/`` is bounded by one of these; the session
layer may lower (never raise past reason) the ones that are configurable.
"""

from __future__ import annotations

# RFC 2449 §4: "Commands ... MUST NOT exceed 255 octets, including the terminating CRLF".
MAX_COMMAND_LINE_OCTETS = 255

# RFC 5034 §4 leaves SASL continuation lines unbounded; an AUTH PLAIN response is
# authzid NUL authcid NUL password, base64-encoded. 8 KiB is Dovecot-sized room for
# long credentials while keeping a hostile client's buffer small.
MAX_SASL_LINE_OCTETS = 8192

# RFC 2449 §4: "Responses ... MUST NOT exceed 512 octets, including the terminating CRLF".
MAX_REPLY_LINE_OCTETS = 512

# aiosmtpd and Dovecot both close a session after a run of bad commands (Dovecot's
# CLIENT_MAX_BAD_COMMANDS is 20); a smaller budget costs a misbehaving client little.
MAX_BAD_COMMANDS = 10

# Message numbers are positive decimal integers without sign (RFC 1939 §3); ten digits
# and 2**31 - 1 keep them in every peer's 32-bit signed int.
MAX_NUMBER_DIGITS = 10
MAX_MESSAGE_NUMBER = 2**31 - 1

# RFC 1939 §7: a UIDL "consists of one to 70 characters in the range 0x21 to 0x7E".
MAX_UIDL_OCTETS = 70
