"""Official-format checkpoints load strictly, without unpickling, and errors name the problem."""
import pickle

import pytest
import torch

from model import CheckpointError, build_rtmdet, load_checkpoint, save_checkpoint
from model.checkpoint import class_names_from_meta, make_meta, read_checkpoint
from model.testing import fill_deterministic


@pytest.fixture(scope="module")
def tiny():
    return fill_deterministic(build_rtmdet("tiny"), 1).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_training_checkpoint_layout_loads_strictly(tmp_path, tiny):
    # What mmengine writes during training: meta, state_dict (EMA swapped in), ema_state_dict, optimizer.
    ckpt = {
        "meta": {"mmengine_version": "0.10.7", "dataset_meta": {"classes": ("a", "b")}, "epoch": 300},
        "state_dict": tiny.state_dict(),
        "ema_state_dict": {"module." + k: v for k, v in tiny.state_dict().items()} | {"steps": torch.tensor(5)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.004, "params": [0, 1]}]},
    }
    path = tmp_path / "epoch_300.pth"
    torch.save(ckpt, path)
    fresh = build_rtmdet("tiny")
    meta = load_checkpoint(fresh, path)
    assert _same_weights(fresh, tiny)
    assert class_names_from_meta(meta) == ["a", "b"]


def test_bare_state_dict_and_module_prefix_load(tmp_path, tiny):
    path = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in tiny.state_dict().items()}, path)
    fresh = build_rtmdet("tiny")
    load_checkpoint(fresh, path)
    assert _same_weights(fresh, tiny)


def test_save_then_load_round_trip_pth_and_safetensors(tmp_path, tiny):
    for name in ("m.pth", "m.safetensors"):
        path = tmp_path / name
        save_checkpoint(path, tiny.state_dict(), make_meta(["x", "y", "z"]))
        fresh = build_rtmdet("tiny")
        meta = load_checkpoint(fresh, path)
        assert _same_weights(fresh, tiny), name
        assert class_names_from_meta(meta) == ["x", "y", "z"]
        assert not list(tmp_path.glob("*.tmp"))


def test_wrong_size_is_a_clear_error(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, tiny.state_dict())
    with pytest.raises(CheckpointError, match=r"tiny.pth: does not fit the model: it is an RTMDet-tiny checkpoint, "
                                              r"not RTMDet-s; use --size tiny$"):
        load_checkpoint(build_rtmdet("s"), path)
    # Same size, another class count: the shapes that differ are named.
    with pytest.raises(CheckpointError, match=r"tiny.pth: does not fit the model \(is it really an RTMDet-tiny "
                                              r"checkpoint with 3 classes\?\): shape mismatch: bbox_head.rtm_cls"):
        load_checkpoint(build_rtmdet("tiny", num_classes=3), path)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state.pop("neck.out_convs.2.bn.running_var")
    state["backbone.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_rtmdet("tiny"), path)
    assert "missing keys: neck.out_convs.2.bn.running_var" in str(err.value)
    assert "unexpected keys: backbone.extra.weight" in str(err.value)


def test_pickled_code_is_refused_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth: not a readable checkpoint"):
        read_checkpoint(path)


def test_truncated_and_missing_files(tmp_path, tiny):
    path = tmp_path / "t.pth"
    save_checkpoint(path, tiny.state_dict())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="t.pth: not a readable checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        read_checkpoint(tmp_path / "nope.pth")
