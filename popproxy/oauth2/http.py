"""The HTTP requests of OAuth2: a form POSTed, a JSON object back (RFC 6749 §3.2, §5).

Blocking, standard library only (``urllib.request``): callers run it in a worker
thread (``popproxy.oauth2.endpoint``) or from the command line (``oauth-login``).
docs/dependencies.md says why no HTTP client library: one POST per token lifetime
per account does not need one.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

# A token endpoint's answer is a small JSON object (RFC 6749 §5.1: a few hundred octets;
# Microsoft's with an id_token a few KiB). Reading stops here.
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An endpoint's HTTP status and its JSON object (empty if the body was not one)."""

    status: int
    body: Mapping[str, object]


class HttpUnavailable(Exception):
    """No answer: the endpoint could not be reached, timed out or broke HTTP or TLS.
    The message is a short reason, safe to log (no URL query, no secret)."""


def post_form(
    url: str,
    fields: Mapping[str, str],
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> HttpAnswer:
    """POST ``fields`` as ``application/x-www-form-urlencoded`` to ``url`` (RFC 6749 §4.1.3,
    §6) and return the status and the JSON object answered, within ``timeout`` seconds per
    socket operation. Raises ``HttpUnavailable`` when there is no HTTP answer."""
    data = urllib.parse.urlencode(fields).encode("ascii")
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "popproxy",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status = response.status
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            raw = exc.read(MAX_RESPONSE_BYTES + 1)
        except OSError:
            raw = b""
        finally:
            exc.close()
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise HttpUnavailable(
            str(getattr(reason, "strerror", None) or reason or type(exc).__name__)
        ) from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a bad status line
        raise HttpUnavailable(getattr(exc, "strerror", None) or type(exc).__name__) from None
    return HttpAnswer(status, _json_object(raw))


def _json_object(raw: bytes) -> Mapping[str, object]:
    if len(raw) > MAX_RESPONSE_BYTES:
        return {}
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
