"""`RTMDET_ACCELERATE=auto` for an operator: `RTMDET_AUTO_CANDIDATES` narrows the field (per model
`auto_candidates=a+b`), and `RTMDET_AUTO_CHOICES_FILE` lets a restarted `rtmdet serve` reuse the measurement of
the last start on this machine instead of timing every candidate again."""
from __future__ import annotations

import json

import pytest
from svc_helpers import REPO, ServerProcess, jpeg

from model.inference import runner_choice
from model.inference.choice_store import FORMAT
from model.inference.detector import load_image
from service.client import GrpcDetectorClient, HttpDetectorClient
from service.model_specs import parse_model_option, repository_specs
from service.settings import AUTO_CANDIDATES, ServiceSettings

WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"
PHOTO = REPO / "examples" / "shapes.jpg"


def test_the_settings_name_the_runner_choices_candidates():
    assert AUTO_CANDIDATES == runner_choice.CANDIDATES


def test_candidates_from_the_environment_and_per_model(monkeypatch):
    monkeypatch.setenv("RTMDET_AUTO_CANDIDATES", " openvino, inductor")
    settings = ServiceSettings()
    assert settings.auto_candidates == ("eager", "openvino", "inductor")  # eager: always, the reference
    assert settings.default_spec().auto_candidates == settings.auto_candidates
    spec = parse_model_option(f"m={WEIGHTS},accelerate=auto,auto_candidates=onnxruntime+openvino", settings)
    assert spec.auto_candidates == ("eager", "onnxruntime", "openvino")
    assert parse_model_option(f"m={WEIGHTS}", settings).auto_candidates == settings.auto_candidates
    with pytest.raises(ValueError, match="auto candidates \\['tensorrt'\\]: choose from eager, inductor"):
        parse_model_option(f"m={WEIGHTS},auto_candidates=openvino+tensorrt", settings)
    monkeypatch.setenv("RTMDET_AUTO_CANDIDATES", "tensorrt")
    with pytest.raises(ValueError, match="tensorrt"):
        ServiceSettings()


def test_an_empty_choices_file_setting_is_unset_and_a_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RTMDET_AUTO_CHOICES_FILE", "")
    assert ServiceSettings().auto_choices_file is None  # not Path("") == the current folder
    monkeypatch.setenv("RTMDET_AUTO_CHOICES_FILE", str(tmp_path))
    with pytest.raises(ValueError, match="is a folder: name a file in it"):
        ServiceSettings()


def test_a_repository_version_names_its_candidates_in_its_config(tmp_path):
    version = tmp_path / "shapes" / "1"
    version.mkdir(parents=True)
    (version / "model.pth").write_bytes(WEIGHTS.read_bytes())
    (version / "config.yaml").write_text("accelerate: auto\nauto_candidates: [openvino]\n")
    (spec,) = repository_specs(tmp_path, ServiceSettings(auto_choices_file=tmp_path / "auto.json"))
    assert (spec.accelerate, spec.auto_candidates) == ("auto", ("eager", "openvino"))
    assert spec.auto_choices_file == tmp_path / "auto.json"  # the service's file serves every model


def start(tmp_path, name: str, choices) -> ServerProcess:
    return ServerProcess(WEIGHTS, tmp_path / f"{name}.log", RTMDET_ACCELERATE="auto", RTMDET_MAX_BATCH_SIZE="1",
                         RTMDET_AUTO_CANDIDATES="onnxruntime", RTMDET_AUTO_CHOICES_FILE=str(choices))


@pytest.mark.slow  # 25 s of the default run's 15 minutes; a restarted process reusing the saved choice is tested in
# it (tests/model/test_choice_store.py), and the settings that name the file here
def test_a_restarted_server_reuses_the_measurement_saved_by_the_first(tmp_path):
    choices = tmp_path / "cache" / "auto.json"
    body = jpeg(load_image(PHOTO))
    answers = []
    for name in ("first", "restarted"):
        with start(tmp_path, name, choices) as srv:
            srv.wait_ready()
            with HttpDetectorClient(srv.http) as client:
                answers.append(client.detect(body)["detections"])
                info = client.model()
            with GrpcDetectorClient(srv.grpc) as client:
                grpc_info = client.model()
        log = (tmp_path / f"{name}.log").read_text()
        (line,) = [ln for ln in log.splitlines() if "auto runner: " in ln]
        # What runs and why, as the operator sees it: the same on both protocols, the log's own summary.
        assert info["runner"] in ("eager", "onnxruntime", "eager+onnxruntime", "onnxruntime+eager")
        assert info["runner_choice"] in line and info["runner_choice"].startswith(f"auto runner: {info['runner']} (")
        assert (grpc_info["runner"], grpc_info["runner_choice"]) == (info["runner"], info["runner_choice"])
        assert "medians at batch 1," in line and "onnxruntime" in line, line
        if name == "first":
            assert "reused" not in line, line
            entries = json.loads(choices.read_text())["entries"]
            assert json.loads(choices.read_text())["format"] == FORMAT and len(entries) == 1
            assert [m["name"] for m in next(iter(entries.values()))["choice"]["measurements"]] == \
                ["eager", "onnxruntime"]  # the narrowed field: no inductor, no OpenVINO
        else:
            assert f"reused from {choices} (measured " in line, line
    assert answers[0] and len(answers[0]) == len(answers[1])
    for a, b in zip(answers[0], answers[1], strict=True):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4
