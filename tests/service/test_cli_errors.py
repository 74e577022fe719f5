"""Every `rtmdet` sub-command answers a user's mistake (a missing or unreadable file, a wrong format or size, a
bad data folder, a bad flag value) with exactly one line on stderr naming the thing, and exit code 2; a bug
gets its traceback and a request to report it (exit 1).

Most cases call the program's `main` in this process (capturing file descriptors, so that lines written by
C++ libraries such as OpenCV count too); a few run it as a real `python -m service` process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from svc_helpers import REPO, free_port

from service.cli import main as rtmdet_main


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint):
    """Bad inputs of every kind, next to good ones (`checkpoint` is an RTMDet-tiny with 3 classes)."""
    from model.data.shapes import make_shapes_dataset

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("these are not weights\n")
    (d / "notes.jpg").write_text("this is not an image\n")
    (d / "empty.pth").write_bytes(b"")
    data = checkpoint.read_bytes()
    (d / "half.pth").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"backbone.stem.weight": torch.zeros(2)}}, d / "not_rtmdet.pth")
    (d / "folder").mkdir()
    make_shapes_dataset(d / "shapes", 2, 1, seed=1, img_size=64)  # 5 categories
    for name, content in {"bad_json": "{not json", "bad_coco": json.dumps({"images": {}, "annotations": []})}.items():
        (d / name / "annotations").mkdir(parents=True)
        (d / name / "val").mkdir()
        (d / name / "annotations" / "instances_val.json").write_text(content)
    (d / "bad_yaml").mkdir()
    (d / "bad_yaml" / "data.yaml").write_text("names: [a\ntrain: [\n")
    (d / "no_images" / "annotations").mkdir(parents=True)
    (d / "no_images" / "annotations" / "instances_val.json").write_text("{}")
    return {"dir": d, "ckpt": str(checkpoint), "image": str(REPO / "examples" / "shapes.jpg"),
            **{p.name.replace(".", "_"): str(p) for p in d.iterdir()}}


# (command line with {placeholders} from `files`, what the one line must contain)
CASES = [
    # detect
    ("detect {dir}/missing.jpg --weights {ckpt}", "missing.jpg: image file not found"),
    ("detect {notes_jpg} --weights {ckpt}", "notes.jpg: not a readable image"),
    ("detect {image} --weights {dir}/nowhere.pth", "nowhere.pth: checkpoint file not found"),
    ("detect {image} --weights {notes_txt}", "notes.txt: not a readable checkpoint (not a PyTorch file"),
    ("detect {image} --weights {empty_pth}", "empty.pth: not a readable checkpoint (the file is empty"),
    ("detect {image} --weights {half_pth}", "half.pth: not a readable checkpoint (PytorchStreamReader failed"),
    ("detect {image} --weights {folder}", "folder: is a folder, not a checkpoint file"),
    ("detect {image} --weights {ckpt} --size s", "it is an RTMDet-tiny checkpoint, not RTMDet-s; use --size tiny"),
    ("detect {image} --weights {not_rtmdet_pth}", "not_rtmdet.pth: does not fit the model: missing keys"),
    ("detect {image} --weights {ckpt} --weights-key raw", "no raw weights (no `ema_state_dict`"),
    ("detect {image} --weights {ckpt} --weights-key newest", "argument --weights-key: invalid choice: 'newest'"),
    ("detect {image} --score-thr high", "argument --score-thr: 'high' is not a number from 0 to 1"),
    ("detect {image} --score-thr 1.5", "argument --score-thr: '1.5' is not a number from 0 to 1"),
    ("detect {image} --batch-size 0", "argument --batch-size: '0' is not a whole number >= 1"),
    ("detect {image} --device gpu7", "argument --device: 'gpu7' is not a device"),
    ("detect {image} --weights cspnext-tiny-imagenet", "is an ImageNet backbone, not a detector"),
    ("detect {image} --weights rtmdet-s --size tiny", "rtmdet-s is for RTMDet-s, not RTMDet-tiny: use --size s"),
    ("detect", "the following arguments are required: images"),
    # eval
    ("eval --weights {dir}/nowhere.pth --data {shapes}", "nowhere.pth: checkpoint file not found"),
    ("eval --weights {ckpt} --data {dir}/no_such_data", "no_such_data: no such dataset folder"),
    ("eval --weights {ckpt} --data {folder}", "folder: not a dataset layout this reads"),
    ("eval --weights {ckpt} --data {bad_yaml} --format yolo", "data.yaml:2: not valid YAML"),
    ("eval --weights {ckpt} --data {shapes} --format voc", "no Annotations/ and ImageSets/Main/"),
    ("eval --weights {ckpt} --data {bad_json}", "instances_val.json: not valid JSON"),
    ("eval --weights {ckpt} --data {bad_coco}", "instances_val.json: missing or non-list 'images'"),
    ("eval --weights {ckpt} --data {no_images}", "found but its image folder"),
    ("eval --weights {ckpt} --data {shapes}", "has 3 classes, but"),
    ("eval --weights {ckpt} --data {shapes} --img-size -1", "argument --img-size: '-1' is not a whole number >= 1"),
    ("eval --data {shapes}", "the following arguments are required: --weights"),
    # train
    ("train --data {dir}/no_such_data --out {dir}/run", "no_such_data: no such dataset folder"),
    ("train --data {folder} --out {dir}/run", "folder: not a dataset layout this reads"),
    ("train --data {shapes} --out {dir}/run --epochs 0", "argument --epochs: '0' is not a whole number >= 1"),
    ("train --data {shapes} --out {dir}/run --base-lr -4", "argument --base-lr: '-4' is not a number > 0"),
    ("train --data {shapes} --out {dir}/run --resume --device cpu", "last.pth does not exist"),
    ("train --data {shapes} --out {dir}/run2 --load-from {notes_txt} --device cpu --workers 0",
     "notes.txt: not a readable checkpoint"),
    # make-shapes-dataset
    ("make-shapes-dataset {dir}/out --train -1", "argument --train: '-1' is not a whole number >= 0"),
    ("make-shapes-dataset {notes_txt}/out --train 1 --val 0", "notes.txt"),
    # convert (a YOLO or VOC set to COCO)
    ("convert {shapes} {dir}/as_coco --to coco", "is already a COCO set"),
    ("convert {dir}/no_such_data {dir}/as_coco --to coco", "no_such_data: no such dataset folder"),
    ("convert {bad_yaml} {dir}/as_coco --to coco", "data.yaml:2: not valid YAML"),
    # export
    ("export --weights {notes_txt} --out {dir}/m.onnx", "notes.txt: not a readable checkpoint"),
    ("export --weights {dir}/nowhere.pth --out {dir}/m.onnx", "nowhere.pth: checkpoint file not found"),
    ("export --weights {ckpt} --out {dir}/m.onnx --img-size big", "argument --img-size: invalid int value: 'big'"),
    # convert-checkpoint
    ("convert-checkpoint {dir}/nowhere.pth {dir}/o.pth", "nowhere.pth: checkpoint file not found"),
    ("convert-checkpoint {half_pth} {dir}/o.pth", "half.pth: not a readable checkpoint"),
    ("convert-checkpoint {not_rtmdet_pth} {dir}/o.pth", "not_rtmdet.pth: its weights do not fit RTMDet of any size"),
    ("convert-checkpoint {ckpt} {folder}", "folder: is a folder; give the file to write"),
    ("convert-checkpoint {ckpt} {ckpt}", "is the input; write the converted file elsewhere"),
    # client
    ("client {dir}/missing.jpg", "missing.jpg: no such file or folder"),
    ("client {image} --timeout 0", "argument --timeout: '0' is not a number > 0"),
    # serve: settings are checked before anything starts
    ("serve --http-port 70000", "bad settings: http_port (RTMDET_HTTP_PORT or its flag): Input should be less than"),
    # the program itself
    ("", "the following arguments are required: command"),
    ("detekt x.jpg", "argument command: invalid choice: 'detekt'"),
]


def _argv(line: str, files: dict) -> list[str]:
    return [part.format(**files) for part in line.split()]


def _one_error_line(err: str, command: str, expected: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, f"{command!r} wrote {len(lines)} lines:\n{err}"
    assert "Traceback" not in err and "\x1b[" not in err and "weights_only" not in err, err
    # `rtmdet export`/`convert` report their own errors ("error: ..."); every other command through the program's.
    prefix = "error: " if command in ("export", "convert") and not lines[0].startswith("rtmdet") else \
        f"rtmdet{' ' + command if command else ''}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("line,expected", CASES, ids=[c[0].split(" ")[0] + ":" + c[1][:40] for c in CASES])
def test_a_mistake_is_one_line_and_exit_2(line, expected, files, capfd, monkeypatch):
    monkeypatch.setenv("RTMDET_DEVICE", "cpu")
    argv = _argv(line, files)
    command = argv[0] if argv and not argv[0].startswith("detekt") else ""
    rc = rtmdet_main(argv)
    out, err = capfd.readouterr()
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    _one_error_line(err, command, expected)


def test_bad_environment_setting_is_one_line(capfd, monkeypatch):
    monkeypatch.setenv("RTMDET_MAX_BATCH_SIZE", "zero")
    assert rtmdet_main(["serve"]) == 2
    _one_error_line(capfd.readouterr().err, "serve", "max_batch_size (RTMDET_MAX_BATCH_SIZE or its flag)")


def test_a_bug_gets_its_traceback_and_a_request_to_report_it(files, capfd, monkeypatch):
    import model.data.shapes

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(model.data.shapes, "make_shapes_dataset", broken)
    assert rtmdet_main(["make-shapes-dataset", str(files["dir"] / "bug")]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: an internal invariant broke" in err
    assert err.splitlines()[-1] == ("rtmdet make-shapes-dataset: internal error: this is a bug; please report it "
                                    "with the traceback above and the command line")


def test_real_processes_print_one_line(files, tmp_path):
    """The same as real processes: nothing else (OpenCV's `[ WARN ]`, logging, warnings) reaches stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RTMDET_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    cases = {"detect": (["detect", f"{files['dir']}/missing.jpg", "--weights", files["ckpt"]], "image file not found"),
             "eval": (["eval", "--weights", f"{files['dir']}/nowhere.pth", "--data", files["shapes"]],
                      "checkpoint file not found"),
             "serve": (["serve", "--weights", files["notes_txt"], "--http-port", str(free_port()), "--grpc-port",
                        str(free_port())], "model failed to load: BackendUnavailable: ")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "service", *argv], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 2, (name, err)
        _one_error_line(err, name, cases[name][1])


def test_an_unreadable_image_in_a_data_folder_is_one_line(files, capfd, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(files["shapes"], data)
    for jpg in (data / "val").iterdir():
        jpg.unlink()  # the annotations name images that are not there: OpenCV would warn about each
    shipped = str(REPO / "weights" / "rtmdet_tiny_shapes.pth")  # the shapes set's 5 classes
    assert rtmdet_main(["eval", "--weights", shipped, "--data", str(data), "--device", "cpu", "--img-size", "64"]) == 2
    _one_error_line(capfd.readouterr().err, "eval", "cannot read image")


def test_one_line_keeps_the_error_of_a_worker_traceback():
    from model.cli_support import one_line

    worker = ("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\nFileNotFoundError: cannot read image a.jpg (image id 1)\n')
    assert one_line(worker) == "FileNotFoundError: cannot read image a.jpg (image id 1)"
    assert one_line("\x1b[1mbad\x1b[0m settings:\n  port: too big\n") == "bad settings: port: too big"
