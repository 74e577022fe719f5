"""Training checkpoints as MMDetection's Runner writes them are read as data (weights, classes, plain meta),
and a pickle that would run code is still refused, in a file of the same layout."""
from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from model import build_rtmdet
from model.checkpoint import CheckpointError, class_names_from_meta, read_checkpoint
from model.foreign_pickle import Foreign, ForeignRef, load_foreign
from model.testing import fill_deterministic
from tests.model.mmengine_files import HISTORY_BUFFER_MODULE, HistoryBuffer, fake_modules, write_mmengine_checkpoint

MMENGINE_GLOBALS = {"mmengine.logging.history_buffer.HistoryBuffer", "numpy.ndarray", "numpy.dtype",
                    "numpy.core.multiarray.scalar", "numpy.core.multiarray._reconstruct", "builtins.getattr"}


@pytest.fixture(scope="module")
def weights():
    """(EMA weights, raw weights): two different tiny networks, as after EMAHook's swap."""
    return (fill_deterministic(build_rtmdet("tiny", num_classes=2), 1).state_dict(),
            fill_deterministic(build_rtmdet("tiny", num_classes=2), 2).state_dict())


@pytest.fixture(scope="module")
def mmengine_file(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("mm") / "epoch_60.pth"
    write_mmengine_checkpoint(path, *weights, classes=("cat", "dog"))
    return path


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_file_holds_what_torch_weights_only_refuses(mmengine_file):
    # The premise: these six globals are what blocks a real mmengine 0.10.7 file; torch refuses them.
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(mmengine_file)) == MMENGINE_GLOBALS
    with pytest.raises(pickle.UnpicklingError):
        torch.load(mmengine_file, weights_only=True)


def test_ema_and_raw_weights_classes_and_plain_meta(mmengine_file, weights):
    ema, raw = weights
    state, meta = read_checkpoint(mmengine_file)
    assert _equal(state, ema)
    raw_state, _ = read_checkpoint(mmengine_file, weights_key="raw")
    assert _equal(raw_state, raw)  # `module.` stripped, `steps` dropped
    assert class_names_from_meta(meta) == ["cat", "dog"]
    assert meta["epoch"] == 60 and meta["best_coco_bbox_mAP"] == 0.25 and type(meta["best_coco_bbox_mAP"]) is float
    assert HistoryBuffer.calls == []  # the class was never constructed nor called


def test_foreign_objects_are_inert_and_numpy_is_rebuilt_as_data(mmengine_file):
    obj = load_foreign(mmengine_file)
    buf = obj["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buf, Foreign) and buf.foreign_name == HISTORY_BUFFER_MODULE + ".HistoryBuffer"
    assert buf.state["_log_history"].array.tolist() == [1.5, 1.25]
    assert str(buf.state["_count_history"].array.dtype) == "int64"
    assert isinstance(buf.state["statistics_methods"]["min"], ForeignRef)
    info = obj["message_hub"]["runtime_info"]
    assert info["coco/bbox_mAP"] == 0.5 and str(info["coco/bbox_mAP"].dtype) == "float32"
    assert info["class_counts"].array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_the_class_is_not_used_even_when_importable(mmengine_file):
    # With a module of that name present at load time, the reader still builds only its stand-ins.
    with fake_modules({HISTORY_BUFFER_MODULE: {"HistoryBuffer": HistoryBuffer}}):
        obj = load_foreign(mmengine_file)
    assert not isinstance(obj["message_hub"]["log_scalars"]["train/lr"], HistoryBuffer)
    assert HistoryBuffer.calls == []


def test_module_and_model_prefixes_are_stripped(tmp_path, weights):
    ema, _ = weights
    for prefix in ("module.", "model.", "module.model."):
        path = tmp_path / "p.pth"
        torch.save({"state_dict": {prefix + k: v for k, v in ema.items()}}, path)
        assert _equal(read_checkpoint(path)[0], ema), prefix


def test_raw_weights_of_a_published_file_is_a_clear_error(tmp_path, weights):
    path = tmp_path / "published.pth"
    torch.save({"meta": {}, "state_dict": weights[0]}, path)
    with pytest.raises(CheckpointError, match=r"published.pth: no raw weights \(no `ema_state_dict`"):
        read_checkpoint(path, weights_key="raw")


class _Call:
    """Pickles as a call of `func(*args)`: what a hostile file does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "getattr-on-a-real-class",
                                     "call-a-foreign-method", "subprocess"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, weights, payload):
    marker = tmp_path / "ran"
    command = f"touch {marker}"
    hostile = {"os.system": lambda: _Call(os.system, command),
               "builtins.eval": lambda: _Call(eval, f"open({str(marker)!r}, 'w')"),
               # getattr reaching a real callable (here OrderedDict.fromkeys) instead of a stand-in
               "getattr-on-a-real-class": lambda: _Call(getattr, collections.OrderedDict, "fromkeys"),
               # getattr on a stand-in is allowed, calling what it returns is not
               "call-a-foreign-method": lambda: _Call(HistoryBuffer.min, None),
               "subprocess": lambda: _Call(__import__("subprocess").call, ["touch", str(marker)])}[payload]()
    path = tmp_path / "hostile.pth"
    write_mmengine_checkpoint(path, *weights, classes=("cat", "dog"), extra={"hook_state": hostile})
    with pytest.raises(CheckpointError, match=r"hostile.pth: refused") as err:
        read_checkpoint(path)
    assert "\x1b[" not in str(err.value) and "weights_only" not in str(err.value)
    assert not marker.exists() and HistoryBuffer.calls == []


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """An mmengine training file around the shipped shapes weights (as EMA) and its converted published copy;
    the raw weights are another network, so that picking the wrong set shows."""
    from service.cli import main as rtmdet_main

    root = Path(__file__).resolve().parents[2]
    ema, meta = read_checkpoint(root / "weights" / "rtmdet_tiny_shapes.pth")
    classes = tuple(class_names_from_meta(meta))
    raw = fill_deterministic(build_rtmdet("tiny", num_classes=len(classes)), 3).state_dict()
    folder = tmp_path_factory.mktemp("trained")
    mm = folder / "epoch_60.pth"
    write_mmengine_checkpoint(mm, ema, raw, classes=classes)
    published = {key: folder / f"published_{key}.pth" for key in ("ema", "raw")}
    for key, out in published.items():
        assert rtmdet_main(["convert-checkpoint", str(mm), str(out), "--weights-key", key]) == 0
    return mm, published, root


def _run(capsys, argv) -> str:
    from service.cli import main as rtmdet_main

    capsys.readouterr()
    assert rtmdet_main(argv) == 0
    return capsys.readouterr().out


def test_converted_copy_is_the_published_form(trained_pair):
    mm, published, _ = trained_pair
    ckpt = torch.load(published["ema"], map_location="cpu", weights_only=True)  # plain data only
    assert set(ckpt) == {"meta", "state_dict"}
    assert _equal(ckpt["state_dict"], read_checkpoint(mm)[0])
    assert ckpt["meta"]["dataset_meta"]["classes"][0] == "circle" and ckpt["meta"]["size"] == "tiny"
    assert _equal(torch.load(published["raw"], weights_only=True)["state_dict"], read_checkpoint(mm, "raw")[0])


def test_detect_on_the_training_file_equals_its_published_copy(trained_pair, capsys):
    mm, published, root = trained_pair
    image = str(root / "examples" / "shapes.jpg")
    common = [image, "--img-size", "320", "--device", "cpu"]
    results = {}
    for key in ("ema", "raw"):
        results[key] = json.loads(_run(capsys, ["detect", *common, "--weights", str(mm), "--weights-key", key]))
        assert results[key] == json.loads(_run(capsys, ["detect", *common, "--weights", str(published[key])]))
    assert results["ema"]["detections"], "the shipped weights find the shapes"
    assert results["ema"] != results["raw"]


def test_eval_on_the_training_file_equals_its_published_copy(trained_pair, capsys, tmp_path):
    from model.data.shapes import make_shapes_dataset

    mm, published, _ = trained_pair
    make_shapes_dataset(tmp_path / "data", 0, 4, seed=3, img_size=320)
    common = ["eval", "--data", str(tmp_path / "data"), "--img-size", "320", "--device", "cpu", "--json"]
    stats = json.loads(_run(capsys, [*common, "--weights", str(mm)]))
    assert stats == json.loads(_run(capsys, [*common, "--weights", str(published["ema"])]))
    assert stats["AP50"] > 0.5, stats


def test_train_load_from_takes_the_chosen_weights(trained_pair, tmp_path):
    from model.data.shapes import make_shapes_dataset
    from model.train.engine import TrainConfig, Trainer

    mm, _, _ = trained_pair
    make_shapes_dataset(tmp_path / "data", 2, 0, seed=4, img_size=64)  # the shipped weights' 5 classes
    for key in ("ema", "raw"):
        cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / key), epochs=1, batch_size=2, img_size=64,
                          workers=0, threads=1, progress=False, device="cpu", load_from=str(mm), load_from_key=key)
        assert _equal(Trainer(cfg).model.state_dict(), read_checkpoint(mm, key)[0]), key


def test_serve_loads_the_chosen_weights(trained_pair, monkeypatch):
    import cv2

    from model.inference.detector import Detector
    from service.backends import create_runner
    from service.cli import build_parser
    from service.commands import settings_from_args

    mm, published, root = trained_pair
    image = cv2.imread(str(root / "examples" / "shapes.jpg"))
    monkeypatch.setenv("RTMDET_INPUT_SIZE", "320")
    for key in ("ema", "raw"):
        settings = settings_from_args(build_parser().parse_args(
            ["serve", "--weights", str(mm), "--weights-key", key, "--device", "cpu"]))
        assert settings.weights_key == key
        served = Detector.from_runner(create_runner(settings.default_spec()))
        reference = Detector.from_checkpoint(published[key], device="cpu")
        reference.cfg = served.cfg
        assert served([image])[0].to_list() == reference([image])[0].to_list(), key
