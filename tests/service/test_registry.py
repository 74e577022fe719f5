"""The model registry in-process (real detectors, no server): the reload check, leases across a swap, and how a
repository folder becomes specs."""
from __future__ import annotations

import shutil

import pytest
import torch
from svc_helpers import make_variant_checkpoint

import model
from model.checkpoint import make_meta, read_checkpoint
from service.errors import ModelNotFound, ReloadFailed
from service.metrics import ServiceMetrics
from service.model_specs import parse_model_option, repository_specs
from service.registry import ModelRegistry
from service.settings import ModelSpec, ServiceSettings


@pytest.fixture
def registry(checkpoint):
    settings = ServiceSettings(weights=checkpoint, input_size=96, max_batch_size=2, device="cpu", warmup=False)
    reg = ModelRegistry(settings, ServiceMetrics(),
                        [ModelSpec(name="m", weights=checkpoint, input_size=96, device="cpu", accelerate="eager")])
    reg.load("m")
    yield reg
    reg.shutdown()


def test_a_file_with_non_finite_weights_fails_the_check_and_the_old_version_keeps_serving(registry, checkpoint,
                                                                                          tmp_path):
    state, meta = read_checkpoint(checkpoint)
    state["bbox_head.rtm_reg.0.weight"] = torch.full_like(state["bbox_head.rtm_reg.0.weight"], float("nan"))
    bad = tmp_path / "nan.pth"
    model.save_checkpoint(bad, state, make_meta(["circle", "square", "triangle"]))
    old = registry.slot("m").current
    with pytest.raises(ReloadFailed, match="non-finite"):
        registry.reload("m", bad)
    assert registry.slot("m").current is old and old.can_serve()


def test_a_leased_version_stays_open_across_a_swap_until_its_lease_ends(registry, checkpoint, tmp_path):
    other = make_variant_checkpoint(checkpoint, tmp_path / "other.pth")
    with registry.lease("m") as old:
        new = registry.reload("m", other)
        assert registry.slot("m").current is new and new.version != old.version
        assert old.can_serve()  # the request that leased it can still run on it
        with registry.lease("m") as later:
            assert later is new  # requests after the swap go to the new version
    assert old.wait_closed(30) and not old.can_serve() and not old.batcher.running
    assert registry.metrics.versions_loaded.labels(model="m")._value.get() == 1


def test_unknown_names_name_the_known_ones(registry):
    with pytest.raises(ModelNotFound, match=r"no model named 'x'.*\['m'\]"):
        registry.slot("x")


def test_a_repository_serves_each_models_highest_version(checkpoint, tmp_path):
    for version in ("2", "10", "9"):
        (tmp_path / "shapes" / version).mkdir(parents=True)
        shutil.copy(checkpoint, tmp_path / "shapes" / version / "w.pth")
    (tmp_path / "shapes" / "10" / "config.yaml").write_text("img_size: 224\nnum_classes: 3\n")
    (tmp_path / "empty").mkdir()  # no version folder: skipped
    (spec,) = repository_specs(tmp_path)
    assert (spec.name, spec.version, spec.input_size, spec.num_classes) == ("shapes", "10", 224, 3)
    (tmp_path / "shapes" / "10" / "config.yaml").write_text("colour: blue\n")
    with pytest.raises(ValueError, match="unknown settings"):
        repository_specs(tmp_path)


def test_model_options_parse_and_bad_ones_say_what_is_wrong(checkpoint):
    settings = ServiceSettings()
    spec = parse_model_option(f"coco={checkpoint},size=s,img_size=320,backend=onnx,accelerate=eager", settings)
    assert (spec.name, spec.size, spec.input_size, spec.backend, spec.accelerate) == ("coco", "s", 320, "onnx", "eager")
    for text, problem in (("coco", "NAME=PATH"), (f"coco={checkpoint},colour=red", "unknown option"),
                          (f"coco={checkpoint},size=huge", "unknown size")):
        with pytest.raises(ValueError, match=problem):
            parse_model_option(text, settings)
