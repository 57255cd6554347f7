"""popproxy: a POP3 proxy and fetch gateway on Trio."""

__version__ = "0.1.0"
