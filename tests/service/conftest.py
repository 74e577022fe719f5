"""Real servers for the service tests: `rtmdet serve` subprocesses on 127.0.0.1 with free ports."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from svc_helpers import API_KEY, REPO, ServerProcess, bgr, make_test_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_test_checkpoint(tmp_path_factory.mktemp("weights") / "tiny3.pth")


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """The shared server: API key on, 1 MiB upload cap, 2 Mpx pixel cap, batches of up to 8. An admin key that no
    test sends, so nothing (schemathesis included) can reload or unload the model other tests use."""
    srv = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "server.log", RTMDET_API_KEY=API_KEY,
                        RTMDET_ADMIN_KEY="not-sent-by-any-test",
                        RTMDET_MAX_UPLOAD_BYTES=str(1024 * 1024), RTMDET_MAX_IMAGE_PIXELS="2000000",
                        RTMDET_MAX_BATCH_SIZE="8", RTMDET_MAX_QUEUE_DELAY_MS="10", RTMDET_MAX_QUEUE_SIZE="256")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos, BGR, kept small so tests stay fast."""
    from skimage import data

    return {"astronaut": cv2.imread(str(REPO / "examples" / "astronaut.jpg")),
            "chelsea": bgr(data.chelsea()), "coffee": cv2.resize(bgr(data.coffee()), (300, 200))}


