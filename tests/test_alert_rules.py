"""conf/prometheus/ and conf/grafana/: rules Prometheus accepts, each alert fired by a unit test, and
every metric they and the dashboard name is one the sidecar or its proxy exports.

`promtool` (Debian package prometheus; scripts/system-deps.sh installs it)
checks the rules and runs their unit tests (tiled-writer-sidecar.rules.test.yml).
The exported names come from scraping the real collectors: a `SidecarCollector`
over a spool whose uploader lock this process holds (so the uploader's process
metrics are exported too) and the proxy's `ProxyCollector`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from tiled_writer_sidecar.daemon.metrics import SidecarCollector
from tiled_writer_sidecar.receive.counters import ReceiverStats
from tiled_writer_sidecar.spool.directory import SpoolDir
from tiled_writer_sidecar.tools.proxy.main import ProxyCollector, ProxyStats

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "conf/prometheus/tiled-writer-sidecar.rules.yml"
RULE_TESTS = REPO / "conf/prometheus/tiled-writer-sidecar.rules.test.yml"
DASHBOARD = REPO / "conf/grafana/tiled-writer-sidecar.json"
#: Metric names in PromQL: the project's and process_* (the proxy's ProcessCollector), and `up`.
METRIC = re.compile(r"\b(tiled_writer_sidecar_[a-z0-9_]+|process_[a-z_]+|up)\b(?!\s*\()")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    return path


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name /metrics of the sidecar and of the proxy shows, plus Prometheus' `up`."""
    spool = SpoolDir(tmp_path_factory.mktemp("spool"))
    spool.lock("uploader")  # this process plays the uploader: its process metrics are exported
    try:
        registry = CollectorRegistry()
        registry.register(SidecarCollector(ReceiverStats(), spool))
        registry.register(ProxyCollector(ProxyStats(max_buffer_bytes=1)))
        ProcessCollector(registry=registry)  # what the proxy's start_metrics registers
        text = generate_latest(registry).decode()
    finally:
        spool.unlock()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    return names | {"up"}


def named_metrics(expr: str, exported: set[str]) -> set[str]:
    """The metric names `expr` refers to (a `__name__=~` regex: the exported names it matches)."""
    names = set(METRIC.findall(NAME_REGEX.sub("", expr)))
    for pattern in NAME_REGEX.findall(expr):
        matched = {name for name in exported if re.fullmatch(pattern, name)}
        assert matched, f"{pattern} matches no exported metric"
        names |= matched
    return names


@pytest.mark.process
def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.process
def test_promtool_unit_tests_pass(promtool: str) -> None:
    """Each alert fires on its failure's series (and none on a healthy sidecar): promtool test rules."""
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_fired_by_a_unit_test() -> None:
    """An alert no test expects to fire could be dead: each one has a case with exp_alerts."""
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in rules()}


def test_alerts_name_only_exported_metrics(exported: set[str]) -> None:
    for rule in rules():
        names = named_metrics(rule["expr"], exported)
        assert names and names <= exported, (rule["alert"], names - exported)


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_docs_alert_table_names_every_alert() -> None:
    """docs/operations.md's table and the rules file list the same alerts."""
    table = (REPO / "docs/operations.md").read_text()
    missing = [rule["alert"] for rule in rules() if rule["alert"] not in table]
    assert missing == []


# ------------------------------------------------------------------------------ dashboard


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    """The fields Grafana's dashboard schema requires: title, uid, schemaVersion, panels each with a
    unique id, a type, a grid position inside 24 columns, and Prometheus targets with refIds."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["type"] in ("row", "stat", "timeseries"), panel["title"]
    for panel in dashboard_panels():
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables


def test_every_dashboard_expression_names_exported_metrics(exported: set[str]) -> None:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            names = named_metrics(target["expr"], exported)
            assert names and names <= exported, (panel["title"], names - exported)


def test_the_dashboard_shows_every_alerted_metric(exported: set[str]) -> None:
    """What an alert fires on can be looked at on the dashboard (process_* and up aside)."""
    shown = {n for p in dashboard_panels() for t in p["targets"] for n in named_metrics(t["expr"], exported)}
    alerted = {n for rule in rules() for n in named_metrics(rule["expr"], exported)}
    assert {n for n in alerted if n.startswith("tiled_writer_sidecar_")} - shown == set()
