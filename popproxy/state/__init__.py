"""Persistent state: the ``StateStore`` protocol and its backends (DESIGN.md, state/)."""
