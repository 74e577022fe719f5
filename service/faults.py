"""Injectable faults in the model step, for the reliability tests (never set in production).

`RTMDET_FAULT_INJECTION` (JSON, e.g. `{"oom_above_batch": 2}`) wraps the runner so that its `forward`
fails the way real hardware does, through the same code paths a real failure takes:

- `oom_above_batch: N`: a batch of more than N images raises `torch.OutOfMemoryError` (what CUDA raises
  when a batch does not fit), so the batcher's split-in-halves retry is exercised.
- `raise_trigger: PATH`: when PATH exists, the next forward deletes it and raises `RuntimeError`
  (a crashing kernel / driver error). A file, so that a test process can pick the moment.
- `hang_trigger: PATH`, `hang_s`: when PATH exists, the next forward deletes it and sleeps `hang_s`
  seconds before running (a stuck device), so the inference watchdog fires.

Triggers are one-shot files rather than counters because the test runs in another process than the
server and needs to choose which batch fails.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class FaultInjection(BaseModel):
    oom_above_batch: int | None = Field(None, ge=0)
    raise_trigger: Path | None = None
    hang_trigger: Path | None = None
    hang_s: float = Field(5.0, ge=0.0)


def _consume(trigger: Path | None) -> bool:
    if trigger is None:
        return False
    try:
        trigger.unlink()
    except FileNotFoundError:
        return False
    return True


class FaultInjectingRunner:
    """Delegates everything to the inner runner; only `forward` can fail."""

    def __init__(self, inner, faults: FaultInjection) -> None:
        self.inner = inner
        self.faults = faults
        self.forward_calls = 0
        log.warning("fault injection is ON: %s", faults.model_dump_json(exclude_none=True))

    def __getattr__(self, name):  # info, device, warmup, is_ready, close
        return getattr(self.inner, name)

    def forward(self, batch: torch.Tensor):  # -> the inner runner's outputs
        self.forward_calls += 1
        f = self.faults
        if _consume(f.hang_trigger):
            log.warning("injected hang: %.1f s", f.hang_s)
            time.sleep(f.hang_s)
        if _consume(f.raise_trigger):
            raise RuntimeError("injected fault: the model step raised")
        if f.oom_above_batch is not None and batch.shape[0] > f.oom_above_batch:
            import torch  # here: the settings import this module, and they must not load torch

            raise torch.OutOfMemoryError(
                f"injected out-of-memory: batch of {batch.shape[0]} > {f.oom_above_batch} images")
        return self.inner.forward(batch)
