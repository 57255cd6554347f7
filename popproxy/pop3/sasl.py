"""The SASL mechanisms the server role offers, and what the LOGIN mechanism says.

PLAIN is RFC 4616; LOGIN is the older draft-murchison-sasl-login (never an RFC, but
offered by Dovecot and nginx, and tried first by some clients): the server prompts
``Username:`` and then ``Password:``, each as a base64 challenge (RFC 5034 §4), and
the client answers each with one base64 line. Both send the password as it is, so
both are plaintext mechanisms (RFC 2595 §4: not before TLS unless allowed). Like
Dovecot, a LOGIN exchange may start with the user name as an initial response
(``AUTH LOGIN dXNlcg==``), skipping the first prompt.
"""

from __future__ import annotations

PLAIN = "PLAIN"
LOGIN = "LOGIN"
# In the order CAPA lists them (as Dovecot: "SASL PLAIN LOGIN").
SERVER_MECHANISMS: tuple[str, ...] = (PLAIN, LOGIN)
# Mechanisms that carry the password in clear (RFC 2595 §4).
PLAINTEXT_MECHANISMS = frozenset({PLAIN, LOGIN})

# draft-murchison-sasl-login-00 §2: the two prompts, sent as challenges.
LOGIN_USERNAME_PROMPT = b"Username:"
LOGIN_PASSWORD_PROMPT = b"Password:"

# Client responses one exchange may carry: LOGIN's user name and password (PLAIN has
# one). A server role asked to challenge for more is misused (LocalProtocolError).
MAX_SASL_RESPONSES = 2
