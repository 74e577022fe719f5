"""The training loop step for step against MMDetection 3.3.0's own Runner, without MMDetection.

tests/data/parity/train_loop_tiny.pt was written by tools/mmdet_train_parity.py --save-fixture: MMDetection's
`Runner.train()` with the official RTMDet-tiny optimizer wrapper, parameter schedulers and custom hooks (shrunk
to 36 iterations: warm-up 10, flat, cosine from iteration 18; stage switch at epoch 10) on 12 fixed images in
batches of 4, from seeded weights, in float64. Here our Trainer (`model.train.replay`) runs the same and must
give the same lr, losses, parameter groups, EMA and final weights.

Tolerances. Both runs are float64 and compute the same formulas in a different order (oneDNN vs. native
kernels, channels_last vs. NCHW, fused vs. per-tensor AdamW): at iteration 0 the losses agree to 1e-12.
Training amplifies such differences (Adam's near-sign updates, BatchNorm over 4 images and the assigner's
top-k choices): the tool measured the worst relative loss difference growing about 1.7x per iteration, to
3e-5 at iteration 35. The loss tolerance is 1e-9 * 2^i, capped at 1e-3 (15-300x above what was measured at
each stage); a real difference (a weight decay on norms, an lr formula, an EMA rule) starts at 1e-7 or more
and, growing at the same rate, leaves it behind within a few iterations (the same comparison in float32, where
channels_last convolutions alone put the two 1e-3 apart at iteration 0, measured 1e-2 at iteration 3 and 0.6
at iteration 11). The final weights differ by at most 3.8e-6 of each tensor's largest
value (the tool's measurement, a BN running_var); the tolerance is 1e-4. The EMA is checked through its offset
from the raw weights, which agreed within 7.3e-5 of each tensor's largest offset; the tolerance is 2e-3 (a
wrong EMA rule moves it by O(1): averaging the shared head convs once a step instead of once per key, 3000x;
skipping the buffers, 1x; gamma 1000 for 2000, 1x). Integer buffers, lr and parameter groups are exact.
The fixture stores float32 digests (small tensors whole, 512 samples and the norm of larger ones), 1.6 MB.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import build_rtmdet
from model.testing import fill_trainable
from model.train.replay import ReplayPlan, digest, replay, unpack_digest

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "parity" / "train_loop_tiny.pt"
WEIGHT_TOL = 1e-4
EMA_TOL = 2e-3


def loss_tolerance(i: int) -> float:
    return min(1e-9 * 2.0**i, 1e-3)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def init(ref) -> dict[str, torch.Tensor]:
    model = fill_trainable(build_rtmdet(ref["plan"]["size"], num_classes=len(ref["class_names"])), ref["seed"])
    state = model.state_dict()
    want, got = unpack_digest(ref["init_digest"]), unpack_digest(digest(state, full_numel=0, n_samples=64))
    changed = [k for k, d in want.items() if not (torch.equal(d["full"], got[k]["full"]) if "full" in d else (
        torch.equal(d["samples"], got[k]["samples"]) and torch.isclose(d["norm"], got[k]["norm"], rtol=1e-6)))]
    assert set(got) == set(want) and not changed, (
        f"the seeded initial weights are no longer the fixture's ({changed[:3]}): "
        "re-run tools/mmdet_train_parity.py --save-fixture")
    return state


@pytest.fixture(scope="module")
def ours(ref, init, tmp_path_factory):
    torch.manual_seed(0)
    return replay(ref["images"], ref["boxes"], ref["labels"], ref["class_names"], init, ReplayPlan(**ref["plan"]),
                  tmp_path_factory.mktemp("replay"))


def test_parameter_groups_and_optimizer_match(ref, ours):
    # Every parameter once (the head's shared convs under their first name), with MMDetection's decay:
    # 0.05 on conv kernels, 0 on every norm weight/bias and every bias.
    assert ours.weight_decay == ref["weight_decay"]
    assert {v for v in ref["weight_decay"].values()} == {0.0, 0.05}
    assert ref["optimizer_defaults"]["type"] == "AdamW"
    assert ours.optimizer_defaults == {k: v for k, v in ref["optimizer_defaults"].items() if k != "type"}


def test_lr_and_stage_every_iteration(ref, ours):
    assert len(ours.rows) == len(ref["rows"]) >= 30
    for i, (r, o) in enumerate(zip(ref["rows"], ours.rows, strict=True)):
        assert (o["epoch"], o["stage"]) == (r["epoch"], r["stage"]), i
        assert o["lr"] == pytest.approx(r["lr"], rel=1e-12, abs=0), i
    stages = [r["stage"] for r in ref["rows"]]
    assert stages[0] == 1 and stages[-1] == 2  # the switch happens inside the run


def test_losses_step_for_step(ref, ours):
    worst = {}
    for i, (r, o) in enumerate(zip(ref["rows"], ours.rows, strict=True)):
        for k in ("loss_cls", "loss_bbox", "loss"):
            rel = abs(o[k] - r[k]) / abs(r[k])
            worst[k] = max(worst.get(k, 0.0), rel)
            assert rel <= loss_tolerance(i), f"iteration {i} {k}: ours {o[k]!r}, MMDetection {r[k]!r} (rel {rel:.3g})"


def _compare(ref_digest: dict, state: dict[str, torch.Tensor], what: str, tol: float = WEIGHT_TOL) -> float:
    """Assert `state` matches MMDetection's digest; returns the worst relative difference."""
    want_all = unpack_digest(ref_digest)
    got_all = unpack_digest(digest(state, dtype=torch.float64))
    assert list(got_all) == list(want_all), what
    worst = 0.0
    for k, want in want_all.items():
        got = got_all[k]
        if not want.get("full", want.get("samples")).is_floating_point():
            assert torch.equal(got["full"], want["full"]), f"{what} {k}: {got['full']} vs MMDetection {want['full']}"
            continue
        part = "full" if "full" in want else "samples"
        if part == "samples":
            rel = abs(float(got["norm"]) - float(want["norm"])) / float(want["norm"])
            assert rel <= tol, f"{what} {k}: L2 norm {float(got['norm'])} vs MMDetection {float(want['norm'])}"
        scale = max(float(want[part].abs().max()), 1e-30)
        rel = float((got[part] - want[part].double()).abs().max()) / scale
        worst = max(worst, rel)
        assert rel <= tol, f"{what} {k}: max difference {rel:.3g} of the largest value ({scale:.3g})"
    return worst


def test_final_raw_weights(ref, ours):
    _compare(ref["raw"], ours.raw, "raw")


def test_final_ema_weights_and_buffers(ref, ours):
    # The EMA is compared as its difference from the raw weights: at these momenta (0.98 and more) it follows
    # them within 1e-6, so the weights alone hide the EMA rule behind the shared trajectory. The difference
    # shows it: which tensors are averaged (update_buffers=True: BN statistics too), how often a tensor under
    # several keys is (once per key: the head's shared convs, 3 times a step), with which momentum.
    assert ours.ema_steps == ref["ema_steps"] == len(ref["rows"])
    delta = {k: v.double() - ours.raw[k].double() if v.is_floating_point() else v for k, v in ours.ema.items()}
    # num_batches_tracked is the first update's (1), not the raw model's (36)
    assert int(unpack_digest(ref["ema_minus_raw"])["backbone.stem.0.bn.num_batches_tracked"]["full"]) == 1
    _compare(ref["ema_minus_raw"], delta, "EMA - raw", EMA_TOL)
