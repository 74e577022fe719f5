"""`auto`'s choices kept across restarts: a JSON file of earlier measurements, found by speed key and machine.

Measuring the candidates costs a restarted service tens of seconds before it is ready (tiny at 640, 2 threads,
warm-up to batch 8: ~30 s here, against ~7 s to build and check the winners). With a choices file, a process
whose network has the speed key of an earlier measurement (model.inference.runner_choice) on the same machine
takes that measurement's winners, checks them against its own eager outputs as a reused choice always is, and
skips the timing.

"The same machine" is what the file cannot see from the key: the CPU's model and flags, the core count, and
the versions of torch, ONNX Runtime and OpenVINO. A node of another type, or an upgraded runtime, measures
afresh and adds its own entry, so one file can be shared by a fleet of mixed nodes.

The file is plain JSON (never a pickle: it may sit on a shared volume). It is replaced atomically (a temporary
file in the same folder, then `os.replace`), so a reader never sees half a file; two processes writing at
once may lose one entry, which then costs one more measurement, never a wrong runner (every winner is checked
against eager before it serves). An unreadable or malformed file is a warning and counts as empty; a folder
that cannot be written is a warning: the choice still serves this process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger("rtmdet.runner")
FORMAT = "rtmdet-auto-choices/1"
MAX_ENTRIES = 64  # the newest are kept: a fleet's node types times its models' shapes, with room to spare


def machine() -> dict[str, object]:
    """What decides runner speed beyond the speed key: the CPU, its flags, the cores and the runtimes."""
    first: dict[str, str] = {}  # each field of the first processor in /proc/cpuinfo
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                first.setdefault(name.strip(), value.strip())
    except OSError:  # not Linux: the processor string and the architecture stand for the CPU
        pass
    cpu, flags = first.get("model name", platform.processor()), first.get("flags", "")
    versions = {}
    for package in ("torch", "onnxruntime", "openvino"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "arch": platform.machine(), "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
            "cores": os.cpu_count(), **versions}


def entry_key(speed_key: tuple, where: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps([list(speed_key), where], sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ChoiceFile:
    """Earlier `auto` choices in `path` (see the module docstring)."""

    path: Path

    @classmethod
    def of(cls, path: str | Path | ChoiceFile | None) -> ChoiceFile | None:
        if path is None or isinstance(path, ChoiceFile):
            return path
        return cls(Path(path))

    def _entries(self) -> dict[str, dict]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("auto runner: choices file %s is unreadable (%s); measuring as if it were empty",
                        self.path, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
            log.warning("auto runner: %s is not a choices file (%s); measuring as if it were empty", self.path,
                        FORMAT)
            return {}
        return doc["entries"]

    def load(self, speed_key: tuple) -> dict | None:
        """The choice (AutoChoice.to_dict()) saved for `speed_key` on this machine, or None."""
        entry = self._entries().get(entry_key(speed_key, machine()))
        return entry.get("choice") if isinstance(entry, dict) else None

    def save(self, speed_key: tuple, choice: dict) -> None:
        """Add or replace this machine's choice for `speed_key`; a failure to write is a warning only."""
        where = machine()
        entries = self._entries()
        entries[entry_key(speed_key, where)] = {"saved_at": time.time(), "machine": where, "choice": choice}
        newest = sorted(entries.items(), key=lambda kv: kv[1].get("saved_at", 0) if isinstance(kv[1], dict) else 0)
        doc = {"format": FORMAT, "entries": dict(newest[-MAX_ENTRIES:])}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("auto runner: could not save the choice to %s (%s); it serves this process only",
                        self.path, exc)
