"""sd_notify: tell systemd (``Type=notify``) when popproxy is ready, reloading or stopping.

The protocol (sd_notify(3)): each message is one datagram of newline-separated
``NAME=value`` assignments, sent to the ``AF_UNIX`` datagram socket named by
``$NOTIFY_SOCKET`` — a file system path, or ``@name`` for the Linux abstract
namespace. Without ``$NOTIFY_SOCKET`` every call does nothing.

A send is one non-blocking ``sendto`` on a fresh socket, so it never holds up the
trio thread; a failure (no such socket, a full queue) is logged once and otherwise
ignored: systemd's view of the service is a convenience, serving mail is the job.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("popproxy.sdnotify")

# A STATUS= text is shown on one line by `systemctl status`; longer text is cut.
MAX_STATUS_CHARS = 200


def socket_address(value: str) -> bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if unsupported.

    ``/path`` is a file system socket and ``@name`` an abstract one (sd_notify(3));
    other forms (``vsock:``, relative paths) are not supported here.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_text(text: str) -> str:
    """``text`` made safe for one ``STATUS=`` assignment: one line, at most MAX_STATUS_CHARS."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_STATUS_CHARS else line[: MAX_STATUS_CHARS - 3] + "..."


class Notifier:
    """Sends sd_notify messages to one socket; ``Notifier(None)`` is a no-op."""

    def __init__(self, notify_socket: str | None) -> None:
        self._address: bytes | None = None
        self._failed = False
        if notify_socket:
            self._address = socket_address(notify_socket)
            if self._address is None:
                self._fail(f"unsupported NOTIFY_SOCKET address {notify_socket!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` in ``environ`` (disabled when unset or empty)."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether messages are sent at all."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments in one datagram; False if not sent."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up or a reload is finished."""
        return self.send("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``: a config reload has started."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: a graceful shutdown has started."""
        return self.send("STOPPING=1", *self._status(status))

    def status(self, status: str) -> bool:
        """``STATUS=``: a one-line state for ``systemctl status``."""
        return self.send(*self._status(status))

    @staticmethod
    def _status(status: str | None) -> tuple[str, ...]:
        return () if status is None else (f"STATUS={status_text(status)}",)

    def _fail(self, reason: str) -> None:
        if not self._failed:
            self._failed = True
            log.warning("sd_notify_failed", extra={"fields": {"reason": reason}})
