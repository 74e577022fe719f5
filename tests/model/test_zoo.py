"""The model zoo against a real HTTP server on 127.0.0.1: a good download, a wrong hash refused and deleted, a
download cut off mid-body resumed (Range) or restarted, the cache used with no network, and the names wired into
the commands that take weights."""
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from model import zoo
from model.zoo import ZOO, ZooEntry, ZooError, fetch, resolve_weights

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class FileServer:
    """Serves `files` {url path: bytes}; honours `Range: bytes=N-` unless `ranges` is off; `cut_first` cuts the
    first `cut_first` GETs off halfway through the body (full Content-Length promised, then the socket closed)."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True, cut_first: int = 0) -> None:
        self.files, self.ranges, self.cut_left = files, ranges, cut_first
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.ranges:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                if server.cut_left > 0:
                    server.cut_left -= 1
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/rtmdet/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(FileServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def _entry(payload=PAYLOAD, sha256=None, name="rtmdet-tiny", size="tiny", kind="detector"):
    return ZooEntry(name, kind, size, f"cfg/{name}_file-{hashlib.sha256(payload).hexdigest()[:8]}.pth",
                    sha256 or hashlib.sha256(payload).hexdigest())


def _get(entry, url, cache):
    return fetch(entry, base_url=url, cache=cache, progress=False, retry_delay_s=0)


def _closed_port_url():
    s = FileServer({})
    url = s.url
    s.stop()
    return url


def test_table_names_urls_and_hash_prefixes():
    assert sorted(ZOO) == sorted([f"rtmdet-{s}" for s in ("tiny", "s", "m", "l", "x")]
                                 + [f"cspnext-{s}-imagenet" for s in ("tiny", "s", "m", "l", "x")])
    for entry in ZOO.values():
        # MMDetection names a release after the first 8 hex digits of its sha256: the table must agree with it
        assert entry.filename.endswith(f"-{entry.sha256[:8]}.pth"), entry
        assert len(entry.sha256) in (8, 64) and int(entry.sha256, 16) >= 0
        assert entry.url().startswith("https://download.openmmlab.com/mmdetection/v3.0/rtmdet/")
    assert ZOO["rtmdet-tiny"].url() == ("https://download.openmmlab.com/mmdetection/v3.0/rtmdet/rtmdet_tiny_8xb32-"
                                       "300e_coco/rtmdet_tiny_8xb32-300e_coco_20220902_112414-78e30dcc.pth")
    assert ZOO["cspnext-tiny-imagenet"].url().endswith("/cspnext_rsb_pretrain/cspnext-tiny_imagenet_600e-3a2dd350.pth")


def test_good_download_with_progress_then_cache_hit_without_network(tmp_path, server_factory, capsys):
    entry = _entry()
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD})
    path = fetch(entry, base_url=server.url, cache=tmp_path)
    assert path == tmp_path / entry.filename and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.filename, entry.filename + ".lock"]  # no .part
    err = capsys.readouterr().err
    assert entry.filename in err and f"downloaded rtmdet-tiny to {path}" in err  # tqdm's bar and a last line
    server.stop()
    # No network now: the cached file is all it takes (and nothing was requested again).
    assert fetch(entry, base_url=server.url, cache=tmp_path) == path
    assert len(server.requests) == 1


def test_prefix_only_hash_is_checked_too(tmp_path, server_factory):
    good = _entry(sha256=hashlib.sha256(PAYLOAD).hexdigest()[:8])
    server = server_factory(files={f"/rtmdet/{good.path}": PAYLOAD})
    assert _get(good, server.url, tmp_path).read_bytes() == PAYLOAD
    bad = ZooEntry(good.name, good.kind, good.size, "cfg/other.pth", "00000000")
    server.files["/rtmdet/cfg/other.pth"] = PAYLOAD
    with pytest.raises(ZooError, match="expected 00000000"):
        _get(bad, server.url, tmp_path)


def test_wrong_hash_is_refused_and_deleted(tmp_path, server_factory):
    entry = _entry(sha256=hashlib.sha256(b"the real file").hexdigest())
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD})
    with pytest.raises(ZooError, match="downloaded file has sha256 .* deleted it") as exc:
        _get(entry, server.url, tmp_path)
    assert "\n" not in str(exc.value)
    assert [p.name for p in tmp_path.iterdir()] == [entry.filename + ".lock"]  # no final file, no .part
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_range(tmp_path, server_factory, capsys):
    entry = _entry()
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD}, cut_first=1)
    path = _get(entry, server.url, tmp_path)
    assert path.read_bytes() == PAYLOAD
    path_on_server = f"/rtmdet/{entry.path}"
    assert server.requests == [(path_on_server, None), (path_on_server, f"bytes={len(PAYLOAD) // 2}-")]
    assert "interrupted" in capsys.readouterr().err


def test_interrupted_download_restarts_when_the_server_ignores_range(tmp_path, server_factory):
    entry = _entry()
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD}, ranges=False, cut_first=1)
    assert _get(entry, server.url, tmp_path).read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]  # asked; got 200; started over


def test_a_killed_download_leaves_nothing_trusted(tmp_path, server_factory):
    # What a killed process leaves: a .part (here of some other file's bytes). It is never taken for the file: the
    # resumed download fails the hash, the part is dropped, and a download from scratch succeeds.
    entry = _entry()
    (tmp_path / (entry.filename + ".part")).write_bytes(b"\xff" * 1000)
    assert zoo.zoo_entry(entry.name, {entry.name: entry}) == entry
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD})
    assert _get(entry, server.url, tmp_path).read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    # and the download that keeps failing keeps its part for the next run, under the .part name only
    other = _entry(payload=PAYLOAD[:-1])
    server.files[f"/rtmdet/{other.path}"] = PAYLOAD[:-1]
    server.cut_left = 3
    with pytest.raises(ZooError, match="kept failing .* the next run resumes"):
        _get(other, server.url, tmp_path)
    assert not (tmp_path / other.filename).exists() and (tmp_path / (other.filename + ".part")).is_file()
    assert _get(other, server.url, tmp_path).read_bytes() == PAYLOAD[:-1]


def test_offline_without_cache_says_where_to_put_the_file(tmp_path):
    entry = _entry()
    with pytest.raises(ZooError) as exc:
        _get(entry, _closed_port_url(), tmp_path / "cache")
    message = str(exc.value)
    assert "\n" not in message and f"put {entry.filename} into {tmp_path / 'cache'}" in message


def test_a_damaged_cached_file_is_refused(tmp_path):
    entry = _entry()
    (tmp_path / entry.filename).write_bytes(PAYLOAD[:-1])
    with pytest.raises(ZooError, match="does not match .* delete it"):
        fetch(entry, base_url=_closed_port_url(), cache=tmp_path)


def test_names_paths_env_and_checks(tmp_path, server_factory, monkeypatch):
    entry, backbone = _entry(), _entry(name="cspnext-s-imagenet", size="s", kind="backbone")
    table = {entry.name: entry, backbone.name: backbone}
    server = server_factory(files={f"/rtmdet/{entry.path}": PAYLOAD, f"/rtmdet/{backbone.path}": PAYLOAD})
    monkeypatch.setenv(zoo.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(zoo.BASE_URL_ENV, server.url)
    assert resolve_weights("rtmdet-tiny", zoo=table, progress=False) == tmp_path / "home" / entry.filename
    assert resolve_weights("some/file.pth", zoo=table) == Path("some/file.pth")  # a path stays a path
    with pytest.raises(ZooError, match="ImageNet backbone, not a detector"):
        resolve_weights("cspnext-s-imagenet", kind="detector", zoo=table)
    with pytest.raises(ZooError, match="for RTMDet-s, not RTMDet-tiny: use --size s"):
        resolve_weights("cspnext-s-imagenet", size="tiny", zoo=table)
    assert resolve_weights("cspnext-s-imagenet", size="s", zoo=table, progress=False).read_bytes() == PAYLOAD
    monkeypatch.chdir(tmp_path)
    Path("rtmdet-tiny").write_bytes(b"mine")  # an existing file of that name wins over the zoo
    assert resolve_weights("rtmdet-tiny", zoo=table) == Path("rtmdet-tiny")


# ------------------------------------------------------------------------------------------------ the commands
@pytest.fixture
def shapes_as_rtmdet_tiny(tmp_path, server_factory, monkeypatch):
    """The shipped shapes checkpoint served as zoo name `rtmdet-tiny` (the table's hash replaced by its own)."""
    weights = (REPO / "weights" / "rtmdet_tiny_shapes.pth").read_bytes()
    entry = ZooEntry("rtmdet-tiny", "detector", "tiny", "cfg/shapes-x.pth", hashlib.sha256(weights).hexdigest())
    monkeypatch.setitem(ZOO, "rtmdet-tiny", entry)
    server = server_factory(files={f"/rtmdet/{entry.path}": weights})
    monkeypatch.setenv(zoo.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(zoo.BASE_URL_ENV, server.url)
    return server


def test_detect_and_serve_settings_take_a_zoo_name(tmp_path, shapes_as_rtmdet_tiny, capsys):
    import cv2
    import numpy as np

    from service.cli import main as rtmdet
    from service.settings import ServiceSettings

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 90, np.uint8))
    assert rtmdet(["detect", "--weights", "rtmdet-tiny", "--device", "cpu", str(img)]) == 0
    first = json.loads(capsys.readouterr().out)
    shapes_as_rtmdet_tiny.stop()  # offline from here: the cache serves
    assert rtmdet(["detect", "--weights", "rtmdet-tiny", "--device", "cpu", str(img)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert len(shapes_as_rtmdet_tiny.requests) == 1
    assert ServiceSettings(weights="rtmdet-x").size == "x"  # the name's size unless told otherwise
    assert ServiceSettings(weights="rtmdet-x", size="tiny").size == "tiny"


def test_commands_fail_in_one_line_when_offline_without_cache(tmp_path, monkeypatch, capsys):
    from service.backends import BackendUnavailable, create_runner
    from service.cli import main as rtmdet
    from service.settings import ServiceSettings

    monkeypatch.setenv(zoo.HOME_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv(zoo.BASE_URL_ENV, _closed_port_url())
    assert rtmdet(["detect", "--weights", "rtmdet-m", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"put {ZOO['rtmdet-m'].filename} into {tmp_path / 'empty'}" in err
    assert rtmdet(["export", "--weights", "rtmdet-l", "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"put {ZOO['rtmdet-l'].filename} into" in capsys.readouterr().err
    with pytest.raises(BackendUnavailable, match=f"put {ZOO['rtmdet-s'].filename} into"):
        create_runner(ServiceSettings(weights="rtmdet-s").default_spec())
    assert rtmdet(["eval", "--weights", "rtmdet-x", "--data", str(tmp_path)]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"put {ZOO['rtmdet-x'].filename} into" in err


def test_training_takes_zoo_names_for_load_from_and_backbone_weights(tmp_path, shapes_as_rtmdet_tiny, monkeypatch):
    from model.checkpoint import read_checkpoint
    from model.train.engine import TrainConfig, Trainer
    from tests.model.data.dataset_writers import write_yolo_set
    from tests.model.train.test_backbone_weights import _rsb_checkpoint

    write_yolo_set(tmp_path / "set")
    cfg = dict(data=str(tmp_path / "set"), size="tiny", epochs=1, img_size=64, workers=0, threads=1, progress=False)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "a"), load_from="rtmdet-tiny", **cfg))
    shipped, _ = read_checkpoint(REPO / "weights" / "rtmdet_tiny_shapes.pth")
    own = trainer.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in shipped.items() if not k.startswith("bbox_head.rtm_cls"))
    with pytest.raises(ZooError, match="not a detector"):
        Trainer(TrainConfig(out=str(tmp_path / "b"), load_from="cspnext-tiny-imagenet", **cfg))

    expected = _rsb_checkpoint(tmp_path / "rsb.pth")
    entry = ZooEntry("cspnext-tiny-imagenet", "backbone", "tiny", "cspnext_rsb_pretrain/rsb-x.pth",
                     hashlib.sha256((tmp_path / "rsb.pth").read_bytes()).hexdigest())
    monkeypatch.setitem(ZOO, entry.name, entry)
    shapes_as_rtmdet_tiny.files[f"/rtmdet/{entry.path}"] = (tmp_path / "rsb.pth").read_bytes()
    trainer = Trainer(TrainConfig(out=str(tmp_path / "c"), backbone_weights="cspnext-tiny-imagenet", **cfg))
    own = trainer.model.backbone.state_dict()
    assert all(torch.equal(own[k[len("backbone."):]], v) for k, v in expected.items())
    with pytest.raises(ZooError, match="use --size tiny"):
        Trainer(TrainConfig(out=str(tmp_path / "d"), backbone_weights="cspnext-tiny-imagenet", **(cfg | {"size": "s"})))
