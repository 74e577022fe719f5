"""Class-aware NMS on torchvision's kernel, without importing the torchvision package.

`import torchvision` imports all of torchvision: its models, datasets and transforms, and (through
`ops.roi_align`) `torch._dynamo` with sympy. On the 2-core development machine that is 4.2 s on top of
torch's own 4.4 s, paid by every `rtmdet serve`, `rtmdet detect` and worker process, while inference needs one
kernel from it. The kernel lives in torchvision's compiled library, which registers `torch.ops.torchvision.nms`
when it is loaded; this module loads only that library. If the library is not where this torchvision keeps it
(another torchvision release may name it differently), it falls back to importing `torchvision.ops`, which
loads it too.

`batched_nms` decides as `torchvision.ops.batched_nms` does: greedy NMS within each group (`idxs`), kept indices
by descending score. With many boxes on the CPU it runs NMS per group (cheaper than one call over all); otherwise
one call over boxes shifted so that different groups never overlap.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

# torchvision's own switch points between its two ways, in boxes.numel() (4 x the box count).
PER_GROUP_ABOVE_CPU, PER_GROUP_ABOVE_GPU = 4000, 20000
_LIBRARY = "_C_stable"  # torchvision 0.29's name for its ops library

_loaded = False


def _load_kernel() -> None:
    global _loaded
    if _loaded:
        return
    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [p for d in folders for p in sorted(Path(d).glob(f"{_LIBRARY}.*")) if p.suffix in (".so", ".pyd", ".dylib")]
    try:
        if not found:
            raise OSError(f"no {_LIBRARY} library in {folders}")
        torch.ops.load_library(str(found[0]))
    except OSError:
        import torchvision.ops  # noqa: F401  (registers the kernel, the long way)
    _loaded = True


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes (x1, y1, x2, y2) greedy NMS keeps, by descending score."""
    _load_kernel()
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by NMS run separately within each value of `idxs`, by descending score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() > (PER_GROUP_ABOVE_CPU if boxes.device.type == "cpu" else PER_GROUP_ABOVE_GPU):
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for group in torch.unique(idxs).tolist():
            members = torch.where(idxs == group)[0]
            keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    # One call: shift each group by more than the largest coordinate, so boxes of two groups never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
