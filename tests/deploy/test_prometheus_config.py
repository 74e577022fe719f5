"""docker/prometheus and docker/grafana: promtool accepts the config and the rules, the alert unit
tests pass, and every query of the Grafana dashboard is valid PromQL over metrics the service exports."""
import json
import re
import subprocess
from pathlib import Path

import yaml

from service.metrics import ServiceMetrics
from tests.deploy.promtools import require

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "rtmdet.json"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_checks_config_and_rules():
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout
    out = promtool("check", "rules", "alerts.rules.yml")
    assert out.returncode == 0 and "SUCCESS: 6 rules found" in out.stdout, out.stdout + out.stderr


def test_alert_unit_tests_pass():
    out = promtool("test", "rules", "alerts.rules.test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    rules = (PROM / "alerts.rules.yml").read_text().replace("> 0.5", "> > 0.5")
    (tmp_path / "bad.yml").write_text(rules)
    assert promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """Grafana's variables replaced by what they become at query time."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_dashboard_covers_latency_throughput_batches_queue_and_errors():
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    for needed in ("p99 latency per stage", "Images per second", "Batch size distribution", "Queue depth",
                   "Errors per second by status", "End-to-end latency percentiles"):
        assert needed in titles
    assert len(dashboard_queries()) >= 15


def exported_series_names() -> set[str]:
    """Every series name the service's registry can produce, observed yet or not."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "info": ("_info",)}
    return {family.name + suffix for family in ServiceMetrics().registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_dashboard_queries_are_valid_promql_over_exported_metrics(tmp_path):
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": concrete(q)}
                                                        for i, q in enumerate(queries)]}]}
    (tmp_path / "dash.yml").write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", "dash.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    exported = exported_series_names()
    used = set(re.findall(r"\b(rtmdet_\w+)", " ".join(queries)))
    assert used and used <= exported, used - exported
    alert_metrics = set(re.findall(r"\b(rtmdet_\w+)", (PROM / "alerts.rules.yml").read_text()))
    assert alert_metrics <= exported, alert_metrics - exported
