"""RTMDET_BACKEND=torch: the checkpoint loaded strictly into the RTMDet module, run in-process."""
from __future__ import annotations

from model.checkpoint import CheckpointError
from model.classes import COCO_CLASSES
from model.inference.detector import AUTO_CANDIDATES, file_sha256, load_torch_network, resolve_device
from model.inference.torch_runner import TorchRunner
from service.errors import BackendUnavailable
from service.settings import ModelSpec


def build(spec: ModelSpec) -> TorchRunner:
    try:
        from model.zoo import resolve_weights

        weights = resolve_weights(spec.weights, kind="detector", size=spec.size)
        network, names, meta = load_torch_network(weights, spec.size, spec.class_names, spec.weights_key)
        if spec.num_classes is not None and network.num_classes != spec.num_classes:
            raise ValueError(f"{spec.weights}: the checkpoint has {network.num_classes} classes; model "
                             f"{spec.name!r} is pinned to {spec.num_classes}")
        if names is not None and len(names) != network.num_classes:
            raise ValueError(f"{len(names)} class names for a model with {network.num_classes} classes")
        return TorchRunner(network, names or list(COCO_CLASSES), resolve_device(spec.device), fp16=spec.fp16,
                           accelerate=spec.accelerate, calibration=spec.calibration,
                           auto_candidates=spec.auto_candidates or AUTO_CANDIDATES,
                           auto_choices_file=spec.auto_choices_file, sparse_regression=spec.sparse_regression,
                           any_canvas=spec.canvas == "tight",
                           weights_sha256=file_sha256(weights),
                           input_size=int(meta.get("img_size", 640)))
    except (CheckpointError, ValueError, OSError) as exc:
        raise BackendUnavailable(str(exc)) from None
