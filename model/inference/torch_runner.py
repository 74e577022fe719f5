"""The in-process PyTorch runner: normalise on the device, then the network (eager, oneDNN or CUDA graphs).

The speed-ups themselves live in `model.inference.accelerate`; this only puts them behind the Runner protocol.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from model.inference.accelerate import CudaGraphRunner, build_runner, resolve_mode
from model.inference.preprocess import Normalizer
from model.inference.runner import HeadOutputs, NetworkInfo, blank_batch
from model.nn.rtmdet import RTMDet, fused_for_inference


class TorchRunner:
    """An RTMDet module on a device, in float32 or float16, optionally channels_last and accelerated."""

    def __init__(self, model: RTMDet, class_names: Sequence[str], device: torch.device, fp16: bool = False,
                 fuse: bool = True, channels_last: bool | None = None, accelerate: str = "auto",
                 weights_sha256: str | None = None, input_size: int | None = None) -> None:
        self.device = device
        self.fp16 = bool(fp16 and device.type == "cuda")
        self.dtype = torch.float16 if self.fp16 else torch.float32
        # channels_last helps oneDNN's CPU convolutions too (RTMDet-tiny, 1 thread: 202 ms vs 230 ms NCHW).
        self.channels_last = True if channels_last is None else channels_last
        self.accelerate = resolve_mode(accelerate, device)
        if self.accelerate == "cudagraph":
            torch.backends.cudnn.benchmark = True  # shapes are fixed per captured bucket: let cuDNN time kernels
        net = fused_for_inference(model) if fuse else model.eval()
        net = net.to(device, dtype=self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.network = net.eval()
        self.normalize = Normalizer(device, self.dtype, self.channels_last)
        self._engine = None  # built on the first forward, when the input shape is known
        self.info = NetworkInfo(size=model.size, class_names=tuple(class_names), backend="torch",
                                device=str(device), dtype=str(self.dtype).replace("torch.", ""),
                                strides=tuple(model.bbox_head.strides), input_size=input_size,
                                weights_sha256=weights_sha256, accelerate=self.accelerate)

    def with_input_size(self, input_size: int) -> None:
        self.info = replace(self.info, input_size=input_size)

    def _graphs(self) -> CudaGraphRunner:
        if self._engine is None:
            self._engine = CudaGraphRunner(lambda u8: self.network(self.normalize(u8)))
        return self._engine

    @torch.inference_mode()
    def forward(self, batch_uint8: torch.Tensor) -> HeadOutputs:
        if self.accelerate == "cudagraph":
            return HeadOutputs(*self._graphs()(batch_uint8.to(self.device, non_blocking=True)))
        x = self.normalize(batch_uint8)
        if self._engine is None:
            self._engine = build_runner(self.network, self.accelerate, self.device, x)
        cls, reg = self._engine(x)
        return HeadOutputs(list(cls), list(reg))

    def warmup(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Each batch size once (twice for TorchScript's shape profiling); on CUDA the sizes become the
        graph buckets."""
        if self.accelerate == "cudagraph":
            self._graphs().buckets = sorted(set(batch_sizes))
        repeats = 2 if self.accelerate == "onednn" else 1
        for b in batch_sizes:
            batch = blank_batch(b, input_size)
            for _ in range(repeats):
                self.forward(batch)

    def is_ready(self) -> bool:
        return True

    def close(self) -> None:
        self._engine = None
        self.network = None
