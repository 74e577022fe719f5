"""Build MMDetection 3.3.0's own RTMDet from its bundled config; imported only inside the MMDetection venv.

mmcv-lite ships no compiled ops and RTMDet's forward, loss and backward need none, so `mmcv._ext` is replaced
by a module whose ops raise if anything ever calls one (as ../shared/tools/mmdet_ref.py does).
"""
import glob
import os
import sys
import types


class _NoCompiledOps(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv compiled op {name} is not available here")
        return op


def official_config(size: str):
    """MMDetection's packaged `rtmdet_{size}_8xb32-300e_coco.py` as an mmengine Config (mmdet's modules registered)."""
    sys.modules.setdefault("mmcv._ext", _NoCompiledOps("mmcv._ext"))
    import mmdet
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules(init_default_scope=True)
    cfg_dir = glob.glob(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "rtmdet"))[0]
    return Config.fromfile(os.path.join(cfg_dir, f"rtmdet_{size}_8xb32-300e_coco.py"))


def build_mmdet_rtmdet(size: str, num_classes: int | None = None):
    """The RTMDet detector of `rtmdet_{size}_8xb32-300e_coco.py`, randomly initialised (no download)."""
    cfg = official_config(size)
    from mmdet.registry import MODELS

    if num_classes is not None:
        cfg.model.bbox_head.num_classes = num_classes
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model)
