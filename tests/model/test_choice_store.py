"""`auto`'s choices file: a measurement outlives its process, on the same machine only, and a bad file or
folder costs a measurement, never a wrong runner or a failed start."""
import json
import logging

import torch

from model.inference import choice_store
from model.inference.accelerate import EagerRunner
from model.inference.choice_store import FORMAT, ChoiceFile
from model.inference.preprocess import Normalizer
from model.inference.runner_choice import PEAK_TOLERANCE, choose_runner, forget_choices, peak_relative_error, speed_key
from tests.model.test_runners import batches, seeded_network

NORMALIZE = Normalizer(torch.device("cpu"), channels_last=True)


def test_a_restarted_process_reuses_the_saved_choice_checked_against_its_own_weights(tmp_path):
    path = tmp_path / "choices" / "auto.json"  # the folder is made on the first save
    (first, strides), (second, _) = seeded_network(3), seeded_network(4)
    x1, x2 = batches(1, 2, seed=9)
    _, measured = choose_runner(first, NORMALIZE, [x1, x2], strides, threads=1, candidates=("eager", "onnxruntime"),
                                choices_file=path)
    assert not measured.reused and measured.measured_at is not None
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and len(doc["entries"]) == 1
    forget_choices()  # what a restart forgets: only the file remembers now
    runner, reused = choose_runner(second, NORMALIZE, [x1, x2], strides, threads=1,
                                   candidates=("eager", "onnxruntime"), choices_file=path)
    assert reused.reused and reused.reused_from == str(path)
    assert reused.by_batch == measured.by_batch and reused.chosen == measured.chosen
    assert reused.measured_at == measured.measured_at
    assert f"reused from {path} (measured " in reused.summary()
    for x in (x1, x2):
        assert peak_relative_error(runner(x), EagerRunner(second, NORMALIZE)(x)) <= PEAK_TOLERANCE
        assert peak_relative_error(runner(x), EagerRunner(first, NORMALIZE)(x)) > 1e-2  # the new weights
    # Within the process, the next network of these shapes reuses it from memory.
    _, again = choose_runner(first, NORMALIZE, [x1, x2], strides, threads=1, candidates=("eager", "onnxruntime"),
                             choices_file=path)
    assert again.reused and again.reused_from == "this process"


def test_another_machine_measures_afresh_and_adds_its_own_entry(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    network, strides = seeded_network(3)
    (x1,) = batches(1, seed=9)
    choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",), choices_file=path)
    forget_choices()
    here = choice_store.machine()
    monkeypatch.setattr(choice_store, "machine", lambda: {**here, "onnxruntime": "0.0.1"})  # an upgraded runtime
    _, choice = choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",), choices_file=path)
    assert not choice.reused
    entries = json.loads(path.read_text())["entries"]
    assert sorted(e["machine"]["onnxruntime"] for e in entries.values()) == sorted([here["onnxruntime"], "0.0.1"])


def test_an_unreadable_file_or_a_malformed_entry_is_a_warning_and_a_measurement(tmp_path, caplog):
    path = tmp_path / "auto.json"
    network, strides = seeded_network(3)
    (x1,) = batches(1, seed=9)
    path.write_text("{ not json")
    with caplog.at_level(logging.WARNING, "rtmdet.runner"):
        runner, choice = choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",),
                                       choices_file=path)
    assert not choice.reused and "unreadable" in caplog.text
    assert json.loads(path.read_text())["format"] == FORMAT  # rewritten whole
    # An entry naming a runner that is not a candidate (hand-edited, or another version's) is measured again.
    key = speed_key(network, [x1], 1, ("eager",))
    ChoiceFile(path).save(key, {"chosen": "gone", "batch": 1, "threads": 1, "by_batch": {"1": "gone"}})
    forget_choices()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "rtmdet.runner"):
        runner, choice = choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",),
                                       choices_file=path)
    assert not choice.reused and choice.chosen == "eager" and "does not hold" in caplog.text
    # The eager runner as it serves: Winograd on the CPU (model.inference.winograd), the same code to the bit.
    assert peak_relative_error(runner(x1), EagerRunner(network, NORMALIZE, fast=True)(x1)) == 0.0
    ChoiceFile(path).save(key, {"chosen": "eager", "by_batch": "not a mapping"})
    forget_choices()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "rtmdet.runner"):
        _, choice = choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",),
                                  choices_file=path)
    assert not choice.reused and "malformed" in caplog.text


def test_a_folder_that_cannot_be_written_is_a_warning_and_the_choice_still_serves(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    network, strides = seeded_network(3)
    (x1,) = batches(1, seed=9)
    with caplog.at_level(logging.WARNING, "rtmdet.runner"):
        runner, choice = choose_runner(network, NORMALIZE, [x1], strides, threads=1, candidates=("eager",),
                                       choices_file=blocker / "auto.json")
    assert choice.chosen == "eager" and "could not save" in caplog.text
    # The eager runner as it serves: Winograd on the CPU (model.inference.winograd), the same code to the bit.
    assert peak_relative_error(runner(x1), EagerRunner(network, NORMALIZE, fast=True)(x1)) == 0.0


def test_a_choice_measured_with_another_winograd_kernel_is_measured_again(tmp_path, monkeypatch):
    from model.inference import winograd

    network, _ = seeded_network(3)
    (x1,) = batches(1, seed=9)
    key = speed_key(network, [x1], 1, ("eager",))
    other = tmp_path / "winograd_f43.c"
    other.write_bytes(winograd.KERNEL_SOURCE.read_bytes() + b"/* another version */\n")
    monkeypatch.setattr(winograd, "KERNEL_SOURCE", other)
    assert speed_key(network, [x1], 1, ("eager",)) != key
    monkeypatch.setenv("RTMDET_WINOGRAD", "0")  # off: the kernel's version does not matter
    off = speed_key(network, [x1], 1, ("eager",))
    monkeypatch.setattr(winograd, "KERNEL_SOURCE", tmp_path / "never-read.c")
    assert speed_key(network, [x1], 1, ("eager",)) == off != key
