"""The frozen start-up heap (RTMDET_FREEZE_HEAP, service/heap.py): garbage collected first, what is alive frozen,
the models (loaded after it) still collectable; and the real server's /metrics says how many objects it froze."""
from __future__ import annotations

import gc
import re
import weakref

import httpx
import pytest
from svc_helpers import make_variant_checkpoint

from service import heap
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.settings import ModelSpec, ServiceSettings


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def thawed():
    """Every test starts and ends with nothing frozen (the rest of the test process expects CPython's default)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freezing_collects_first_and_freezes_what_is_alive():
    garbage, kept = Node(), Node()
    gone, alive = weakref.ref(garbage), weakref.ref(kept)
    del garbage  # cyclic garbage made before the call: collected, not frozen for ever
    frozen = heap.freeze_startup_objects()
    assert gone() is None and alive() is kept
    # Frozen objects are still freed by reference counting (the call's own temporaries, other threads of this
    # test process), so the count can only have fallen since, and only by a few.
    assert frozen > 1000 and 0 <= frozen - gc.get_freeze_count() < frozen // 100
    del kept
    gc.collect()
    assert alive() is not None  # frozen: the collector no longer looks at it (what the freeze is for)


def test_models_loaded_after_the_freeze_stay_collectable(checkpoint, tmp_path):
    """The freeze comes before the models load, so a retired version's reference cycles are still freed."""
    heap.freeze_startup_objects()
    settings = ServiceSettings(weights=checkpoint, input_size=96, max_batch_size=2, device="cpu", warmup=False)
    reg = ModelRegistry(settings, ServiceMetrics(),
                        [ModelSpec(name="m", weights=checkpoint, input_size=96, device="cpu", accelerate="eager")])
    try:
        reg.load_all()
        old = reg.slot("m").current
        old.detector.cycle = Node()  # garbage once the old version is gone, and only the collector frees it
        gone = weakref.ref(old.detector.cycle)
        reg.reload("m", make_variant_checkpoint(checkpoint, tmp_path / "other.pth"))
        assert old.wait_closed(30)
        del old
        gc.collect()
        assert gone() is None
    finally:
        reg.shutdown()


def test_the_server_reports_its_frozen_objects(server):
    text = httpx.get(f"{server.http}/metrics", timeout=30).text
    found = re.search(r"^rtmdet_gc_frozen_objects (\S+)$", text, re.M)
    assert found and float(found.group(1)) > 10_000
