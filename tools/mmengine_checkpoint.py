#!/usr/bin/env python3
"""Check `model.checkpoint` on a training checkpoint written by the real mmengine Runner (with EMAHook).

    .venv/bin/python tools/mmengine_checkpoint.py [--work /tmp/mmengine-ckpt]

Needs the MMDetection 3.3.0 virtual environment that ../shared/tools/mmdet_ref.py sets up ($MMDET_VENV, default
/tmp/mmdet-ref-venv); a developer tool, not part of the test suite (the tests build such files without
mmengine: tests/model/mmengine_files.py). In that environment it trains RTMDet-tiny (1 class) for two
iterations on random images with MMDetection's RTMDet optimiser, schedulers and ExpMomentumEMA, writes
`epoch_1.pth` as the Runner does, and saves mmengine's own reading of it (weights_only=False: a file this
script just wrote). Here it prints the globals that block `torch.load(weights_only=True)` and checks that
`read_checkpoint(..., "ema"/"raw")` gives exactly mmengine's `state_dict` / `ema_state_dict` tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VENV = os.environ.get("MMDET_VENV", "/tmp/mmdet-ref-venv")


def write_in_mmdet_venv(work_dir: str) -> None:
    """Runs inside the MMDetection environment: a two-iteration training run that writes epoch_1.pth."""
    import glob
    import types

    import numpy as np
    import torch

    class _NoCompiledOps(types.ModuleType):  # mmcv-lite has no compiled ops; training this net calls none
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            def op(*args, **kwargs):
                raise NotImplementedError(f"mmcv compiled op {name}")
            return op

    sys.modules.setdefault("mmcv._ext", _NoCompiledOps("mmcv._ext"))
    import mmengine.model.utils
    import mmengine.optim.optimizer.default_constructor
    import mmengine.utils.dl_utils.misc
    for module in (mmengine.model.utils, mmengine.optim.optimizer.default_constructor, mmengine.utils.dl_utils.misc):
        module.mmcv_full_available = lambda: False
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    register_all_modules(init_default_scope=True)
    cfg_dir = glob.glob(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "rtmdet"))[0]
    cfg = Config.fromfile(os.path.join(cfg_dir, "rtmdet_tiny_8xb32-300e_coco.py"))
    cfg.model.bbox_head.num_classes = 1
    cfg.model.backbone.init_cfg = None  # no download
    det = MODELS.build(cfg.model)

    class Net(BaseModel):  # RTMDet's modules under their own names, with a stand-in loss (no data pipeline)
        def __init__(self):
            super().__init__()
            self.backbone, self.neck, self.bbox_head = det.backbone, det.neck, det.bbox_head

        def forward(self, inputs, data_samples=None, mode="tensor"):
            cls, reg = self.bbox_head(self.neck(self.backbone(torch.stack(inputs))))
            return {"loss": sum(c.mean() for c in cls) + sum(r.abs().mean() for r in reg)}

    class Images(torch.utils.data.Dataset):
        metainfo = {"classes": ("shape",), "palette": [(220, 20, 60)]}

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"inputs": torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i))}

    runner = Runner(
        model=Net(), work_dir=work_dir, default_scope="mmdet", randomness=dict(seed=0),
        train_dataloader=dict(dataset=Images(), sampler=dict(type="DefaultSampler", shuffle=True), batch_size=2,
                              num_workers=0, collate_fn=dict(type="pseudo_collate")),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=0.004, weight_decay=0.05),
                           paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True)),
        param_scheduler=[dict(type="LinearLR", start_factor=1e-5, by_epoch=False, begin=0, end=1000),
                         dict(type="CosineAnnealingLR", eta_min=0.0002, begin=0, end=1, T_max=1, by_epoch=True,
                              convert_to_iter_based=True)],
        custom_hooks=[dict(type="EMAHook", ema_type="ExpMomentumEMA", momentum=0.0002, update_buffers=True,
                           priority=49)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)))
    runner.message_hub.update_info("best_score", np.float64(0.25))  # a numpy scalar, as an evaluation leaves
    runner.train()
    runner.train()
    # The reference reading: mmengine's own full unpickle of the file this run wrote a moment ago in its own
    # temporary folder, inside the MMDetection venv (never a file from elsewhere). The project's safe reader
    # (model/foreign_pickle.py) is then checked against exactly this.
    ck = torch.load(os.path.join(work_dir, "epoch_1.pth"), map_location="cpu", weights_only=False)
    torch.save({"state_dict": dict(ck["state_dict"]), "ema_state_dict": dict(ck["ema_state_dict"])},
               os.path.join(work_dir, "mmengine_reading.pt"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mmengine-ckpt")
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)  # the step run in the MMDet venv
    a = ap.parse_args()
    if a.write:
        write_in_mmdet_venv(a.work)
        return 0
    subprocess.run([os.path.join(VENV, "bin", "python"), os.path.abspath(__file__), "--write", "--work", a.work],
                   check=True)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from model.checkpoint import class_names_from_meta, read_checkpoint

    path = Path(a.work) / "epoch_1.pth"
    ref = torch.load(Path(a.work) / "mmengine_reading.pt", weights_only=True)
    ema, meta = read_checkpoint(path)
    raw, _ = read_checkpoint(path, "raw")
    ref_raw = {k[len("module."):]: v for k, v in ref["ema_state_dict"].items() if k.startswith("module.")}
    report = {
        "unsafe_globals": sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)),
        "ema_equal": ema.keys() == ref["state_dict"].keys() and all(torch.equal(ema[k], ref["state_dict"][k])
                                                                     for k in ema),
        "raw_equal": raw.keys() == ref_raw.keys() and all(torch.equal(raw[k], ref_raw[k]) for k in raw),
        "ema_differs_from_raw": sum(not torch.equal(ema[k], raw[k]) for k in ema),
        "classes": class_names_from_meta(meta), "epoch": meta.get("epoch"),
    }
    print(json.dumps(report))
    return 0 if report["ema_equal"] and report["raw_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
