"""The config file's own field checks: TLS modes, paths, host names.

The generic getters (strings, integers, seconds, booleans, choices, unknown keys)
are shared with the rule files, in ``popproxy/policy/fields.py``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from popproxy.config.model import TlsMode
from popproxy.policy.fields import Section, as_mapping, describe

# RFC 1035 §2.3.4: a host name is at most 253 characters in text form.
MAX_HOST_CHARS = 253


class ConfigSection(Section):
    """A mapping in the config file, with the getters only the config needs."""

    def named_sections(self, key: str) -> Iterator[tuple[str, object]]:
        """The entries of the mapping ``key`` (``upstreams``, ``users``): name and raw value."""
        value = self.raw(key)
        if value is None:
            return
        mapping = as_mapping(self.issues, key, value)
        if mapping is None:
            return
        yield from mapping.items()

    def tls_mode(self, key: str, *, required: bool = False) -> TlsMode | None:
        """One of the :class:`TlsMode` values."""
        what = "one of none, starttls, implicit"
        value = self.data.get(key)
        if value is None:
            if required:
                self.missing(key, what)
            return None
        if isinstance(value, bool):
            self.error(key, f"expected {what}, got {describe(value)}")
            return None
        try:
            return TlsMode(value)
        except ValueError:
            self.error(key, f"expected {what}, got {describe(value)}")
            return None

    def path_value(
        self, key: str, *, kind: Literal["file", "dir"] | None, required: bool = False
    ) -> Path | None:
        """A path, made absolute against the working directory; ``kind`` must exist."""
        what = {"file": "the path of a file", "dir": "the path of a directory", None: "a path"}[
            kind
        ]
        text = self.string(key, required=required, what=what)
        if text is None:
            return None
        if "\x00" in text:
            self.error(key, f"expected {what}, got a string with a NUL character")
            return None
        path = Path.cwd() / text
        if kind == "file" and not path.is_file():
            self.error(key, f"expected {what}; {_path_state(path)}")
            return None
        if kind == "dir" and not path.is_dir():
            self.error(key, f"expected {what}; {_path_state(path)}")
            return None
        return path

    def host(self, key: str, *, required: bool = False) -> str | None:
        """A host name (RFC 1035 labels) or an IP address."""
        what = "a host name or IP address"
        text = self.string(key, required=required, what=what)
        if text is None:
            return None
        if not _valid_host(text):
            self.error(key, f"expected {what}, got {describe(text)}")
            return None
        return text


def _path_state(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return f"{path} is a directory"
    return f"{path} is not a regular file"


_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _valid_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    if len(text) > MAX_HOST_CHARS:
        return False
    labels = text.removesuffix(".").split(".")
    return all(_HOST_LABEL_RE.fullmatch(label) for label in labels)
