"""TLS contexts loaded in worker threads; a file that cannot be loaded is a TlsError."""

from __future__ import annotations

from pathlib import Path

import pytest

from popproxy.config import Config, LimitsConfig, StateConfig, TlsConfig, TlsMode, UpstreamConfig
from popproxy.tls import TlsError, load_server_tls, upstream_tls_contexts


def config(upstreams: dict[str, UpstreamConfig]) -> Config:
    return Config(
        source=Path("test.yaml"),
        listen=(),
        tls=None,
        allow_plaintext_auth=True,
        upstreams=upstreams,
        users={},
        state=StateConfig(),
        rules_dir=None,
        metrics=None,
        limits=LimitsConfig(),
    )


async def test_no_tls_section_no_server_context() -> None:
    assert await load_server_tls(None) is None


async def test_a_missing_certificate_is_a_tls_error(tmp_path: Path) -> None:
    missing = TlsConfig(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(TlsError, match=r"^cannot load the TLS certificate or key: "):
        await load_server_tls(missing)


async def test_one_client_context_per_upstream_that_uses_tls(tmp_path: Path) -> None:
    plain = UpstreamConfig("plain", "pop.example.net", 110, TlsMode.NONE)
    implicit = UpstreamConfig("implicit", "pop.example.net", 995, TlsMode.IMPLICIT)
    contexts = await upstream_tls_contexts(config({"plain": plain, "implicit": implicit}))
    assert set(contexts) == {"implicit"}
    bad = UpstreamConfig(
        "bad", "pop.example.net", 995, TlsMode.IMPLICIT, ca_file=tmp_path / "no.pem"
    )
    with pytest.raises(TlsError, match=r"^cannot load the CA file of upstream bad: "):
        await upstream_tls_contexts(config({"bad": bad}))
