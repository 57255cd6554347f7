"""Config loading: the contract's keys, strict YAML, and every error with file and key path."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
import textwrap
from pathlib import Path

import pytest

from popproxy.auth.passwords import hash_password
from popproxy.config import (
    MAX_UPSTREAM_NAME_CHARS,
    Config,
    ConfigError,
    ConfigIssue,
    LimitsConfig,
    ListenerConfig,
    StateConfig,
    TlsMode,
    UpstreamLogin,
    load_config,
)
from popproxy.metrics import MAX_NAME_CHARS
from popproxy.pop3.limits import (
    COMMAND_LINE_CEILING_OCTETS,
    MAX_COMMAND_LINE_OCTETS,
    MAX_REPLY_LINE_OCTETS,
    MAX_SASL_LINE_OCTETS,
    MAX_SASL_PAYLOAD_OCTETS,
    REPLY_LINE_CEILING_OCTETS,
    SASL_LINE_CEILING_OCTETS,
    SASL_PAYLOAD_CEILING_OCTETS,
    SASL_PAYLOAD_FLOOR_OCTETS,
)
from popproxy.pop3.names import login_name_problem
from popproxy.secret import Secret

REPO = Path(__file__).resolve().parent.parent
HASH = hash_password(Secret.from_str("pw"), ln=4)

MINIMAL = f"""\
listen:
  - {{address: 127.0.0.1, port: 0, tls: none}}
users:
  demo:
    password_hash: "{HASH}"
    maildir: mail/demo
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def write(text: str, name: str = "popproxy.yaml") -> Path:
    path = Path(name)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def issues_of(text: str) -> list[tuple[str, str]]:
    path = write(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for issue in info.value.issues:
        assert issue.file == str(path)
    return [(issue.key_path, issue.message) for issue in info.value.issues]


def only_issue(text: str) -> tuple[str, str]:
    found = issues_of(text)
    assert len(found) == 1, found
    return found[0]


def with_user(user_yaml: str, extra: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(user_yaml), "    ")
    return f"listen:\n  - {{address: 127.0.0.1, port: 0, tls: none}}\n{extra}users:\n  u:\n{body}"


# -- what loads -------------------------------------------------------------------------


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(MINIMAL))
    assert config.source == Path("popproxy.yaml")
    assert config.listen == (ListenerConfig("127.0.0.1", 0, TlsMode.NONE),)
    assert config.listen[0].name == "none"
    assert config.tls is None
    assert config.allow_plaintext_auth is False
    assert dict(config.upstreams) == {}
    assert config.users["demo"].maildir == tmp_path / "mail/demo"
    assert config.users["demo"].upstream is None
    assert config.state == StateConfig(f"sqlite:///{tmp_path}/popproxy-state.db")
    assert config.rules_dir is None
    assert config.metrics is None
    assert config.limits == LimitsConfig()
    assert config.limits.idle_timeout_seconds >= 600  # RFC 1939 §3


def test_design_contract_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of DESIGN.md's "Config (the contract)" is accepted as written there."""
    Path("cert.pem").write_text("cert")
    Path("key.pem").write_text("key")
    Path("rules").mkdir()
    Path("alice.secret").write_bytes(b"s3cret pass\n")
    monkeypatch.setenv("BOB_UPSTREAM_PASSWORD", "bob-pass")
    config = load_config(
        write(f"""\
        listen:
          - {{address: 127.0.0.1, port: 1110, tls: starttls}}   # none | starttls | implicit
          - {{address: 127.0.0.1, port: 1995, tls: implicit}}
        tls: {{cert_file: cert.pem, key_file: key.pem}}
        allow_plaintext_auth: false
        upstreams:
          provider:
            host: pop.example.net
            port: 995
            tls: implicit
            verify: true
            ca_file: null
        users:
          alice:
            password_hash: "{HASH}"
            upstream: provider
            upstream_user: alice@example.net
            upstream_password_file: alice.secret
          bob:
            password_hash: "{HASH}"
            upstream: provider
            upstream_password_env: BOB_UPSTREAM_PASSWORD
          demo:
            password_hash: "{HASH}"
            maildir: ./examples/maildir/demo
        state: {{url: "sqlite:////var/lib/popproxy/state.db"}}
        rules_dir: rules/
        metrics: {{address: 127.0.0.1, port: 9110}}
        limits: {{idle_timeout_seconds: 600, login_timeout_seconds: 60, max_sessions: 1000}}
        """)
    )
    assert [(lst.port, lst.tls, lst.name) for lst in config.listen] == [
        (1110, TlsMode.STARTTLS, "starttls"),
        (1995, TlsMode.IMPLICIT, "implicit"),
    ]
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "cert.pem"
    provider = config.upstreams["provider"]
    assert (provider.host, provider.port, provider.tls, provider.verify, provider.ca_file) == (
        "pop.example.net",
        995,
        TlsMode.IMPLICIT,
        True,
        None,
    )
    alice = config.users["alice"]
    assert alice.upstream == "provider"
    assert alice.upstream_user == "alice@example.net"
    assert alice.upstream_password is not None
    assert alice.upstream_password.reveal() == b"s3cret pass"  # one trailing newline dropped
    bob = config.users["bob"]
    assert bob.upstream_user == "bob"  # defaults to the local name
    assert bob.upstream_password is not None
    assert bob.upstream_password.reveal() == b"bob-pass"
    assert config.users["demo"].maildir == tmp_path / "examples/maildir/demo"
    assert config.state.url == "sqlite:////var/lib/popproxy/state.db"
    assert config.state.sqlite_path == Path("/var/lib/popproxy/state.db")
    assert config.rules_dir == tmp_path / "rules"
    assert config.metrics is not None
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9110)
    assert config.limits.max_sessions == 1000
    # Secrets never show in a repr of the config.
    assert "s3cret" not in repr(config)
    assert "bob-pass" not in repr(config)


def test_example_config_in_the_repository_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = load_config(Path("examples/popproxy.yaml"))
    assert [(lst.address, lst.port, lst.tls) for lst in config.listen] == [
        ("127.0.0.1", 1110, TlsMode.NONE)
    ]
    assert config.allow_plaintext_auth is True
    demo = config.users["demo"]
    assert demo.maildir == REPO / "examples/maildir/demo"
    from popproxy.auth.passwords import verify_password

    assert verify_password(demo.password_hash, Secret.from_str("demo"))
    # The state database lives under the working directory.
    assert config.state.sqlite_path is not None
    assert config.state.sqlite_path.is_relative_to(REPO)


def test_config_is_frozen() -> None:
    config = load_config(write(MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.allow_plaintext_auth = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users["mallory"] = config.users["demo"]  # type: ignore[index]
    assert isinstance(config, Config)


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(MINIMAL, "sub/c.yaml")
    config = load_config(Path("sub/c.yaml"))
    # Not against the config file's directory.
    assert config.users["demo"].maildir == tmp_path / "mail/demo"


def test_port_zero_and_65535_are_allowed() -> None:
    config = load_config(
        write("""\
        listen:
          - {address: 127.0.0.1, port: 0, tls: none}
          - {address: "::1", port: 65535, tls: none}
        """)
    )
    assert [lst.port for lst in config.listen] == [0, 65535]


def test_float_and_int_durations() -> None:
    config = load_config(
        write(
            MINIMAL + "limits: {idle_timeout_seconds: 900, login_timeout_seconds: 1.5e1,"
            " auth_failure_delay_seconds: 0, shutdown_grace_seconds: 0.5}\n"
        )
    )
    assert config.limits.idle_timeout_seconds == 900
    assert config.limits.login_timeout_seconds == 15.0
    assert config.limits.auth_failure_delay_seconds == 0
    assert config.limits.shutdown_grace_seconds == 0.5


def test_yaml_merge_keys_work_and_overrides_are_not_duplicates() -> None:
    config = load_config(
        write(f"""\
        listen:
          - &plain {{address: 127.0.0.1, port: 0, tls: none}}
          - {{<<: *plain, address: "::1"}}
        users:
          demo: {{password_hash: "{HASH}", maildir: m}}
        """)
    )
    assert [lst.address for lst in config.listen] == ["127.0.0.1", "::1"]


# -- YAML 1.1 surprises -----------------------------------------------------------------


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "On", "YES", "y", "n"])
def test_yaml11_booleans_are_an_error_where_a_boolean_is_expected(word: str) -> None:
    key, message = only_issue(MINIMAL + f"allow_plaintext_auth: {word}\n")
    assert key == "allow_plaintext_auth"
    assert "expected true or false" in message
    assert "write true or false" in message


@pytest.mark.parametrize(("word", "value"), [("true", True), ("false", False), ("True", True)])
def test_yaml12_booleans_are_booleans(word: str, value: bool) -> None:
    config = load_config(write(MINIMAL + f"allow_plaintext_auth: {word}\n"))
    assert config.allow_plaintext_auth is value


def test_yaml11_booleans_stay_strings_where_a_string_is_expected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PW", "x")
    config = load_config(
        write(
            with_user(
                "{password_hash: '" + HASH + "', upstream: p, upstream_user: on,"
                " upstream_password_env: PW}",
                extra="upstreams:\n  p: {host: no}\n",
            )
        )
    )
    assert config.users["u"].upstream_user == "on"
    assert config.upstreams["p"].host == "no"


def test_sexagesimal_is_not_a_number() -> None:
    key, message = only_issue("listen:\n  - {address: 127.0.0.1, port: 22:22, tls: none}\n")
    assert key == "listen[0].port"
    assert "expected an integer 0..65535" in message
    assert "'22:22'" in message
    assert "base-60" in message


def test_sexagesimal_stays_a_string_where_a_string_is_expected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PW", "x")
    config = load_config(
        write(
            with_user(
                "{password_hash: '" + HASH + "', upstream: p, upstream_user: 22:22,"
                " upstream_password_env: PW}",
                extra="upstreams:\n  p: {host: pop.example.net}\n",
            )
        )
    )
    assert config.users["u"].upstream_user == "22:22"


def test_sexagesimal_duration_is_an_error() -> None:
    key, message = only_issue(MINIMAL + "limits: {idle_timeout_seconds: 10:00}\n")
    assert key == "limits.idle_timeout_seconds"
    assert "base-60" in message


def test_leading_zero_is_not_octal() -> None:
    key, message = only_issue(MINIMAL + "limits: {max_sessions: 0755}\n")
    assert key == "limits.max_sessions"
    assert "leading zeros" in message


def test_quoted_number_is_not_an_integer() -> None:
    key, message = only_issue('listen:\n  - {address: 127.0.0.1, port: "1110", tls: none}\n')
    assert key == "listen[0].port"
    assert "expected an integer" in message


def test_boolean_is_not_a_port() -> None:
    key, message = only_issue("listen:\n  - {address: 127.0.0.1, port: true, tls: none}\n")
    assert key == "listen[0].port"
    assert "got true" in message


def test_duplicate_keys_are_errors_with_path_and_lines() -> None:
    found = issues_of(MINIMAL + "allow_plaintext_auth: false\nallow_plaintext_auth: true\n")
    assert found == [
        (
            "allow_plaintext_auth",
            "duplicate key (first at line 7, again at line 8); give each key once",
        )
    ]


def test_nested_duplicate_keys_are_errors() -> None:
    found = issues_of(
        MINIMAL.replace("maildir: mail/demo", "maildir: mail/demo\n    maildir: mail/other")
    )
    assert [key for key, _ in found] == ["users.demo.maildir"]


def test_duplicate_user_names_are_errors() -> None:
    found = issues_of(MINIMAL + f"  demo:\n    password_hash: '{HASH}'\n    maildir: x\n")
    assert [key for key, _ in found] == ["users.demo"]


def test_python_tags_are_rejected() -> None:
    key, message = only_issue(MINIMAL + "rules_dir: !!python/object/apply:os.getcwd []\n")
    assert key.startswith("line 7, column")
    assert "not valid YAML" in message


def test_alias_bomb_does_not_blow_up() -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 20):
        prev = f"*a{i - 1}"
        levels.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    found = issues_of(MINIMAL + "bomb:\n" + "".join(f"  {line}\n" for line in levels))
    assert [key for key, _ in found] == ["bomb"]


# -- every error, with its key path -----------------------------------------------------


def test_every_error_is_reported_with_file_and_key_path() -> None:
    found = issues_of("""\
    listen:
      - {address: 127.0.0.1, port: 70000, tls: none, tsl: x}
      - {address: "bad host!", port: 1, tls: sometimes}
    allow_plaintext_auth: on
    upstreams:
      prov: {host: pop.example.net, verify: yes, port: 0}
    users:
      alice:
        password_hash: "nope"
        upstream: provv
        upstream_password: hunter2
    limts: {}
    limits: {idle_timeout_seconds: -1, max_sessions: 0, login_timeout_seconds: 0}
    state: {url: "mysql://x"}
    """)
    keys = [key for key, _ in found]
    assert sorted(keys) == sorted(
        [
            "listen[0].tsl",
            "listen[0].port",
            "listen[1].address",
            "listen[1].tls",
            "allow_plaintext_auth",
            "upstreams.prov.verify",
            "upstreams.prov.port",
            "users.alice.upstream_password",
            "users.alice.password_hash",
            "users.alice.upstream",
            "users.alice.upstream_password_file",
            "limts",
            "limits.idle_timeout_seconds",
            "limits.max_sessions",
            "limits.login_timeout_seconds",
            "state.url",
        ]
    )
    messages = dict(found)
    assert "did you mean 'tls'?" in messages["listen[0].tsl"]
    assert "did you mean 'limits'?" in messages["limts"]
    assert "did you mean 'prov'?" in messages["users.alice.upstream"]
    assert "never inline" in messages["users.alice.upstream_password"]
    assert messages["users.alice.password_hash"].startswith("expected a PHC hash string")
    assert "hunter2" not in repr(found)


def test_issue_string_is_file_key_path_message() -> None:
    issue = ConfigIssue(
        "examples/x.yaml", "users.alice.password_hash", "expected a PHC hash string"
    )
    assert str(issue) == "examples/x.yaml: users.alice.password_hash: expected a PHC hash string"
    error = ConfigError((issue, issue))
    assert str(error).splitlines() == [str(issue), str(issue)]


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("nope.yaml"))
    (issue,) = info.value.issues
    assert issue.file == "nope.yaml"
    assert "cannot read" in issue.message


def test_syntax_error_names_line_and_column() -> None:
    key, message = only_issue("listen: [\n")
    assert key.startswith("line ")
    assert "not valid YAML" in message


@pytest.mark.parametrize(("text", "expected"), [("", "empty file"), ("- a\n", "a mapping")])
def test_top_level_must_be_a_mapping(text: str, expected: str) -> None:
    key, message = only_issue(text)
    assert key == "(top level)"
    assert expected in message


def test_invalid_utf8() -> None:
    Path("popproxy.yaml").write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(Path("popproxy.yaml"))
    assert "UTF-8" in info.value.issues[0].message


def test_listen_is_required() -> None:
    key, message = only_issue(f"users:\n  demo: {{password_hash: '{HASH}', maildir: m}}\n")
    assert key == "listen"
    assert message.startswith("missing")


def test_duplicate_listener_address() -> None:
    key, message = only_issue("""\
    listen:
      - {address: 127.0.0.1, port: 1110, tls: none}
      - {address: 127.0.0.1, port: 1110, tls: none}
    """)
    assert key == "listen[1].port"
    assert "already used by listen[0]" in message


def test_tls_listener_requires_tls_section() -> None:
    key, message = only_issue("listen:\n  - {address: 127.0.0.1, port: 0, tls: implicit}\n")
    assert key == "listen[0].tls"
    assert "top-level tls section" in message


def test_tls_files_must_exist() -> None:
    found = issues_of("""\
    listen:
      - {address: 127.0.0.1, port: 0, tls: starttls}
    tls: {cert_file: missing.pem, key_file: .}
    """)
    assert [key for key, _ in found] == ["tls.cert_file", "tls.key_file"]
    assert "does not exist" in found[0][1]
    assert "is a directory" in found[1][1]


def test_user_needs_exactly_one_of_maildir_and_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", "x")
    upstreams = "upstreams:\n  p: {host: pop.example.net}\n"
    key, message = only_issue(
        with_user(
            f"{{password_hash: '{HASH}', maildir: m, upstream: p, upstream_password_env: PW}}",
            upstreams,
        )
    )
    assert key == "users.u.upstream"
    assert "not both" in message
    key, message = only_issue(with_user(f"{{password_hash: '{HASH}'}}"))
    assert key == "users.u"
    assert "maildir" in message


def test_upstream_settings_need_an_upstream() -> None:
    key, message = only_issue(
        with_user(f"{{password_hash: '{HASH}', maildir: m, upstream_user: x}}")
    )
    assert key == "users.u.upstream_user"
    assert "only meaningful with upstream" in message


def test_inline_password_is_refused() -> None:
    key, message = only_issue(with_user(f"{{password_hash: '{HASH}', maildir: m, password: x}}"))
    assert key == "users.u.password"
    assert "hash-password" in message


def test_upstream_password_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    upstreams = "upstreams:\n  p: {host: pop.example.net}\n"
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    key, message = only_issue(
        with_user(
            f"{{password_hash: '{HASH}', upstream: p, upstream_password_env: NOT_SET_ANYWHERE}}",
            upstreams,
        )
    )
    assert key == "users.u.upstream_password_env"
    assert "not set" in message
    Path("empty").write_bytes(b"\n")
    key, message = only_issue(
        with_user(
            f"{{password_hash: '{HASH}', upstream: p, upstream_password_file: empty}}", upstreams
        )
    )
    assert key == "users.u.upstream_password_file"
    assert "empty" in message
    monkeypatch.setenv("PW", "x")
    key, message = only_issue(
        with_user(
            f"{{password_hash: '{HASH}', upstream: p, upstream_password_file: empty,"
            " upstream_password_env: PW}",
            upstreams,
        )
    )
    assert "not both" in message


def test_upstream_port_defaults_from_tls_mode() -> None:
    config = load_config(
        write(
            MINIMAL + "upstreams:\n  a: {host: a.example}\n  b: {host: 192.0.2.1, tls: starttls}\n"
        )
    )
    assert (config.upstreams["a"].port, config.upstreams["a"].tls) == (995, TlsMode.IMPLICIT)
    assert (config.upstreams["b"].port, config.upstreams["b"].tls) == (110, TlsMode.STARTTLS)


@pytest.mark.parametrize(
    "bad_hash",
    [
        "plain",
        "$scrypt$ln=15,r=8$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=99,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=15,r=8,p=1$***$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$argon2i$v=19$m=8,t=1,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_password_hash(bad_hash: str) -> None:
    key, message = only_issue(with_user(f"{{password_hash: '{bad_hash}', maildir: m}}"))
    assert key == "users.u.password_hash"
    assert message.startswith("expected a PHC hash string")
    assert bad_hash not in message


def test_argon2id_hash_without_argon2_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "argon2", None)  # makes `import argon2` fail
    phc = "$argon2id$v=19$m=8,t=1,p=1$" + "A" * 22 + "$" + "A" * 43
    key, message = only_issue(with_user(f"{{password_hash: '{phc}', maildir: m}}"))
    assert key == "users.u.password_hash"
    assert "argon2-cffi" in message


@pytest.mark.parametrize("name", ["bad name", "bidi\u202eoverride", "zero\u200bwidth", "c1\x85"])
def test_user_names_outside_the_login_name_set_are_errors(name: str) -> None:
    """The session refuses such names at login (pop3/names.py), so none may be configured."""
    found = issues_of(MINIMAL + f"  {json.dumps(name)}: {{password_hash: '{HASH}', maildir: m}}\n")
    assert found == [(f"users.{name}", login_name_problem(name))]


def test_internationalized_user_names_load() -> None:
    config = load_config(
        write(MINIMAL + f"  jürgen@example.net: {{password_hash: '{HASH}', maildir: m}}\n")
    )
    assert "jürgen@example.net" in config.users


def test_line_and_payload_limits_default_to_the_rfc_values() -> None:
    limits = load_config(write(MINIMAL)).limits
    assert limits.max_command_line_bytes == MAX_COMMAND_LINE_OCTETS == 255  # RFC 2449 §4
    assert limits.max_sasl_line_bytes == MAX_SASL_LINE_OCTETS
    assert limits.max_sasl_payload_bytes == MAX_SASL_PAYLOAD_OCTETS


def test_line_and_payload_limits_are_set_within_their_bounds() -> None:
    config = load_config(
        write(
            MINIMAL + "limits: {max_command_line_bytes: 1024, max_sasl_line_bytes: 2048,"
            " max_sasl_payload_bytes: 1000}\n"
            "upstreams: {p: {host: pop.example.net, max_reply_line_bytes: 4096}}\n"
        )
    )
    assert config.limits.max_command_line_bytes == 1024
    assert config.limits.max_sasl_line_bytes == 2048
    assert config.limits.max_sasl_payload_bytes == 1000
    assert config.upstreams["p"].max_reply_line_bytes == 4096


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        (
            "limits.max_command_line_bytes",
            254,
            f"{MAX_COMMAND_LINE_OCTETS}..{COMMAND_LINE_CEILING_OCTETS}",
        ),
        (
            "limits.max_command_line_bytes",
            COMMAND_LINE_CEILING_OCTETS + 1,
            f"..{COMMAND_LINE_CEILING_OCTETS}",
        ),
        (
            "limits.max_sasl_line_bytes",
            SASL_LINE_CEILING_OCTETS + 1,
            f"..{SASL_LINE_CEILING_OCTETS}",
        ),
        (
            "limits.max_sasl_payload_bytes",
            SASL_PAYLOAD_FLOOR_OCTETS - 1,
            f"{SASL_PAYLOAD_FLOOR_OCTETS}..",
        ),
        (
            "limits.max_sasl_payload_bytes",
            SASL_PAYLOAD_CEILING_OCTETS + 1,
            f"..{SASL_PAYLOAD_CEILING_OCTETS}",
        ),
        (
            "upstreams.p.max_reply_line_bytes",
            511,
            f"{MAX_REPLY_LINE_OCTETS}..{REPLY_LINE_CEILING_OCTETS}",
        ),
        (
            "upstreams.p.max_reply_line_bytes",
            REPLY_LINE_CEILING_OCTETS + 1,
            f"..{REPLY_LINE_CEILING_OCTETS}",
        ),
    ],
)
def test_line_and_payload_limits_out_of_bounds_are_errors(
    key: str, value: int, bounds: str
) -> None:
    section, name = key.rsplit(".", 1)
    if section == "limits":
        text = MINIMAL + f"limits: {{{name}: {value}}}\n"
    else:
        text = MINIMAL + f"upstreams: {{p: {{host: pop.example.net, {name}: {value}}}}}\n"
    found_key, message = only_issue(text)
    assert found_key == key
    assert bounds in message


def test_the_sasl_line_may_not_be_shorter_than_the_command_line() -> None:
    key, message = only_issue(
        MINIMAL + "limits: {max_command_line_bytes: 1024, max_sasl_line_bytes: 512}\n"
    )
    assert key == "limits.max_sasl_line_bytes"
    assert "at least max_command_line_bytes (1024)" in message


def test_state_url(tmp_path: Path) -> None:
    config = load_config(write(MINIMAL + "state: {url: 'sqlite:///var/state.db'}\n"))
    assert config.state.url == f"sqlite:///{tmp_path}/var/state.db"
    assert config.state.sqlite_path == tmp_path / "var/state.db"
    key, _ = only_issue(MINIMAL + "state: {url: 'sqlite:///'}\n")
    assert key == "state.url"


def test_state_options() -> None:
    config = load_config(
        write(MINIMAL + "state: {busy_timeout_seconds: 2.5, integrity_check: true}\n")
    )
    assert (config.state.busy_timeout_seconds, config.state.integrity_check) == (2.5, True)
    assert config.state.url.endswith("/popproxy-state.db")
    default = load_config(write(MINIMAL))
    assert (default.state.busy_timeout_seconds, default.state.integrity_check) == (10, False)


def test_state_audit_retention_days() -> None:
    assert load_config(write(MINIMAL)).state.audit_retention_days == 400
    config = load_config(write(MINIMAL + "state: {audit_retention_days: 30}\n"))
    assert config.state.audit_retention_days == 30


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("{busy_timeout_seconds: 0}", "greater than 0"),
        ("{busy_timeout_seconds: 7200}", "at most 3600"),
        ("{integrity_check: 'yes'}", "true or false"),
        ("{audit_retention_days: 0}", "an integer 1..36500, got 0"),
        ("{audit_retention_days: 36501}", "an integer 1..36500, got 36501"),
        ("{audit_retention_days: 1.5}", "an integer 1..36500"),
        ("{audit_retention_days: true}", "an integer 1..36500"),
        ("{url: 'postgresql://pp:hunter2@db.example.net/pp'}", "must not contain a password"),
        ("{url: 'postgresql://pp@db.example.net/pp?password=hunter2'}", "state.password_file"),
        ("{url: 'postgresql://pp@db.example.net:port/pp'}", "does not parse"),
        ("{url: 'postgresql://pp@db/pp', integrity_check: true}", "sqlite store only"),
        ("{password_env: PW}", "postgresql:// state URL only"),
        ("{lease_seconds: 10}", "postgresql:// state URL only"),
        ("{url: 'postgresql://pp@db/pp', lease_seconds: 2}", "3 to 3600 seconds"),
        ("{url: 'postgresql://pp@db/pp', lease_seconds: 7200}", "3 to 3600 seconds"),
        ("{url: 'postgresql://pp@db/pp', password_env: PW, password_file: pw}", "not both"),
        ("{url: 'postgresql://pp@db/pp', password_env: POPPROXY_NO_SUCH_VAR}", "not set"),
    ],
)
def test_state_option_errors(state: str, expected: str) -> None:
    _, message = only_issue(MINIMAL + f"state: {state}\n")
    assert expected in message
    assert "hunter2" not in message


def test_a_postgres_state_url_with_its_password_from_a_file_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgresql://popproxy@db.example.net:5432/popproxy?sslmode=verify-full"
    Path("pg-password").write_text("from-file\n", encoding="utf-8")
    config = load_config(write(MINIMAL + f"state: {{url: '{url}', password_file: pg-password}}\n"))
    assert config.state.url == url  # as written: libpq reads it, no path to resolve
    assert config.state.sqlite_path is None
    assert config.state.password == Secret.from_str("from-file")
    monkeypatch.setenv("PG_PASSWORD", "from-env")
    config = load_config(write(MINIMAL + f"state: {{url: '{url}', password_env: PG_PASSWORD}}\n"))
    assert config.state.password == Secret.from_str("from-env")
    bare = load_config(write(MINIMAL + "state: {url: 'postgres://popproxy@db/popproxy'}\n"))
    assert bare.state.password is None  # libpq's own ways (~/.pgpass, certificates)
    assert bare.state.lease_seconds == 30
    short = load_config(write(MINIMAL + f"state: {{url: '{url}', lease_seconds: 6}}\n"))
    assert short.state.lease_seconds == 6
    assert "from-env" not in repr(config.state)


def test_reuse_port_is_a_listener_option() -> None:
    text = MINIMAL.replace("tls: none}", "tls: none, reuse_port: true}", 1)
    assert text != MINIMAL
    config = load_config(write(text))
    assert config.listen[0].reuse_port
    assert not load_config(write(MINIMAL)).listen[0].reuse_port


def test_rules_dir_must_be_a_directory() -> None:
    key, message = only_issue(MINIMAL + "rules_dir: nowhere/\n")
    assert key == "rules_dir"
    assert "does not exist" in message


def test_metrics_defaults_when_section_given() -> None:
    config = load_config(write(MINIMAL + "metrics: {}\n"))
    assert config.metrics is not None
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9110)


def test_upstream_login_and_timeouts() -> None:
    config = load_config(
        write(
            MINIMAL + "upstreams:\n"
            "  a: {host: a.example}\n"
            "  b: {host: b.example, login: plain, connect_timeout_seconds: 2,"
            " login_timeout_seconds: 3, command_timeout_seconds: 4.5,"
            " keepalive_interval_seconds: 30}\n"
        )
    )
    a, b = config.upstreams["a"], config.upstreams["b"]
    assert a.login is UpstreamLogin.AUTO
    assert (a.connect_timeout_seconds, a.login_timeout_seconds) == (15, 30)
    assert (a.command_timeout_seconds, a.keepalive_interval_seconds) == (60, 120)
    assert b.login is UpstreamLogin.PLAIN
    assert (b.connect_timeout_seconds, b.login_timeout_seconds) == (2, 3)
    assert (b.command_timeout_seconds, b.keepalive_interval_seconds) == (4.5, 30)


@pytest.mark.parametrize(
    ("setting", "key", "expected"),
    [
        ("login: apop", "login", "expected one of auto, user, plain"),
        ("command_timeout_seconds: 0", "command_timeout_seconds", "greater than 0"),
        ("tls: none, verify: false", "verify", "only meaningful with tls"),
    ],
)
def test_bad_upstream_settings(setting: str, key: str, expected: str) -> None:
    found_key, message = only_issue(MINIMAL + f"upstreams:\n  a: {{host: a.example, {setting}}}\n")
    assert found_key == f"upstreams.a.{key}"
    assert expected in message


@pytest.mark.parametrize("name", ["x" * 129, '"tab\\there"'])
def test_an_upstream_name_must_be_usable_as_a_metrics_label(name: str) -> None:
    key, message = only_issue(MINIMAL + f"upstreams:\n  {name}: {{host: a.example}}\n")
    assert key.startswith("upstreams.")
    assert "printable characters" in message


def test_the_upstream_name_bound_is_the_metrics_label_bound() -> None:
    assert MAX_UPSTREAM_NAME_CHARS == MAX_NAME_CHARS
    text = MINIMAL + f"upstreams:\n  {'x' * MAX_NAME_CHARS}: {{host: a.example}}\n"
    assert list(load_config(write(text)).upstreams) == ["x" * MAX_NAME_CHARS]


@pytest.mark.parametrize(
    ("listen_address", "upstream_host"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "localhost"), ("::1", "127.0.0.1")],
)
def test_upstream_that_is_our_own_listener_is_refused(
    listen_address: str, upstream_host: str
) -> None:
    text = MINIMAL.replace(
        "{address: 127.0.0.1, port: 0, tls: none}",
        f"{{address: '{listen_address}', port: 2110, tls: none}}",
    ) + (f"upstreams:\n  self: {{host: '{upstream_host}', port: 2110, tls: none}}\n")
    key, message = only_issue(text)
    assert key == "upstreams.self.host"
    assert "proxy to itself" in message


def test_upstream_on_another_port_of_this_machine_is_fine() -> None:
    text = MINIMAL.replace("port: 0", "port: 2110") + (
        "upstreams:\n  dovecot: {host: 127.0.0.1, port: 2111, tls: none}\n"
    )
    assert load_config(write(text)).upstreams["dovecot"].port == 2111


# -- PROXY protocol and per-address limits --------------------------------------------


def test_proxy_protocol_listener_and_trusted_proxies_load() -> None:
    config = load_config(
        write(
            with_user(
                "{password_hash: '" + HASH + "', maildir: m}",
                extra=(
                    "  - {address: 127.0.0.1, port: 0, tls: none, proxy_protocol: true}\n"
                    "trusted_proxies: [10.0.0.0/8, 192.0.2.10, '2001:db8::/32']\n"
                    "limits: {max_sessions_per_ip: 7}\n"
                ),
            )
        )
    )
    assert [listener.proxy_protocol for listener in config.listen] == [False, True]
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.10/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert config.limits.max_sessions_per_ip == 7


def test_proxy_protocol_and_per_address_defaults() -> None:
    config = load_config(write(MINIMAL))
    assert config.listen[0].proxy_protocol is False
    assert config.trusted_proxies == ()
    assert config.limits.max_sessions_per_ip == 50


def test_a_proxy_protocol_listener_needs_trusted_proxies() -> None:
    key, message = only_issue(
        "listen:\n  - {address: 127.0.0.1, port: 0, tls: none, proxy_protocol: true}\n"
    )
    assert key == "trusted_proxies"
    assert "listen[0] has proxy_protocol: true" in message
    key, _ = only_issue(
        "listen:\n  - {address: 127.0.0.1, port: 0, tls: none, proxy_protocol: true}\n"
        "trusted_proxies: []\n"
    )
    assert key == "trusted_proxies"


@pytest.mark.parametrize(
    ("value", "key", "expected"),
    [
        ("[10.0.0.1/8]", "trusted_proxies[0]", "host bits set"),
        ("[not-an-address]", "trusted_proxies[0]", "expected an IP address or a CIDR network"),
        ("[10.0.0.0/8, 7]", "trusted_proxies[1]", "got the number 7"),
        ("10.0.0.0/8", "trusted_proxies", "expected a list"),
        ("['fe80::1%eth0']", "trusted_proxies[0]", "expected an IP address"),
    ],
)
def test_bad_trusted_proxies(value: str, key: str, expected: str) -> None:
    found = issues_of(f"{MINIMAL}trusted_proxies: {value}\n")
    assert len(found) == 1, found
    assert found[0][0] == key
    assert expected in found[0][1]


@pytest.mark.parametrize("value", ["yes", "1", "'true'"])
def test_proxy_protocol_is_a_boolean(value: str) -> None:
    key, message = only_issue(
        f"listen:\n  - {{address: 127.0.0.1, port: 0, tls: none, proxy_protocol: {value}}}\n"
        "trusted_proxies: [127.0.0.1]\n"
    )
    assert key == "listen[0].proxy_protocol"
    assert "expected true or false" in message


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "1000001"])
def test_max_sessions_per_ip_bounds(value: str) -> None:
    key, _ = only_issue(f"{MINIMAL}limits: {{max_sessions_per_ip: {value}}}\n")
    assert key == "limits.max_sessions_per_ip"


def test_known_sources_limits() -> None:
    """limits.auth_known_source_days (0 turns it off) and auth_known_sources_per_user."""
    assert (LimitsConfig().auth_known_source_days, LimitsConfig().auth_known_sources_per_user) == (
        30,
        10,
    )
    config = load_config(
        write(MINIMAL + "limits: {auth_known_source_days: 0, auth_known_sources_per_user: 3}\n")
    )
    assert config.limits.auth_known_source_days == 0
    assert config.limits.auth_known_sources_per_user == 3
    key, _ = only_issue(MINIMAL + "limits: {auth_known_source_days: 3651}\n")
    assert key == "limits.auth_known_source_days"
    key, _ = only_issue(MINIMAL + "limits: {auth_known_sources_per_user: 0}\n")
    assert key == "limits.auth_known_sources_per_user"
    key, _ = only_issue(MINIMAL + "limits: {auth_known_sources_per_user: 1001}\n")
    assert key == "limits.auth_known_sources_per_user"
