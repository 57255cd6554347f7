"""The sans-IO core, the policy and the pure part of auth/ import no I/O, TLS, YAML,
metrics or database library; the metric definitions import no I/O, TLS or YAML library.

DESIGN.md, Layers: ``pop3/``, ``policy/`` and the pure part of ``auth/`` are pure;
``metrics.py`` declares metrics with no I/O (the exporter lives apart); ``explain.py``
does not reach ``serve.py``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import popproxy

FORBIDDEN = frozenset(
    {"trio", "socket", "ssl", "yaml", "prometheus_client", "sqlite3", "psycopg", "psycopg_pool"}
)
# The one library outside the standard library that policy/ may use, on purpose: RE2
# (google-re2, a C extension with no I/O) matches header patterns in linear time
# (policy/patterns.py, docs/dependencies.md).
POLICY_THIRD_PARTY = frozenset({"re2"})
PACKAGE_ROOT = Path(popproxy.__file__).parent


def package_modules(package: str) -> list[str]:
    """Every module of ``popproxy.<package>``, the package itself included."""
    return sorted(
        f"popproxy.{package}" + ("" if p.stem == "__init__" else "." + p.stem)
        for p in (PACKAGE_ROOT / package).glob("*.py")
    )


POP3_MODULES = package_modules("pop3")
POLICY_MODULES = package_modules("policy")
# Sans-IO modules outside the packages, held to the same rule (the PROXY protocol reader).
PROTOCOL_MODULES = ["popproxy.proxy_protocol", "popproxy.peer"]
# The pure part of auth/: hashes, throttling decisions, the credential cache and the
# SASL PLAIN credentials (authenticator.py, which runs hashes in trio worker threads,
# login.py, which waits out throttle delays, and throttling.py, which reads trio's
# clock and awaits a shared store, are not).
PURE_AUTH_MODULES = [
    "popproxy.auth",
    "popproxy.auth.passwords",
    "popproxy.auth.throttle",
    "popproxy.auth.cache",
    "popproxy.auth.credentials",
]
IMPURE_AUTH_MODULES = [
    "popproxy.auth.authenticator",
    "popproxy.auth.login",
    "popproxy.auth.throttling",
]
PURE_MODULES = POP3_MODULES + POLICY_MODULES + PROTOCOL_MODULES + PURE_AUTH_MODULES
# The metric definitions: prometheus_client is theirs to use, and nothing else on the
# list (the HTTP exporter, which does network I/O, is popproxy.metrics_exporter).
METRICS_MODULE = "popproxy.metrics"
METRICS_FORBIDDEN = FORBIDDEN - {"prometheus_client"}


def module_path(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = PACKAGE_ROOT / relative / "__init__.py"
    return package if package.exists() else PACKAGE_ROOT / relative.with_suffix(".py")


def imported_names(name: str) -> set[str]:
    """Every module ``name`` imports, absolute, including under TYPE_CHECKING."""
    path = module_path(name)
    return names_in(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")


def names_in(source: str, name: str, is_package: bool) -> set[str]:
    """The absolute names of every import in ``source``, the text of module ``name``."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # "from popproxy.pop3 import server" imports a submodule.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def closure(roots: list[str]) -> dict[str, set[str]]:
    """Imports of ``roots`` and of every popproxy module they reach."""
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = imported_names(name)
        todo.extend(
            n for n in seen[name] if n.split(".")[0] == "popproxy" and module_path(n).exists()
        )
    return seen


def test_pure_modules_are_found() -> None:
    assert "popproxy.pop3.server" in POP3_MODULES
    assert "popproxy.pop3.client" in POP3_MODULES
    assert "popproxy.policy" in POLICY_MODULES
    assert "popproxy.policy.decide" in POLICY_MODULES


def forbidden_imports(
    graph: dict[str, set[str]], forbidden: frozenset[str]
) -> set[tuple[str, str]]:
    """The (importer, imported) pairs of ``graph`` whose imported package is ``forbidden``."""
    return {
        (importer, imported)
        for importer, names in graph.items()
        for imported in names
        if imported.split(".")[0] in forbidden
    }


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_library(module: str) -> None:
    assert not forbidden_imports(closure([module]), FORBIDDEN)


def test_metric_definitions_import_no_io_tls_or_yaml_library() -> None:
    graph = closure([METRICS_MODULE])
    assert "popproxy.pop3.commands" in graph  # the walk reaches its popproxy imports
    assert "prometheus_client" in graph[METRICS_MODULE]
    assert not forbidden_imports(graph, METRICS_FORBIDDEN)
    assert not any(name.startswith("popproxy.config") for name in graph)


def test_every_auth_module_is_placed_on_one_side() -> None:
    # A new module of auth/ must be listed as pure (and then tested so) or not.
    assert sorted(PURE_AUTH_MODULES + IMPURE_AUTH_MODULES) == package_modules("auth")


def test_transitive_popproxy_imports_are_followed() -> None:
    graph = closure(["popproxy.pop3.commands"])
    assert "popproxy.secret" in graph
    assert set(graph) <= {"popproxy", "popproxy.secret", *POP3_MODULES}


def test_the_walker_sees_every_form_of_import() -> None:
    source = (
        "import os, socket as s\n"
        "from ssl import SSLContext\n"
        "from . import sibling\n"
        "from ..secret import Secret\n"
        "if False:\n"
        "    import trio.lowlevel\n"
        "def f() -> None:\n"
        "    import yaml\n"
    )
    names = names_in(source, "popproxy.pop3.server", is_package=False)
    assert {n.split(".")[0] for n in names} & FORBIDDEN == {"socket", "ssl", "trio", "yaml"}
    assert "popproxy.pop3.sibling" in names
    assert "popproxy.secret" in names


def test_policy_imports_only_policy_the_standard_library_and_re2() -> None:
    graph = closure(POLICY_MODULES)
    assert set(graph) <= set(POLICY_MODULES)
    outside = {
        imported.split(".")[0]
        for names in graph.values()
        for imported in names
        if imported.split(".")[0] not in ("popproxy", "__future__")
    }
    assert outside - sys.stdlib_module_names == POLICY_THIRD_PARTY


def test_explain_does_not_import_serve() -> None:
    """``popproxy explain`` routes through maildrop/router.py, not through the server."""
    graph = closure(["popproxy.explain"])
    assert "popproxy.maildrop.router" in graph  # the walk reaches the modules it uses
    reached = set(graph) | {name for names in graph.values() for name in names}
    assert not {name for name in reached if name.split(".")[:2] == ["popproxy", "serve"]}


def test_importing_pure_modules_loads_no_io_library_at_run_time() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE_MODULES)
        + f"print(sorted(set(sys.modules) & set({sorted(FORBIDDEN)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
