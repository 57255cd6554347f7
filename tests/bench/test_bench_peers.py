"""bench/peers.py: whether nginx's mail module is there, from what `nginx -V` says."""

from __future__ import annotations

from pathlib import Path

from bench.peers import NGINX_INSTALL, nginx_build

DEBIAN = (
    "nginx version: nginx/1.22.1\n"
    "built with OpenSSL 3.0.11\n"
    "configure arguments: --with-cc-opt='-g -O2' --prefix=/usr/share/nginx"
    " --modules-path=/usr/lib/nginx/modules --with-mail=dynamic --with-mail_ssl_module"
    " --with-stream=dynamic\n"
)


def test_debian_nginx_with_libnginx_mod_mail_loads_the_module() -> None:
    found = nginx_build("/usr/sbin/nginx", DEBIAN, lambda path: True)
    assert found.command == "/usr/sbin/nginx"
    assert found.note == "nginx/1.22.1"
    assert found.load_module == Path("/usr/lib/nginx/modules/ngx_mail_module.so")
    assert found.tls


def test_debian_nginx_without_libnginx_mod_mail_is_skipped_saying_what_to_install() -> None:
    seen: list[Path] = []

    def missing(path: Path) -> bool:
        seen.append(path)
        return False

    found = nginx_build("/usr/sbin/nginx", DEBIAN, missing)
    assert found.command is None
    assert found.note == f"nginx/1.22.1 has no mail module ({NGINX_INSTALL})"
    assert seen == [Path("/usr/lib/nginx/modules/ngx_mail_module.so")]


def test_a_static_mail_module_needs_no_load_module_and_may_lack_tls() -> None:
    built = "nginx version: nginx/1.25.0\nconfigure arguments: --with-mail\n"
    found = nginx_build("/opt/nginx", built, lambda path: False)
    assert (found.command, found.load_module, found.tls) == ("/opt/nginx", None, False)


def test_nginx_without_mail_is_skipped() -> None:
    built = "nginx version: nginx/1.22.1\nconfigure arguments: --with-http_ssl_module\n"
    found = nginx_build("/usr/sbin/nginx", built, lambda path: True)
    assert found.command is None
    assert found.note == "nginx/1.22.1 was built without its mail module"
