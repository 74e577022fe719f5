"""k8s/: both overlays render, validate against the Kubernetes schemas, and are wired together:
selectors find the pods, ports and probes are the service's, the drain fits the grace period,
the HPA's custom metric is one the service exports, and only the GPU overlay asks for a GPU."""
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from tests.deploy.kustomize_lite import containers, find, render

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(K8S / "overlays" / request.param)


def subset(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def parts(docs):
    deploy = find(docs, "Deployment", "rtmdet")
    (container,) = containers(deploy)
    settings = find(docs, "ConfigMap", "rtmdet-settings")["data"]
    return deploy, container, settings


def test_every_builtin_resource_validates_against_the_kubernetes_schema(rendered):
    _, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with Kubernetes; its wiring is checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_rejects_a_broken_deployment(rendered):
    _, docs = rendered
    broken = yaml.safe_load(yaml.safe_dump(find(docs, "Deployment", "rtmdet")))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_selectors_find_the_pods(rendered):
    _, docs = rendered
    deploy, _, _ = parts(docs)
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert subset(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    service = find(docs, "Service", "rtmdet")
    assert subset(service["spec"]["selector"], pod_labels)
    assert subset(find(docs, "PodDisruptionBudget", "rtmdet")["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = find(docs, "ServiceMonitor", "rtmdet")
    assert subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = find(docs, "HorizontalPodAutoscaler", "rtmdet")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rtmdet"}


def test_settings_are_real_service_settings_and_ports_match_them(rendered):
    _, docs = rendered
    deploy, container, settings = parts(docs)
    assert container["envFrom"] == [{"configMapRef": {"name": "rtmdet-settings"}}]
    fields = set(ServiceSettings.model_fields)
    assert all(k.startswith("RTMDET_") and k[len("RTMDET_"):].lower() in fields for k in settings), settings
    parsed = ServiceSettings(**{k[len("RTMDET_"):].lower(): v for k, v in settings.items()})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": parsed.http_port, "grpc": parsed.grpc_port}
    assert parsed.host == "0.0.0.0"  # reachable from the kubelet and the Service
    service = find(docs, "Service", "rtmdet")
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]


def test_probes_use_the_service_endpoints(rendered):
    _, docs = rendered
    _, container, settings = parts(docs)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["grpc"] == {"port": int(settings["RTMDET_GRPC_PORT"])}
    assert [k for k in container["startupProbe"] if k in ("grpc", "httpGet", "exec", "tcpSocket")] == ["grpc"]


def test_grace_period_covers_prestop_and_drain(rendered):
    _, docs = rendered
    deploy, container, settings = parts(docs)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + float(settings["RTMDET_SHUTDOWN_GRACE_S"]) + 5


def test_hpa_scales_on_a_metric_the_service_exports(rendered):
    name, docs = rendered
    hpa = find(docs, "HorizontalPodAutoscaler", "rtmdet")
    custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom == ["rtmdet_queue_depth"]
    exported = ServiceMetrics().render().decode()
    assert "# TYPE rtmdet_queue_depth gauge" in exported
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == "rtmdet_queue_depth"
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert resources == ({"cpu"} if name == "cpu" else set())


def test_only_the_gpu_overlay_asks_for_a_gpu(rendered):
    name, docs = rendered
    _, container, settings = parts(docs)
    limits = container["resources"]["limits"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and settings["RTMDET_DEVICE"] == "cuda"
        assert container["image"] == "rtmdet-serve:cuda"
    else:
        assert "nvidia.com/gpu" not in limits and settings["RTMDET_DEVICE"] == "cpu"
        assert container["image"] == "rtmdet-serve:cpu"


def test_renderer_agrees_with_kubectl_kustomize(rendered):
    name, docs = rendered
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is part of this project's machines; install it"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=lambda d: d["kind"])
    assert sorted(docs, key=lambda d: d["kind"]) == theirs


def test_the_model_repository_is_a_read_only_volume_where_the_settings_look(rendered):
    _, docs = rendered
    deploy, container, settings = parts(docs)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    repo = mounts[settings["RTMDET_MODEL_REPOSITORY"]]
    assert repo["readOnly"]
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == repo["name"]]
    claim = find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]  # every replica reads the same repository
    parsed = ServiceSettings(model_repository=settings["RTMDET_MODEL_REPOSITORY"],
                             repository_poll_s=settings["RTMDET_REPOSITORY_POLL_S"])
    assert parsed.repository_poll_s > 0  # nobody sends SIGHUP to a pod: new versions come by polling


def test_tls_overlay_mounts_the_secret_where_the_settings_point_and_probes_the_plain_text_port():
    docs = render(K8S / "overlays" / "tls")
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deploy, container, settings = parts(docs)
    parsed = ServiceSettings(**{k[len("RTMDET_"):].lower(): v for k, v in settings.items()})
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "rtmdet-tls" and mount["readOnly"]
    for path in (parsed.tls_cert_file, parsed.tls_key_file, parsed.tls_client_ca_file):
        assert str(path.parent) == mount["mountPath"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": parsed.http_port, "grpc": parsed.grpc_port, "health": parsed.health_port}
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"} and "grpc" not in container[probe]
    monitor = find(docs, "ServiceMonitor", "rtmdet")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["health"]
    assert "health" in {p["name"] for p in find(docs, "Service", "rtmdet")["spec"]["ports"]}
