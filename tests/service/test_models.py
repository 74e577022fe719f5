"""Several models in one server: routes by name over HTTP and gRPC, model listing, unknown names, reload and
unload (admin key), a model repository re-read on SIGHUP. A real `rtmdet serve` on 127.0.0.1."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest
from svc_helpers import (
    API_KEY,
    CLASS_NAMES,
    ServerProcess,
    free_port,
    jpeg,
    make_test_checkpoint,
    make_variant_checkpoint,
)

from model.classes import COCO_CLASSES
from model.inference.detector import file_sha256
from service.client import GrpcDetectorClient, HttpDetectorClient

ADMIN_KEY = "admin-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory) -> Path:
    """An 80-class RTMDet-tiny file that finds boxes (untrained: only its classes matter here)."""
    return make_test_checkpoint(tmp_path_factory.mktemp("coco") / "coco80.pth", COCO_CLASSES, (-1.35,) * 80)


@pytest.fixture(scope="module")
def multi(checkpoint, coco_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "multi.log"
    srv = ServerProcess(checkpoint, log, "--model", f"shapes={checkpoint},img_size=160", "--model",
                        f"coco={coco_checkpoint},size=tiny,img_size=160", RTMDET_API_KEY=API_KEY,
                        RTMDET_ADMIN_KEY=ADMIN_KEY, RTMDET_MAX_BATCH_SIZE="2")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def version_of(path: Path) -> str:
    return file_sha256(path)[:12]


def test_both_models_answer_by_name_with_their_own_classes(multi, checkpoint, coco_checkpoint, photos):
    data = jpeg(photos["coffee"])
    with HttpDetectorClient(multi.http, api_key=API_KEY) as h, GrpcDetectorClient(multi.grpc, api_key=API_KEY) as g:
        listed = {m["model"]: m for m in h.models()}
        assert set(listed) == {"shapes", "coco"} and listed["shapes"]["default"] and not listed["coco"]["default"]
        assert listed["shapes"]["classes"] == CLASS_NAMES and listed["coco"]["classes"] == list(COCO_CLASSES)
        assert listed["coco"]["state"] == "ready" and listed["coco"]["input_size"] == 160
        assert [m["model"] for m in g.models()] == ["shapes", "coco"]
        assert g.model("coco")["classes"] == list(COCO_CLASSES)
        for name, path, names in (("shapes", checkpoint, CLASS_NAMES), ("coco", coco_checkpoint, COCO_CLASSES)):
            for answer in (h.detect(data, model=name, score_threshold=0.0, max_detections=50),
                           g.detect(data, model=name, score_threshold=0.0, max_detections=50)):
                assert answer["model"]["model"] == name and answer["model"]["version"] == version_of(path)
                assert answer["detections"] and {d["class_name"] for d in answer["detections"]} <= set(names)
        default = h.detect(data)  # POST /detect goes to the first model given
        assert default["model"]["model"] == "shapes"


def test_an_unknown_model_is_404_and_not_found_naming_the_known_ones(multi, photos):
    data = jpeg(photos["coffee"])
    r = httpx.post(f"{multi.http}/v1/models/nope/detect", content=data, headers={"content-type": "image/jpeg", **AUTH},
                   timeout=60)
    assert r.status_code == 404 and "'nope'" in r.json()["detail"] and "coco" in r.json()["detail"]
    assert httpx.get(f"{multi.http}/v1/models/nope", headers=AUTH, timeout=60).status_code == 404
    with GrpcDetectorClient(multi.grpc, api_key=API_KEY) as g, pytest.raises(grpc.RpcError) as err:
        g.detect(data, model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "shapes" in err.value.details()


def test_reload_needs_the_admin_key_swaps_the_version_and_a_bad_file_keeps_the_old(multi, checkpoint, tmp_path,
                                                                                  photos):
    other = make_variant_checkpoint(checkpoint, tmp_path / "other.pth")
    url = f"{multi.http}/v1/models/shapes"
    assert httpx.post(f"{url}/reload", headers=AUTH, json={"weights": str(other)}, timeout=60).status_code == 401
    r = httpx.post(f"{url}/reload", headers=ADMIN, json={"weights": str(other)}, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == version_of(other)
    data = jpeg(photos["coffee"])
    assert httpx.post(f"{url}/detect", content=data, headers={"content-type": "image/jpeg", **AUTH},
                      timeout=60).json()["model"]["version"] == version_of(other)

    broken = tmp_path / "broken.pth"
    broken.write_bytes(other.read_bytes()[:5000])
    r = httpx.post(f"{url}/reload", headers=ADMIN, json={"weights": str(broken)}, timeout=120)
    assert r.status_code == 422 and str(broken) in r.json()["detail"] and "keeps serving" in r.json()["detail"]
    # The good one still serves.
    assert httpx.get(f"{url}", headers=AUTH, timeout=60).json()["version"] == version_of(other)
    r = httpx.post(f"{url}/reload", headers=ADMIN, json={"weights": str(checkpoint)}, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == version_of(checkpoint)


def test_unload_stops_one_model_and_the_other_keeps_serving(checkpoint, coco_checkpoint, tmp_path, photos):
    srv = ServerProcess(checkpoint, tmp_path / "unload.log", "--model", f"a={checkpoint},img_size=160", "--model",
                        f"b={coco_checkpoint},img_size=160", RTMDET_MAX_BATCH_SIZE="1")
    try:
        srv.wait_ready()
        assert httpx.post(f"{srv.http}/v1/models/b/unload", timeout=60).json()["state"] == "unloaded"
        data = jpeg(photos["coffee"])
        r = httpx.post(f"{srv.http}/v1/models/b/detect", content=data, headers={"content-type": "image/jpeg"},
                       timeout=60)
        assert r.status_code == 503 and "unloaded" in r.json()["detail"]
        assert httpx.get(f"{srv.http}/v1/models/b/ready", timeout=60).status_code == 503
        assert httpx.get(f"{srv.http}/readyz", timeout=60).status_code == 200  # `a` still serves: the pod is ready
        assert httpx.post(f"{srv.http}/v1/models/a/detect", content=data, headers={"content-type": "image/jpeg"},
                          timeout=60).status_code == 200
        assert httpx.post(f"{srv.http}/v1/models/b/reload", timeout=120).json()["state"] == "ready"
    finally:
        srv.stop()


def wait_for_version(srv: ServerProcess, version: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while httpx.get(f"{srv.http}/v1/models/shapes", timeout=60).json()["version"] != version:
        assert time.monotonic() < end, srv.log_path.read_text()
        time.sleep(0.2)


def test_a_repository_serves_the_highest_version_and_sighup_picks_up_a_new_one(checkpoint, coco_checkpoint,
                                                                              tmp_path, photos):
    repo = tmp_path / "repo"
    (repo / "shapes" / "1").mkdir(parents=True)
    shutil.copy(checkpoint, repo / "shapes" / "1" / "model.pth")
    (repo / "shapes" / "1" / "config.yaml").write_text("size: tiny\nimg_size: 160\nnum_classes: 3\n")
    srv = ServerProcess(checkpoint, tmp_path / "repo.log", "--model-repository", str(repo), RTMDET_MAX_BATCH_SIZE="1",
                        weights_flag=False)
    try:
        srv.wait_ready()
        (info,) = httpx.get(f"{srv.http}/v1/models", timeout=60).json()["models"]
        assert (info["model"], info["version"], info["input_size"]) == ("shapes", "1", 160)
        (repo / "shapes" / "2").mkdir()
        shutil.copy(checkpoint, repo / "shapes" / "2" / "model.pth")
        (repo / "shapes" / "2" / "config.yaml").write_text("img_size: 192\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_version(srv, "2")
        r = httpx.post(f"{srv.http}/detect", content=jpeg(photos["coffee"]), headers={"content-type": "image/jpeg"},
                       timeout=60).json()
        assert r["model"]["version"] == "2"
        assert httpx.get(f"{srv.http}/v1/models/shapes", timeout=60).json()["input_size"] == 192
        # Version 3 pins 3 classes but holds an 80-class file: refused, version 2 keeps serving.
        (repo / "shapes" / "3").mkdir()
        shutil.copy(coco_checkpoint, repo / "shapes" / "3" / "model.pth")
        (repo / "shapes" / "3" / "config.yaml").write_text("num_classes: 3\nimg_size: 160\n")
        srv.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 120
        while "version 3 failed" not in srv.log_path.read_text():
            assert time.monotonic() < end, srv.log_path.read_text()
            time.sleep(0.2)
        assert "pinned to 3" in srv.log_path.read_text()
        wait_for_version(srv, "2", timeout=1)
    finally:
        srv.stop()


def test_bad_model_options_fail_start_up_with_one_line(tmp_path):
    import subprocess
    import sys

    from svc_helpers import REPO
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--model", "noequals", "--http-port",
                           str(free_port()), "--grpc-port", str(free_port())], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "NAME=PATH" in proc.stderr and "Traceback" not in proc.stderr
