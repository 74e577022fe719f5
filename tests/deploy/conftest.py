"""Fixtures shared by the backend tests (ONNX in process, Triton): one seeded network and the real photos."""
import numpy as np
import pytest

from model.checkpoint import read_checkpoint
from model.nn.rtmdet import build_rtmdet
from tests.service.svc_helpers import make_test_checkpoint


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The service tests' deterministic 3-class RTMDet-tiny, in eval mode."""
    path = make_test_checkpoint(tmp_path_factory.mktemp("w") / "tiny3.pth")
    m = build_rtmdet("tiny", num_classes=3)
    m.load_state_dict(read_checkpoint(path)[0])
    return m.eval()


@pytest.fixture(scope="module")
def photos():
    """Real photos in BGR: a large one, a small crop, and a third size."""
    from skimage import data

    return [np.ascontiguousarray(im[..., ::-1]) for im in (data.astronaut(), data.coffee()[:300, :200], data.chelsea())]
