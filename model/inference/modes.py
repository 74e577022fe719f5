"""The names of the runners `accelerate=` picks from (model.inference.accelerate says what each one is).

Apart from accelerate.py because the command line offers them as choices, and must not import torch to do so.
"""
from __future__ import annotations

# Reduced precision (model.inference.low_precision): by name only, never a candidate of `auto`.
LOW_PRECISION_MODES = ("openvino-bf16", "openvino-int8")
MODES = ("auto", "eager", "inductor", "onnxruntime", "openvino", "torchscript", "cudagraph", *LOW_PRECISION_MODES)
# The runners that run the network's ONNX export (its input shape is fixed when it is exported).
EXPORTED_MODES = ("onnxruntime", "openvino", *LOW_PRECISION_MODES)
CPU_MODES = ("eager", "inductor", "onnxruntime", "openvino", "torchscript", *LOW_PRECISION_MODES)
ALIASES = {"onednn": "torchscript"}
