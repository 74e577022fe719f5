"""--backbone-weights: an RSB ImageNet classifier checkpoint (backbone.* + head.* + meta, as the official
cspnext-*_imagenet_600e.pth files are laid out) or a bare backbone state_dict initialises exactly the backbone,
strictly; --load-from still initialises everything; and a short run trains from a YOLO folder with it."""
import csv
import json
import pickle

import pytest
import torch

from model import CheckpointError, build_rtmdet, save_checkpoint
from model.backbone_weights import load_backbone_weights
from model.checkpoint import class_names_from_meta
from model.testing import fill_deterministic
from model.train.engine import TrainConfig, Trainer
from service.cli import main as rtmdet
from tests.model.data.dataset_writers import write_yolo_set


def _rsb_checkpoint(path, size="tiny", seed=3):
    """What mmpretrain writes for the CSPNeXt ImageNet models: the classifier's backbone under `backbone.`, its
    linear head under `head.fc`, and a `meta`. Returns the backbone tensors under their detector key names."""
    backbone = fill_deterministic(build_rtmdet(size), seed).backbone
    state = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    channels = state["backbone.stage4.2.final_conv.conv.weight"].shape[0]
    state |= {"head.fc.weight": torch.randn(1000, channels), "head.fc.bias": torch.randn(1000)}
    torch.save({"meta": {"mmpretrain_version": "1.0.0rc7", "epoch": 600}, "state_dict": state}, path)
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def _assert_backbone_is(model, expected):
    own = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    assert own.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def test_rsb_checkpoint_loads_into_the_backbone_only(tmp_path):
    expected = _rsb_checkpoint(tmp_path / "cspnext-tiny_imagenet_600e.pth")
    model = build_rtmdet("tiny", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = load_backbone_weights(model, tmp_path / "cspnext-tiny_imagenet_600e.pth")
    _assert_backbone_is(model, expected)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # neck and head untouched
    assert report.loaded == len(expected) and report.ignored == ["head.fc.weight", "head.fc.bias"]
    assert "ignored 2 non-backbone tensors (head.fc.weight, head.fc.bias)" in report.describe()


def test_bare_backbone_state_dict_loads_too(tmp_path):
    expected = _rsb_checkpoint(tmp_path / "rsb.pth")
    torch.save({k[len("backbone."):]: v for k, v in expected.items()}, tmp_path / "bare.pth")
    model = build_rtmdet("tiny")
    assert load_backbone_weights(model, tmp_path / "bare.pth").ignored == []
    _assert_backbone_is(model, expected)


def test_wrong_size_or_missing_keys_is_one_line_naming_them(tmp_path):
    _rsb_checkpoint(tmp_path / "s.pth", size="s")
    with pytest.raises(CheckpointError) as exc:
        load_backbone_weights(build_rtmdet("tiny"), tmp_path / "s.pth")
    message = str(exc.value)
    assert "\n" not in message and "shape mismatch: backbone.stem.0.conv.weight (16, 3, 3, 3) vs model (12, 3, 3, 3)" \
        in message and "want a CSPNeXt-tiny backbone" in message
    state = _rsb_checkpoint(tmp_path / "rsb.pth")
    del state["backbone.stage2.1.main_conv.bn.running_var"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: backbone\.stage2\.1\.main_conv\.bn\.running_var"):
        load_backbone_weights(build_rtmdet("tiny"), tmp_path / "partial.pth")


class _Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_MARK'], 'w').close()",))


def test_backbone_file_is_read_without_unpickling_code(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOM_MARK", str(tmp_path / "ran"))
    with (tmp_path / "evil.pth").open("wb") as f:
        pickle.dump({"state_dict": {"backbone.stem.0.conv.weight": _Boom()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_backbone_weights(build_rtmdet("tiny"), tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    write_yolo_set(root / "set", names=("cat", "dog"))
    return root / "set"


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), size="tiny", epochs=1, batch_size=2, img_size=64, stage2_epochs=1,
                workers=0, val_interval=1, warmup_iters=2, log_interval=1, threads=1, progress=False)
    return TrainConfig(**(base | kw))


def test_trainer_backbone_weights_and_load_from(yolo, tmp_path):
    expected = _rsb_checkpoint(tmp_path / "rsb.pth")
    trainer = Trainer(_cfg(yolo, tmp_path / "a", backbone_weights=str(tmp_path / "rsb.pth")))
    _assert_backbone_is(trainer.model, expected)
    _assert_backbone_is(trainer.ema.module, expected)  # the EMA starts from the same weights
    # --load-from still initialises the whole detector
    donor = fill_deterministic(build_rtmdet("tiny", num_classes=2), 5)
    save_checkpoint(tmp_path / "det.pth", donor.state_dict())
    loaded = Trainer(_cfg(yolo, tmp_path / "b", load_from=str(tmp_path / "det.pth")))
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in donor.state_dict().items())
    with pytest.raises(ValueError, match="give one"):
        Trainer(_cfg(yolo, tmp_path / "c", load_from=str(tmp_path / "det.pth"),
                     backbone_weights=str(tmp_path / "rsb.pth")))


def test_train_from_a_yolo_folder_with_backbone_weights(yolo, tmp_path, capsys):
    _rsb_checkpoint(tmp_path / "cspnext-tiny_imagenet_600e.pth")
    out = tmp_path / "run"
    assert rtmdet(["train", "--data", str(yolo), "--backbone-weights", str(tmp_path / "cspnext-tiny_imagenet_600e.pth"),
                   "--size", "tiny", "--epochs", "1", "--stage2-epochs", "1", "--batch-size", "2", "--img-size", "64",
                   "--workers", "0", "--val-interval", "1", "--warmup-iters", "2", "--log-interval", "1",
                   "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "backbone initialised from" in printed and "ignored 2 non-backbone tensors" in printed
    assert "on 3 images (2 classes)" in printed  # the negative image is kept for training
    ck = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert class_names_from_meta(ck["meta"]) == ["cat", "dog"]
    assert ck["iter"] == 2
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["iter"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    val = list(csv.DictReader((out / "val_log.csv").open()))
    assert len(val) == 1 and 0 <= float(val[0]["AP"]) <= 1
    assert json.loads(printed.strip().splitlines()[-1])["epoch"] == 1
    # and `rtmdet eval` reads the YOLO folder too: the same numbers as the run's own validation
    assert rtmdet(["eval", "--weights", str(out / "last.pth"), "--data", str(yolo), "--img-size", "64", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["AP"] == pytest.approx(float(val[0]["AP"]), abs=1e-4)
