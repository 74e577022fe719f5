"""The model zoo by name: official MMDetection RTMDet COCO checkpoints and CSPNeXt ImageNet backbones.

`resolve_weights("rtmdet-s")` returns the path of the cached official file, downloading it once into
`$RTMDET_HOME` (default `~/.cache/rtmdet`). A download goes to `<file>.part` in the cache folder (resumed with an
HTTP Range request when a previous attempt was cut off), is fsynced and checked against the table's sha256, and
only then renamed onto its final name: the final name never holds an unverified byte. A cached file is used with
no network at all. `$RTMDET_ZOO_URL` replaces the download server (a mirror, or a local server in tests).

Anything that is not a zoo name (or is an existing file of that name) is returned as a plain path.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model.errors import CheckpointError

DEFAULT_BASE_URL = "https://download.openmmlab.com/mmdetection/v3.0/rtmdet/"
BASE_URL_ENV = "RTMDET_ZOO_URL"
HOME_ENV = "RTMDET_HOME"


class ZooError(CheckpointError):
    """A zoo file that cannot be had: unknown name, no network and no cached copy, or a failed hash check."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "detector" (a whole RTMDet trained on COCO) or "backbone" (an ImageNet CSPNeXt classifier)
    size: str
    path: str  # relative to the base URL
    # The full sha256 where a published record of it was found, else the 8 hex digits the file name carries
    # (MMDetection names its releases `<name>-<first 8 hex digits of the sha256>.pth`).
    sha256: str

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        return base.rstrip("/") + "/" + self.path

    def matches(self, digest: str) -> bool:
        return digest == self.sha256 if len(self.sha256) == 64 else digest.startswith(self.sha256)


def _detector(size: str, stamp: str, sha256: str) -> ZooEntry:
    config = f"rtmdet_{size}_8xb32-300e_coco"
    return ZooEntry(f"rtmdet-{size}", "detector", size, f"{config}/{config}_{stamp}.pth", sha256)


def _backbone(size: str, file: str, sha256: str) -> ZooEntry:
    return ZooEntry(f"cspnext-{size}-imagenet", "backbone", size, f"cspnext_rsb_pretrain/{file}", sha256)


# URLs from MMDetection's configs/rtmdet/README.md and metafile.yml (detectors) and
# configs/rtmdet/classification/README.md (backbones). Full sha256 digests for tiny, s and m are the ones recorded
# by third-party download scripts; each starts with the 8 hex digits of the official file name, so they agree with
# the publisher. For l, x and the backbones no full digest was found: the file name's prefix is the check.
# The official tiny/s configs point `init_cfg` at `cspnext-{tiny,s}_imagenet_600e.pth` in the same folder, an alias
# of the hash-named release listed in the classification README; the hash-named one is used so it can be checked.
ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    _detector("tiny", "20220902_112414-78e30dcc",
              "78e30dcce0c6f594eaff0d6977b84b4103688b4aff0ad1aa16008a8cc854a7fb"),
    _detector("s", "20220905_161602-387a891e", "387a891e157cf0ab57d76b3ffc17bf77247089d672532427930b3140f9e789d6"),
    _detector("m", "20220719_112220-229f527c", "229f527ca88498e8894a778a62a878a322b4a3ea2cae09ea537d34b7e907792b"),
    _detector("l", "20220719_112030-5a0be7c4", "5a0be7c4"),
    _detector("x", "20220715_230555-cc79b9ae", "cc79b9ae"),
    _backbone("tiny", "cspnext-tiny_imagenet_600e-3a2dd350.pth", "3a2dd350"),
    _backbone("s", "cspnext-s_imagenet_600e-ea671761.pth", "ea671761"),
    _backbone("m", "cspnext-m_8xb256-rsb-a1-600e_in1k-ecb3bbd9.pth", "ecb3bbd9"),
    _backbone("l", "cspnext-l_8xb256-rsb-a1-600e_in1k-6a760974.pth", "6a760974"),
    _backbone("x", "cspnext-x_8xb256-rsb-a1-600e_in1k-b3f78edd.pth", "b3f78edd"),
)}


def cache_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "rtmdet")


def zoo_entry(spec: str | os.PathLike | None, zoo: Mapping[str, ZooEntry] | None = None) -> ZooEntry | None:
    """The zoo entry `spec` names, or None for a path (an existing file wins over a zoo name)."""
    if spec is None:
        return None
    entry = (ZOO if zoo is None else zoo).get(str(spec))
    return None if entry is None or Path(spec).is_file() else entry


def zoo_size(spec: str | os.PathLike | None, zoo: Mapping[str, ZooEntry] | None = None) -> str | None:
    """The RTMDet size a zoo name implies (`rtmdet-s` -> `s`), None for a path."""
    entry = zoo_entry(spec, zoo)
    return entry.size if entry is not None else None


def resolve_weights(spec: str | os.PathLike, kind: str | None = None, size: str | None = None, *,
                    zoo: Mapping[str, ZooEntry] | None = None, base_url: str | None = None, cache: Path | None = None,
                    progress: bool = True, timeout_s: float = 30.0) -> Path:
    """A weights argument as a local path: a zoo name becomes its cached (downloaded if need be) file; anything
    else is returned as a path. `kind="detector"` refuses backbone names (they hold no neck or head); `size`
    refuses names of another RTMDet size, before anything is downloaded."""
    entry = zoo_entry(spec, zoo)
    if entry is None:
        return Path(spec)
    if kind == "detector" and entry.kind != "detector":
        raise ZooError(f"{entry.name} is an ImageNet backbone, not a detector: use it with --backbone-weights")
    if size is not None and entry.size != size:
        raise ZooError(f"{entry.name} is for RTMDet-{entry.size}, not RTMDet-{size}: use --size {entry.size}")
    return fetch(entry, base_url=base_url, cache=cache, progress=progress, timeout_s=timeout_s)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(entry: ZooEntry, base_url: str | None = None, cache: Path | None = None, progress: bool = True,
          timeout_s: float = 30.0, attempts: int = 3, retry_delay_s: float = 1.0,
          lock_timeout_s: float = 3600.0) -> Path:
    """The verified local copy of `entry`, downloaded if the cache does not hold it."""
    folder = cache or cache_dir()
    final = folder / entry.filename
    if final.is_file():  # no network: a cached file is all it takes
        return _checked_cached(entry, final)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create the weights cache {folder} ({exc}); point ${HOME_ENV} elsewhere") from None
    # One download per file at a time (torchrun ranks, parallel jobs); the others wait, then find it cached.
    with _FileLock(folder / (entry.filename + ".lock"), lock_timeout_s):
        if final.is_file():
            return _checked_cached(entry, final)
        _download_verified(entry, entry.url(base_url), folder, final, progress, timeout_s, attempts, retry_delay_s)
    return final


def _checked_cached(entry: ZooEntry, path: Path) -> Path:
    digest = sha256_of(path)
    if not entry.matches(digest):
        # Our own downloads land only after the check, so this is a file put there by hand or damaged since.
        raise ZooError(f"{path}: sha256 {digest[:16]}... does not match {entry.name} ({entry.sha256[:16]}...); "
                       f"delete it to download it again")
    return path


def _download_verified(entry: ZooEntry, url: str, folder: Path, final: Path, progress: bool, timeout_s: float,
                       attempts: int, retry_delay_s: float) -> None:
    part = folder / (entry.filename + ".part")
    for attempt in range(1, attempts + 1):
        try:
            resumed = _download(url, part, progress, timeout_s)
        except _Offline as exc:
            raise ZooError(f"cannot download {entry.name} from {url} ({exc}); put {entry.filename} into "
                           f"{folder} (sha256 {entry.sha256[:16]}...), or set ${HOME_ENV}/${BASE_URL_ENV}") from None
        except _Interrupted as exc:
            if attempt == attempts:
                raise ZooError(f"download of {entry.name} from {url} kept failing ({exc}); {part.stat().st_size} "
                               f"bytes are kept in {part} and the next run resumes from there") from None
            print(f"download of {entry.name} interrupted ({exc}); resuming", file=sys.stderr, flush=True)
            time.sleep(retry_delay_s * attempt)
            continue
        digest = sha256_of(part)
        if entry.matches(digest):
            os.replace(part, final)
            _fsync_dir(folder)
            if progress:
                print(f"downloaded {entry.name} to {final} (sha256 {digest[:16]}... checked)", file=sys.stderr)
            return
        part.unlink()
        if resumed and attempt < attempts:
            # The kept part may come from an older, different file on the server, or be damaged: start over.
            continue
        raise ZooError(f"{url}: downloaded file has sha256 {digest[:16]}..., expected {entry.sha256[:16]}... for "
                       f"{entry.name}; deleted it")


class _Offline(Exception):
    """The server cannot be reached at all (or answers with an error status)."""


class _Interrupted(Exception):
    """The connection broke after the download started; what arrived is kept in the .part file."""


def _download(url: str, part: Path, progress: bool, timeout_s: float) -> bool:
    """Append the rest of `url` to `part` (a Range request from its current size), fsync it. True when what
    `part` held before was kept (resumed), False when the file came whole."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past what we have: the part may be complete, let the hash say
            return True
        raise _Offline(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Offline(str(reason)) from None
    with response:
        if response.status != 206:  # the server sent the whole file: start the part over
            have = 0
        elif not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            part.unlink()
            raise _Interrupted(f"server resumed at {response.headers.get('Content-Range')!r}, not byte {have}")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        from tqdm import tqdm

        with part.open("r+b" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                file=sys.stderr, disable=not progress, leave=False) as bar:
            f.seek(have)
            f.truncate()
            got = 0
            try:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:  # reset connection, timeout, IncompleteRead
                f.flush()
                os.fsync(f.fileno())
                raise _Interrupted(f"{type(exc).__name__} after {have + got} bytes") from None
            f.flush()
            os.fsync(f.fileno())
        if length is not None and got != int(length):
            raise _Interrupted(f"connection closed after {have + got} of {total} bytes")
    return have > 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileLock:
    """An exclusive flock on `path`, waited for at most `timeout_s` (the holder may be mid-download)."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path, self.timeout_s = path, timeout_s
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise ZooError(f"{self.path}: another process is still downloading after "
                                   f"{self.timeout_s:.0f} s") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
