"""Suite-wide environment, set before anything imports torch.

The suite runs the test process and real server subprocesses side by side on a small machine. With
OpenMP's default spin-waiting, two torch processes that each want both cores slow each other down
by up to 10x (measured here: a tiny forward took 2.2 s instead of 0.23 s). Passive waiting
costs nothing when a process has the cores to itself, so the tests and every server they start
(which inherit this environment) wait passively.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
