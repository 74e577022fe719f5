"""Where the models to serve are described: `--model NAME=PATH,...` options, a model repository
(`DIR/<model>/<version>/` holding one weights file and an optional `config.yaml`; the highest version is
served), or, with neither, RTMDET_WEIGHTS (the shipped model).

Apart from the registry because the command line parses `--model` before anything is loaded, and this module
imports no torch.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.settings import ModelSpec, ServiceSettings

log = logging.getLogger("rtmdet.registry")

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".onnx")
VERSION_CONFIG = "config.yaml"

_OPTION_ALIASES = {"img_size": "input_size"}
MODEL_OPTIONS = ("size", "input_size", "backend", "num_classes", "accelerate", "calibration", "auto_candidates",
                 "latency_slo_ms", "sparse_regression", "canvas")
# How `--model` is written, for its help and its errors: every option of MODEL_OPTIONS, img_size for input_size.
MODEL_OPTION_SYNTAX = "NAME=PATH" + "".join(f"[,{_o}=...]" for _o in (
    "size", "img_size", "backend", "num_classes", "accelerate", "calibration", "auto_candidates", "latency_slo_ms",
    "sparse_regression", "canvas"))


def parse_model_option(text: str, settings: ServiceSettings) -> ModelSpec:
    """`MODEL_OPTION_SYNTAX` text -> a ModelSpec (other settings from `settings`)."""
    head, *options = text.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--model {text!r}: expected {MODEL_OPTION_SYNTAX}")
    fields: dict = {**settings.model_defaults(), "name": name, "weights": Path(path),
                    "input_size": settings.input_size, "weights_key": settings.weights_key}
    for opt in options:
        key, sep, value = opt.partition("=")
        key = _OPTION_ALIASES.get(key.strip(), key.strip())
        if not sep or key not in MODEL_OPTIONS:
            raise ValueError(f"--model {text!r}: unknown option {opt!r}; expected {MODEL_OPTION_SYNTAX}")
        fields[key] = value.strip()
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        raise ValueError(f"--model {text!r}: {exc.errors()[0]['msg']}") from None


def _version_key(path: Path) -> tuple:
    """Numeric folder names in number order (2 < 10), others after them by name."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def version_spec(name: str, folder: Path, base: dict) -> ModelSpec:
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(weights) != 1:
        raise ValueError(f"{folder}: expected one weights file ({', '.join(WEIGHT_SUFFIXES)}), found "
                         f"{[p.name for p in weights]}")
    fields = {**base, "name": name, "weights": weights[0], "version": folder.name}
    if weights[0].suffix == ".onnx":
        fields["backend"] = "onnx"
    config = folder / VERSION_CONFIG
    if config.is_file():
        extra = yaml.safe_load(config.read_text()) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{config}: expected a mapping of settings")
        unknown = set(extra) - {*MODEL_OPTIONS, "img_size", "class_names", "fp16"}
        if unknown:
            raise ValueError(f"{config}: unknown settings {sorted(unknown)}")
        fields.update({_OPTION_ALIASES.get(k, k): v for k, v in extra.items()})
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        raise ValueError(f"{folder}: {exc.errors()[0]['msg']}") from None


def repository_specs(root: Path, settings: ServiceSettings | None = None) -> list[ModelSpec]:
    """The highest version of each model in `root` (folders in name order). A model whose folder holds no
    usable version is skipped with a warning."""
    if not root.is_dir():
        raise ValueError(f"{root}: model repository not found")
    base: dict = {}
    if settings is not None:
        base = settings.model_defaults()
    specs = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and re.match(r"^[\w.-]+$", p.name)),
                          key=_version_key)
        if not versions:
            log.warning("repository: %s has no version folder; skipped", model_dir)
            continue
        specs.append(version_spec(model_dir.name, versions[-1], base))
    return specs


def initial_specs(settings: ServiceSettings) -> list[ModelSpec]:
    specs = list(settings.models)
    if settings.model_repository is not None:
        specs += [s for s in repository_specs(settings.model_repository, settings)
                  if s.name not in {m.name for m in specs}]
    return specs or [settings.default_spec()]
