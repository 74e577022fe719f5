#!/usr/bin/env python3
"""Wheels for running `bench/gpu_check.py` on a lent GPU machine that has no network.

That machine's image (Python 3.12, PyTorch with CUDA, OpenCV, NumPy, httpx, prometheus-client, ONNX Runtime and
many more; it cannot fetch anything) lacks the server's web stack: FastAPI, uvicorn, pydantic-settings, the gRPC
health/reflection services, OpenTelemetry. This downloads, for CPython 3.12 on manylinux x86-64, the serve extra's
pins from pyproject.toml and everything they need, then drops the wheels of projects the image already holds, so
what travels stays small (`--keep` names those to carry anyway: grpcio and protobuf by default, because the
generated gRPC code wants at least the versions it was generated with).

    python3 tools/device_kit.py [--dest .whl]          # here, with the package registry
    bash tools/device_gpu_check.sh                     # there, with `.whl` carried (see the README's GPU section)
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Projects the GPU image holds (its package list as read on 2026-11-17; torch is its own CUDA build and must not
# be shadowed). Only names this project's dependency closure can reach are listed.
ON_THE_IMAGE = frozenset({
    "torch", "torchvision", "numpy", "opencv-python-headless", "pillow", "pyyaml", "safetensors", "tqdm",
    "httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio", "prometheus-client", "typing-extensions",
    "click", "uvloop", "packaging", "setuptools", "onnx", "onnxruntime", "onnxscript", "requests", "urllib3",
    "charset-normalizer", "zipp", "wrapt", "markupsafe", "jinja2", "pyparsing", "psutil",
})
NOT_NEEDED = frozenset({"grpcio-tools"})  # compiles .proto files; the generated code is in the repository
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def project_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def wheel_project(path: Path) -> str:
    return path.name.split("-", 1)[0].lower().replace("_", "-")


def requirements(keep: set[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["optional-dependencies"]["serve"], *project["dependencies"]]
    return [r for r in wanted if project_name(r) not in NOT_NEEDED
            and (project_name(r) not in ON_THE_IMAGE or project_name(r) in keep)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--python-version", default="3.12", help="the image's Python (3.11 to rehearse here)")
    ap.add_argument("--keep", nargs="*", default=["grpcio", "protobuf"],
                    help="projects to carry even though the image holds one (its version may be too old)")
    args = ap.parse_args()
    keep = {k.lower() for k in args.keep}
    reqs = requirements(keep)
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
               "--python-version", args.python_version, "--implementation", "cp", *platforms, "-d", tmp, *reqs]
        subprocess.run(cmd, check=True, timeout=900)
        args.dest.mkdir(parents=True, exist_ok=True)
        for old in args.dest.glob("*.whl"):
            old.unlink()
        carried, left = [], []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = wheel_project(wheel)
            if name in ON_THE_IMAGE and name not in keep:
                left.append(name)
                continue
            shutil.copy2(wheel, args.dest / wheel.name)
            carried.append(wheel)
    size = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"{len(carried)} wheels, {size / 2**20:.1f} MiB in {args.dest} (left to the image: {', '.join(left)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
