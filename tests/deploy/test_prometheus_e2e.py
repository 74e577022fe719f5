"""A real Prometheus on 127.0.0.1 scrapes a running `rtmdet serve`: the shipped recording rules and
the p99-per-stage query return numbers for every stage, and every Grafana dashboard query runs."""
import math
import subprocess
import time

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.promtools import require
from tests.deploy.test_prometheus_config import PROM, concrete, dashboard_queries
from tests.service.svc_helpers import ServerProcess, free_port, jpeg, make_test_checkpoint

STAGES = {"decode", "preprocess", "queue_wait", "inference", "postprocess"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    srv = ServerProcess(make_test_checkpoint(tmp / "tiny3.pth"), tmp / "server.log", RTMDET_MAX_BATCH_SIZE="4")
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    shipped = yaml.safe_load((PROM / "prometheus.yml").read_text())
    # The shipped rules, evaluated every second; the one scrape job pointed at the test service.
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(PROM / f) for f in shipped["rule_files"]],
              "scrape_configs": [{"job_name": "rtmdet", "metrics_path": "/metrics",
                                  "static_configs": [{"targets": [f"127.0.0.1:{service.http_port}"]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([require("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(prom: str, expr: str) -> dict:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]


def send_traffic(service, n: int = 4) -> None:
    img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for _ in range(n):
        r = httpx.post(f"{service.http}/detect", content=jpeg(img), headers={"content-type": "image/jpeg"},
                       timeout=30)
        assert r.status_code == 200


def finite_by_stage(data: dict) -> dict[str, float]:
    return {s["metric"]["stage"]: float(s["value"][1]) for s in data["result"]
            if math.isfinite(float(s["value"][1]))}


def test_p99_per_stage_from_a_real_scrape(service, prometheus):
    p99 = "histogram_quantile(0.99, sum by (le, stage) (rate(rtmdet_stage_duration_seconds_bucket[30s])))"
    deadline = time.monotonic() + 60  # the first sample lands ~6 s after start; rates need two
    stages: dict[str, float] = {}
    while time.monotonic() < deadline:
        send_traffic(service)
        stages = finite_by_stage(query(prometheus, p99))
        if set(stages) == STAGES:
            break
        time.sleep(1)
    assert set(stages) == STAGES, stages
    assert all(0 < v < 30 for v in stages.values()), stages
    # The shipped recording rule gives the same kind of numbers.
    recorded = {}
    while time.monotonic() < deadline and set(recorded) != STAGES:
        recorded = finite_by_stage(query(prometheus, "rtmdet:stage_latency_seconds:p99_5m"))
        time.sleep(1)
    assert set(recorded) == STAGES, recorded
    latency = query(prometheus, "rtmdet:request_latency_seconds:p99_5m")["result"]
    assert latency and 0 < float(latency[0]["value"][1]) < 30
    errors = query(prometheus, "rtmdet:request_errors:ratio_5m")["result"]
    assert errors and float(errors[0]["value"][1]) == 0.0  # every request above succeeded


def test_every_dashboard_query_runs_against_the_real_metrics(service, prometheus):
    send_traffic(service)
    empty = []
    for expr in dashboard_queries():
        data = query(prometheus, concrete(expr))
        if not data["result"]:
            empty.append(expr)
    # Only error panels may be empty: no request failed here.
    assert all("status!~" in e or "dropped" in e or "rejected" in e or "failures" in e for e in empty), empty
