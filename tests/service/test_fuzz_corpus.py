"""Regression tests from the atheris corpus (bench/fuzz_decode.py, `make fuzz`): every kept input, replayed
through the decoder, gives an image within the caps or an `ImageError`, never anything else."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.imaging import ImageError, decode_image

CORPUS = Path(__file__).resolve().parents[1] / "data" / "fuzz_corpus"
MAX_BYTES, MAX_PIXELS = 1 << 20, 2_000_000  # as in bench/fuzz_decode.py
FILES = sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []


def test_the_corpus_is_kept():
    assert len(FILES) >= 6  # at least the seeds; `make fuzz` adds what it finds


@pytest.mark.parametrize("path", FILES, ids=[p.name[:16] for p in FILES])
def test_corpus_input_decodes_or_is_refused(path):
    try:
        img = decode_image(path.read_bytes(), MAX_BYTES, MAX_PIXELS)
    except ImageError as exc:
        assert str(exc)
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 0 < img.shape[0] * img.shape[1] <= MAX_PIXELS
