"""A small kustomize for our own overlays: resources, images and strategic-merge patches by path.

PyPI has no kustomize; this covers exactly the features k8s/ uses, and the tests cross-check it
against `kubectl kustomize` wherever kubectl is installed. Anything else in a kustomization fails loudly.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


def render(directory: str | Path) -> list[dict]:
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch_entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        target = find(docs, patch["kind"], patch["metadata"]["name"])
        merged = strategic_merge(target, patch)
        docs[docs.index(target)] = merged
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in containers(doc):
                name = container["image"].split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} resources of kind {kind} named {name}")
    return matches[0]


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def strategic_merge(base, patch):
    """Maps merge key by key (a null value deletes the key); lists of named maps merge by `name` (containers,
    ports); other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = copy.deepcopy(base)
        for item in patch:
            names = [i["name"] for i in out]
            if item["name"] in names:
                out[names.index(item["name"])] = strategic_merge(out[names.index(item["name"])], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)
