"""``popproxy check-config`` (popproxy/commands/check_config.py), through ``cli.main`` and
as a process: the summary, every error, the effective policy of each user, ``--against``."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from test_cli import HASH, REPO, in_tmp, run_popproxy, serving_config

from popproxy import cli
from popproxy.commands import check_config

__all__ = ["in_tmp"]  # a fixture, used by name


def test_check_config_on_the_example(tmp_path: Path) -> None:
    """From a copy of the checkout's layout, with the var/ its state asks for (the
    checkout's own var/ exists only once the demo has run)."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "var").mkdir()
    proc = run_popproxy("check-config", "-c", "examples/popproxy.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert out.startswith("examples/popproxy.yaml: ok\n")
    assert "127.0.0.1:1110 tls=none" in out
    assert f"demo: maildir {tmp_path / 'examples/maildir/demo'}" in out
    assert "allow_plaintext_auth: true" in out
    assert f"state: sqlite:///{tmp_path}/var/popproxy-state.db" in out
    assert "idle_timeout_seconds=600" in out


def test_check_config_prints_every_error_and_exits_2(in_tmp: Path) -> None:
    """issue 2: check-config on a broken config prints every error with file and key path."""
    Path("broken.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 127.0.0.1, port: 22:22, tls: starttls}}
        allow_plaintext_auth: on
        upstreams:
          prov: {{host: pop.example.net}}
        users:
          alice:
            password_hash: "not-a-hash"
            upstream: provider
            upstream_password: hunter2
          demo:
            password_hash: "{HASH}"
            maildir: m
            maildir: n
        limits: {{idle_timout_seconds: 5}}
        """)
    )
    proc = run_popproxy("check-config", "-c", "broken.yaml", cwd=in_tmp)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    expected_paths = [
        "users.demo.maildir",  # duplicate key
        "listen[0].port",
        "listen[0].tls",
        "allow_plaintext_auth",
        "users.alice.upstream_password",
        "users.alice.password_hash",
        "users.alice.upstream",
        "users.alice.upstream_password_file",
        "limits.idle_timout_seconds",
    ]
    assert [line.split(": ")[1] for line in lines[:-1]] == expected_paths
    for line in lines[:-1]:
        assert line.startswith("broken.yaml: ")
    assert lines[-1] == f"broken.yaml: {len(expected_paths)} problem(s) found"
    assert "users.alice.password_hash: expected a PHC hash string" in proc.stderr
    assert "did you mean 'idle_timeout_seconds'?" in proc.stderr
    assert "write true or false" in proc.stderr
    assert "hunter2" not in proc.stderr


def test_check_config_missing_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-c", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nope.yaml: (file): cannot read the config file")


def test_check_config_summary_lists_upstreams_and_tls(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("c.pem").write_text("x")
    Path("k.pem").write_text("x")
    monkeypatch.setenv("PW", "secret-value")
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: "::1", port: 995, tls: implicit}}
        tls: {{cert_file: c.pem, key_file: k.pem}}
        upstreams:
          prov: {{host: pop.example.net, verify: false}}
        users:
          alice: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "[::1]:995 tls=implicit" in out
    assert f"tls: cert_file={in_tmp / 'c.pem'}" in out
    assert "prov: pop.example.net:995 tls=implicit verify=false" in out
    assert "alice: upstream prov as alice" in out
    assert "secret-value" not in out


def rules_config(rules: dict[str, str]) -> None:
    """cfg.yaml with two users on one upstream and a Maildir user, and rules/ as given."""
    Path("rules").mkdir()
    for name, text in rules.items():
        Path("rules", name).write_text(textwrap.dedent(text))
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams: {{prov: {{host: pop.example.net}}}}
        users:
          alice: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
          scanner: {{password_hash: "{HASH}", upstream: prov, upstream_password_env: PW}}
          demo: {{password_hash: "{HASH}", maildir: m}}
        rules_dir: rules
        """)
    )


def test_check_config_prints_the_effective_policy_of_each_user(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    rules_config(
        {
            "10-scanner.yaml": """\
            rules:
              - {name: scanner-keep, match: {users: [scanner]}, action: keep, expire_after_days: 30}
            """,
            "50-all.yaml": """\
            rules:
              - {name: no-big, max_size_bytes: 5000000, continue: true}
              - name: spam
                match: {headers: {X-Spam-Flag: "^YES$"}}
                action: hide
                expire_after_days: 7
            """,
        }
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    policy = out[out.index("rules: 3 in 2 file(s)") : out.index("limits:")]
    assert policy == textwrap.dedent("""\
        rules: 3 in 2 file(s)
          10-scanner.yaml: scanner-keep
          50-all.yaml: no-big, spam
        policy: EXPIRE before login: 7 USER
          alice (upstream prov):
            rules, in order:
              no-big (50-all.yaml): every message -> max_size_bytes=5000000 continue
              spam (50-all.yaml): x-spam-flag=/^YES$/ -> action=hide expire_after_days=7
            DELE: deletes upstream [default]
            RETR without DELE: left upstream [default]
            expiry: never [default]; after 7 days [spam]
            not shown: hide [spam]; over 5000000 bytes [no-big]
            headers read at login (TOP n 0): yes
            EXPIRE 7
          scanner (upstream prov):
            rules, in order:
              scanner-keep (10-scanner.yaml): users=scanner -> action=keep expire_after_days=30
            DELE: hides it for this user [scanner-keep]
            RETR without DELE: left upstream [scanner-keep]
            expiry: after 30 days [scanner-keep]
            not shown: none
            headers read at login (TOP n 0): no
            EXPIRE 30
          demo: maildir, no rules; DELE deletes; EXPIRE NEVER
        """)
    assert "secret-value" not in out


def test_check_config_without_rules_says_so(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("cfg.yaml").write_text(
        f"listen: [{{address: 127.0.0.1, port: 0, tls: none}}]\n"
        f'users: {{demo: {{password_hash: "{HASH}", maildir: m}}}}\n'
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "rules: 0 in 0 file(s)\npolicy: EXPIRE before login: NEVER\n" in out


def test_a_bad_rule_fails_check_config_and_run_with_exit_2(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    rules_config({"10-x.yaml": "rules:\n  - {name: x, action: kep}\n"})
    expected = (
        "rules/10-x.yaml: rules[0] (x).action: expected one of keep, delete,"
        " delete_after_retrieve, hide, got the string 'kep'; did you mean 'keep'?\n"
        "cfg.yaml: 1 problem(s) found\n"
    )
    check = run_popproxy("check-config", "-c", "cfg.yaml", cwd=in_tmp)
    assert (check.returncode, check.stdout, check.stderr) == (2, "", expected)
    # The server does not start with part of the rules: nothing is logged, it exits 2.
    run = run_popproxy("run", "-c", "cfg.yaml", cwd=in_tmp)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", expected)


def test_check_config_summary_shows_proxy_protocol_listeners(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen:
          - {{address: 10.0.0.5, port: 1110, tls: none, proxy_protocol: true}}
          - {{address: 127.0.0.1, port: 1111, tls: none}}
        trusted_proxies: [10.0.0.2, 10.1.0.0/16]
        users:
          demo: {{password_hash: "{HASH}", maildir: m}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.5:1110 tls=none proxy_protocol=true\n" in out
    assert "127.0.0.1:1111 tls=none\n" in out
    assert "trusted_proxies: 10.0.0.2/32 10.1.0.0/16\n" in out
    assert "max_sessions_per_ip=50" in out


def _two_configs(directory: Path) -> None:
    """serve.yaml, and new.yaml with a user added, a new port and a lower session limit."""
    old = serving_config(directory)
    (directory / "mail" / "bob").mkdir()
    new = directory / "new.yaml"
    new.write_text(
        old.read_text()
        .replace("port: 0", "port: 1110")
        .replace("users:\n", f"users:\n  bob: {{password_hash: '{HASH}', maildir: mail/bob}}\n")
        + "limits: {max_sessions: 5}\n"
    )


def test_check_config_against_the_running_file(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_configs(in_tmp)
    assert cli.main(["check-config", "-c", "new.yaml"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["check-config", "-c", "new.yaml", "--against", "serve.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain)  # the usual summary first, unchanged
    assert out[len(plain) :] == textwrap.dedent("""\
        against serve.yaml:
          applied by a reload (SIGHUP):
            users.bob (added)
            limits.max_sessions
          restart required (a reload logs these and leaves them as they run):
            listen[0].port
        restart required: yes
        """)


def test_check_config_against_the_same_file_has_no_changes(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serving_config(in_tmp)
    assert cli.main(["check-config", "-c", "serve.yaml", "--against", "serve.yaml"]) == 0
    assert capsys.readouterr().out.endswith("\nagainst serve.yaml: no changes\n")


def test_check_config_against_a_broken_file_exits_2(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serving_config(in_tmp)
    Path("old.yaml").write_text("listen: []\n")
    assert cli.main(["check-config", "-c", "serve.yaml", "--against", "old.yaml"]) == 2
    assert "old.yaml: listen: expected a list of listeners" in capsys.readouterr().err


def test_check_config_against_only_reloadable_changes_needs_no_restart() -> None:
    from popproxy.reload import ConfigChanges, NamedChanges

    changes = ConfigChanges(
        reloadable=("users.carol", "tls.cert_file"),
        users=NamedChanges(removed=("carol",)),
    )
    assert check_config.describe_changes(changes, "old.yaml").splitlines() == [
        "against old.yaml:",
        "  applied by a reload (SIGHUP):",
        "    users.carol (removed)",
        "    tls.cert_file",
        "restart required: no",
    ]


def test_check_config_prints_gateway_sources_and_what_the_rules_do_to_them(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PW", "secret-value")
    (in_tmp / "rules").mkdir()
    (in_tmp / "rules" / "10-keep.yaml").write_text(
        "rules:\n  - {name: keep-gmail, match: {upstreams: [gmail]}, action: keep,"
        " expire_after_days: 30}\n"
    )
    (in_tmp / "cfg.yaml").write_text(
        textwrap.dedent(f"""\
        listen: [{{address: 127.0.0.1, port: 0, tls: none}}]
        upstreams:
          prov: {{host: pop.example.net}}
          gmail: {{host: pop.gmail.com}}
        users:
          carol:
            password_hash: "{HASH}"
            maildir: mail/carol
            fetch:
              - {{upstream: prov, upstream_user: carol@example.net, upstream_password_env: PW}}
              - {{upstream: gmail, upstream_user: carol@gmail.com, upstream_password_env: PW}}
        rules_dir: rules
        gateway: {{interval_seconds: 120}}
        """)
    )
    assert cli.main(["check-config", "-c", "cfg.yaml"]) == 0
    out = capsys.readouterr().out
    assert "    fetch: prov/carol@example.net\n    fetch: gmail/carol@gmail.com\n" in out
    assert "gateway: interval_seconds=120 jitter_seconds=30 max_concurrent_polls=4" in out
    expected = [
        "  carol: maildir, no rules; DELE deletes; EXPIRE NEVER",
        "    fetch prov/carol@example.net:",
        "      rules: none",
        "      after the download: deleted upstream at that poll's QUIT [default]",
        "      expiry: never [default]",
        "      left upstream unfetched: none",
        "    fetch gmail/carol@gmail.com:",
        "      rules, in order:",
        "        keep-gmail (10-keep.yaml): upstreams=gmail -> action=keep expire_after_days=30",
        "      after the download: kept upstream [keep-gmail]",
        "      expiry: deleted upstream after 30 days [keep-gmail]",
        "      left upstream unfetched: none",
    ]
    assert "\n".join(expected) + "\n" in out
    assert "secret-value" not in out
