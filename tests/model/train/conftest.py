"""Fixtures shared by the training tests."""
import pytest

from model.data.shapes import make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 training and 2 validation images of the synthetic shapes set, 96 px: small enough for CPU epochs."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 8, 2, seed=11, img_size=96)
    return root
