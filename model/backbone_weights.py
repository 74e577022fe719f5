"""Initialise an RTMDet's CSPNeXt backbone from ImageNet-pretrained weights, as the official tiny and s configs do
(`init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=...)`).

The official files are classifier checkpoints: `state_dict` holds `backbone.*` (the CSPNeXt, in the detector's own
key layout) and `head.*` (the ImageNet classifier), plus `meta`. A bare backbone state_dict (keys `stem.*`,
`stage1.*`, ...) works too, and so does a whole detector checkpoint (its neck and head are ignored).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from model.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint

PREFIX = "backbone."


@dataclass(frozen=True)
class BackboneLoad:
    path: Path
    loaded: int  # backbone tensors copied
    ignored: list[str]  # keys outside `backbone.` (the classifier's, or a detector's neck and head)

    def describe(self) -> str:
        shown = ", ".join(self.ignored[:3]) + (", ..." if len(self.ignored) > 3 else "")
        extra = f"; ignored {len(self.ignored)} non-backbone tensors ({shown})" if self.ignored else ""
        return f"backbone initialised from {self.path}: {self.loaded} tensors{extra}"


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> BackboneLoad:
    """Copy the backbone tensors of `path` (read with weights_only) strictly into `model.backbone`: a missing,
    unexpected or mis-shaped backbone key is a CheckpointError naming it; keys outside `backbone.` are ignored."""
    state, _ = read_checkpoint(path)
    if any(k.startswith(PREFIX) for k in state):
        ignored = [k for k in state if not k.startswith(PREFIX)]
        state = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    else:  # a bare backbone state_dict
        ignored = []
        state = {PREFIX + k: v for k, v in state.items()}
    # Check against a holder whose only child is the backbone, so errors name the keys as the file spells them.
    holder = nn.Module()
    holder.backbone = model.backbone
    try:
        load_state_dict_strict(holder, state, source=f"{path} (backbone weights)")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (want a CSPNeXt-{getattr(model, 'size', '?')} backbone)") from None
    return BackboneLoad(Path(path), len(state), ignored)
