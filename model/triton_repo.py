"""A Triton Inference Server model repository around an exported RTMDet ONNX file, ready to mount.

Layout: `<repo>/<name>/config.pbtxt` and `<repo>/<name>/1/model.onnx`. With `backend="python"` the
version folder also gets `model.py` (`model/triton_python_model.py`), which runs the same ONNX file
with onnxruntime inside Triton's Python backend, for Triton builds without the onnxruntime backend.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

TRITON_BACKENDS = ("onnxruntime", "python")


@dataclass(frozen=True)
class TritonModelConfig:
    """What goes into `config.pbtxt`; the model file itself must have a dynamic batch axis."""

    name: str = "rtmdet"
    backend: str = "onnxruntime"  # or "python": a Python-backend model that runs onnxruntime itself
    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_queue_delay_us: int = 2000
    instance_kind: str = "KIND_GPU"  # KIND_CPU for a CPU-only server
    instance_count: int = 1


def _dtype_name(onnx_elem_type: int) -> str:
    import onnx

    return {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32",
            onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64"}[onnx_elem_type]


def _io_specs(onnx_path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, triton dtype, dims without the batch axis) for inputs and outputs; requires a dynamic batch."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def specs(values) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if not dims or dims[0].dim_param == "" and dims[0].dim_value != 0:
                raise ValueError(f"{onnx_path}: {v.name} has no dynamic batch axis; export with --dynamic-batch")
            out.append((v.name, _dtype_name(v.type.tensor_type.elem_type),
                        [d.dim_value if d.dim_value > 0 else -1 for d in dims[1:]]))
        return out

    return specs(graph.input), specs(graph.output)


def _metadata(onnx_path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def _pbtxt_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def triton_config_pbtxt(onnx_path: str | os.PathLike, cfg: TritonModelConfig) -> str:
    """The model configuration. The ONNX file's `rtmdet.*` metadata (classes, size, strides, layout) goes
    into `parameters`, where a client reads it back with the model config: Triton does not expose ONNX metadata."""
    inputs, outputs = _io_specs(Path(onnx_path))
    params = dict(_metadata(Path(onnx_path)))
    if cfg.backend == "python":
        params["onnx_file"] = "model.onnx"  # the Python-backend model finds its ONNX file next to model.py

    def block(kind: str, specs) -> str:
        items = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ {", ".join(map(str, d))} ] }}'
                           for n, t, d in specs)
        return f"{kind} [\n{items}\n]"

    preferred = [b for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size]
    lines = [
        f'name: "{cfg.name}"',
        f'backend: "{cfg.backend}"',
        f"max_batch_size: {cfg.max_batch_size}",
        block("input", inputs),
        block("output", outputs),
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else "",
        f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind} }} ]",
    ]
    lines += [f"parameters {{ key: {_pbtxt_string(k)} value: {{ string_value: {_pbtxt_string(v)} }} }}"
              for k, v in sorted(params.items())]
    return "\n".join(line for line in lines if line) + "\n"


def write_triton_repository(onnx_path: str | os.PathLike, repo: str | os.PathLike,
                            cfg: TritonModelConfig = TritonModelConfig()) -> Path:
    """`repo/<name>/config.pbtxt` and `repo/<name>/1/model.onnx` (plus `model.py` for the Python backend)."""
    if cfg.backend not in TRITON_BACKENDS:
        raise ValueError(f"unknown Triton backend {cfg.backend!r}; choose one of {', '.join(TRITON_BACKENDS)}")
    model_dir = Path(repo) / cfg.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    config = triton_config_pbtxt(onnx_path, cfg)
    if Path(onnx_path).resolve() != (version_dir / "model.onnx").resolve():
        shutil.copyfile(onnx_path, version_dir / "model.onnx")
    if cfg.backend == "python":
        shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), version_dir / "model.py")
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir
