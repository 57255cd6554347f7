"""grafana/: the alert rules pass promtool, and the dashboard and rules use only real metrics.

promtool (Debian package ``prometheus``, installed by scripts/test) is required: a
missing promtool fails these tests rather than skipping them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from popproxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "popproxy.json"
ALERTS = GRAFANA / "alerts.yaml"
ALERTS_TEST = GRAFANA / "alerts_test.yaml"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
JOB_FILTER = 'job=~"$job"'
INSTANCE_FILTER = 'instance=~"$instance"'
SEVERITIES = {"warning", "critical"}
PROMTOOL_TIMEOUT_SECONDS = 120

# PromQL string literals (label values), which may contain anything.
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_POPPROXY_NAME_RE = re.compile(r"\bpopproxy_[A-Za-z0-9_:]*")
# A popproxy_* selector with its label matchers, if any.
_SELECTOR_RE = re.compile(r"\b(popproxy_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
# Sample names each metric type exposes, from the family name prometheus_client reports
# (no _created: popproxy turns those series off, docs/metrics.md).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, (
        "promtool is missing: install Debian's prometheus package (scripts/test does)"
    )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(board) if p["type"] != "row"]


def panel_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in graph_panels(board) for t in p["targets"]]


def variable_queries(board: dict[str, Any]) -> list[str]:
    """The queries of the query variables (Grafana's label_values(...) syntax)."""
    queries = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return panel_exprs(board) + variable_queries(board)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules()]


def names_in(expr: str) -> set[str]:
    """The popproxy_* metric names an expression uses (label values are skipped)."""
    return set(_POPPROXY_NAME_RE.findall(_STRING_RE.sub('""', expr)))


def declared_sample_names() -> set[str]:
    """Every sample name a fresh Metrics registry can expose, by metric type."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


# -- alert rules -------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    done = run_promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules() -> None:
    done = run_promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        assert rule["alert"].startswith("Popproxy"), rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in load_yaml(ALERTS_TEST)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"


def test_the_required_alerts_exist() -> None:
    names = " ".join(rule["alert"] for rule in alert_rules())
    for needle in (
        "UpstreamDown",
        "UpstreamLoginsFailing",
        "AuthFailureSpike",
        "SessionsNearLimit",
        "PolicyDeletionsStalled",
        "ExporterDown",
        "ConnectionsRejected",
    ):
        assert needle in names


# -- names used exist -------------------------------------------------------------------------


def test_names_used_exist() -> None:
    """Each popproxy_* name in the dashboard and alert rules is declared (DESIGN.md, Metrics)."""
    declared = declared_sample_names()
    used = {
        name: source
        for source, exprs in (
            ("dashboard", dashboard_exprs(dashboard())),
            ("alerts", alert_exprs()),
        )
        for expr in exprs
        for name in names_in(expr)
    }
    assert len(used) >= 15, sorted(used)
    unknown = {name: source for name, source in used.items() if name not in declared}
    assert unknown == {}


def test_names_used_check_is_not_vacuous() -> None:
    declared = declared_sample_names()
    assert "popproxy_sessions_started_total" in declared
    assert "popproxy_upstream_login_duration_seconds_bucket" in declared
    assert "popproxy_sessions_started" not in declared  # a counter needs its _total
    assert "popproxy_sessions_active_total" not in declared
    assert "popproxy_sessions_started_created" not in declared  # no _created series
    assert names_in('rate(popproxy_x_total{job="popproxy_y"}[5m]) / popproxy_z') == {
        "popproxy_x_total",
        "popproxy_z",
    }


# -- dashboard shape --------------------------------------------------------------------------


def test_dashboard_variables() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE_REF
        assert variables[name]["includeAll"] is True
        assert variables[name]["allValue"] == ".*"  # so job=~"$job" matches every job


def test_every_panel_has_a_unit_and_the_datasource_variable() -> None:
    board = dashboard()
    graphs = graph_panels(board)
    assert len(graphs) >= 15
    for panel in graphs:
        title = panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["datasource"] == DATASOURCE_REF, f"{title}: datasource"
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, f"{title}: target datasource"


def test_every_selector_filters_on_job_and_instance() -> None:
    for expr in panel_exprs(dashboard()):
        selectors = _SELECTOR_RE.findall(expr)
        assert selectors, expr
        for name, matchers in selectors:
            assert JOB_FILTER in matchers, f"{name} in {expr}"
            assert INSTANCE_FILTER in matchers, f"{name} in {expr}"


def test_dashboard_covers_the_required_topics() -> None:
    exprs = " ".join(dashboard_exprs(dashboard()))
    for needle in (
        "popproxy_sessions_started_total",
        "popproxy_client_sent_bytes_total",
        "popproxy_commands_total",
        "popproxy_logins_total",
        "popproxy_upstream_errors_total",
        "popproxy_upstream_logins_total",
        "histogram_quantile(0.5, sum by (upstream, le) (rate(popproxy_upstream_connect",
        "histogram_quantile(0.99, sum by (upstream, le) (rate(popproxy_upstream_login",
        "popproxy_policy_actions_total",
        'result!~"quit|eof"',
        "popproxy_sessions_limit",
        "sum by (listener, reason) (rate(popproxy_connections_rejected_total",
        "sum by (upstream, result) (rate(popproxy_oauth2_token_refreshes_total",
        "max by (upstream) (popproxy_oauth2_token_age_seconds",
        "max by (upstream, result) (popproxy_oauth2_accounts_failing",
    ):
        assert needle in exprs, needle


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels(dashboard())]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, with Grafana's variables given typical values."""
    substitutions = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, expr in enumerate(panel_exprs(dashboard())):
        promql = expr
        for variable, example in substitutions.items():
            promql = promql.replace(variable, example)
        assert "$" not in promql, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": promql})
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# -- provisioning -----------------------------------------------------------------------------


def test_provisioning_files() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "popproxy.yaml")
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"]
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]


@pytest.mark.parametrize("path", sorted(GRAFANA.rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_files_parse(path: Path) -> None:
    assert load_yaml(path)
