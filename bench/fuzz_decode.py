"""Coverage-guided fuzzing (atheris / libFuzzer) of the image decode path, `service.imaging.decode_image`.

    .venv/bin/python bench/fuzz_decode.py --seconds 120        # or: make fuzz
    .venv/bin/python bench/fuzz_decode.py --seconds 120 --no-merge   # leave tests/data/fuzz_corpus alone

The property: any bytes give either an H x W x 3 uint8 image within the pixel cap or an `ImageError`
(anything else, or a crash, is a finding; libFuzzer saves the input as `/tmp/rtmdet-fuzz/crash-*`).
The run starts from the kept corpus (tests/data/fuzz_corpus, seeded with small real JPEG/PNG/WebP/BMP
files), fuzzes in a scratch copy, then adds what libFuzzer kept (inputs that reached new coverage) to the
kept corpus, which tests/service/test_fuzz_corpus.py replays as regression tests on every `make test`.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CORPUS = REPO / "tests" / "data" / "fuzz_corpus"
SCRATCH = Path("/tmp/rtmdet-fuzz")
MAX_BYTES, MAX_PIXELS = 1 << 20, 2_000_000
MAX_LEN = 4096  # inputs stay small: the corpus is kept in git


def seed_files() -> dict[str, bytes]:
    import cv2
    import numpy as np
    from skimage import data

    photo = np.ascontiguousarray(cv2.resize(data.chelsea()[..., ::-1], (24, 16)))
    seeds = {f"seed{ext}": cv2.imencode(ext, photo)[1].tobytes() for ext in (".jpg", ".png", ".webp", ".bmp")}
    seeds["seed-gray.png"] = cv2.imencode(".png", photo[..., 0])[1].tobytes()
    seeds["seed-alpha.png"] = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA))[1].tobytes()
    return seeds


def one_input(data: bytes) -> None:
    from service.imaging import ImageError, decode_image

    try:
        img = decode_image(data, MAX_BYTES, MAX_PIXELS)
    except ImageError:
        return
    if not (img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3
            and 0 < img.shape[0] * img.shape[1] <= MAX_PIXELS):
        raise AssertionError(f"decode_image returned {img.dtype} {img.shape}")


def fuzz(libfuzzer_args: list[str]) -> None:
    """Runs in a child process: libFuzzer takes over the process and exits when done."""
    import atheris

    # Everything the decode path runs in Python, imported here so that it is instrumented (PIL loads its
    # format plugins lazily, which would otherwise happen outside this block and go unseen).
    with atheris.instrument_imports(include=["service.imaging", "PIL"]):
        from PIL import (  # noqa: F401
            BmpImagePlugin,
            Image,
            ImageFile,
            ImageOps,
            JpegImagePlugin,
            PngImagePlugin,
            TiffImagePlugin,
            WebPImagePlugin,
        )

        import service.imaging  # noqa: F401
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=120)
    p.add_argument("--no-merge", action="store_true", help="do not merge new inputs into tests/data/fuzz_corpus")
    p.add_argument("--libfuzzer", nargs=argparse.REMAINDER, default=[], help="raw libFuzzer arguments (internal)")
    args = p.parse_args()
    if args.libfuzzer:
        fuzz(args.libfuzzer)
        return 0
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in seed_files().items():
        if not (CORPUS / name).exists():
            (CORPUS / name).write_bytes(data)
    work = SCRATCH / "corpus"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(CORPUS, work)
    me = [sys.executable, str(Path(__file__).resolve()), "--libfuzzer"]
    run = subprocess.run([*me, str(work), f"-max_total_time={args.seconds}", f"-max_len={MAX_LEN}",
                          f"-artifact_prefix={SCRATCH}/", "-print_final_stats=1", "-rss_limit_mb=4096"])
    if run.returncode != 0:
        print(f"fuzz_decode: libFuzzer found a failure (exit {run.returncode}); see {SCRATCH}/crash-*",
              file=sys.stderr)
        return run.returncode
    if not args.no_merge:
        # The scratch corpus is what libFuzzer kept (inputs that reached new coverage, already reduced),
        # named by content hash; add the new ones. (libFuzzer's own -merge re-executes argv[0], which is
        # this script, not an executable, so it cannot run here.)
        added = 0
        for f in work.iterdir():
            if not (CORPUS / f.name).exists():
                shutil.copyfile(f, CORPUS / f.name)
                added += 1
        print(f"fuzz_decode: {added} new corpus inputs")
    print(f"fuzz_decode: no failure in {args.seconds} s; kept corpus: {len(list(CORPUS.iterdir()))} files in {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
