"""Locating Debian's `prometheus` package tools; a missing tool fails the test (CI installs them)."""
from __future__ import annotations

import shutil


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: `apt-get install -y prometheus` (.ci/run does this)"
    return path
