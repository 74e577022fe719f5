"""Suite-wide environment, set before anything imports torch.

The suite runs the test process and real server subprocesses side by side on a small machine. With
OpenMP's default spin-waiting, two torch processes that each want both cores slow each other down
by up to 10x (measured here: a tiny forward took 2.2 s instead of 0.23 s). Passive waiting
costs nothing when a process has the cores to itself, so the tests and every server they start
(which inherit this environment) wait passively.
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_auto_choices():
    """Each test measures `auto` for itself: a choice remembered from another test's network of the same shapes
    (model.inference.runner_choice) would make a test's outcome depend on which ran before it."""
    yield
    runner_choice = sys.modules.get("model.inference.runner_choice")  # a test that never loaded it has none
    if runner_choice is not None:
        runner_choice.forget_choices()
