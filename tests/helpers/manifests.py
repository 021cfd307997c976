"""The Kubernetes manifests under deploy/k8s, rendered with kubectl as `make deploy-check` does."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"


Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    """Render a kustomization directory and return its documents."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    """The overlay's documents, rendered once per test session."""
    return tuple(kustomize(K8S / "overlays" / overlay))


def of_kind(docs: tuple[Doc, ...] | list[Doc], kind: str) -> list[Doc]:
    """The documents of one kind."""
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    """The one document of this kind and name."""
    (found,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def environment(docs: tuple[Doc, ...], container: Doc) -> dict[str, str]:
    """The variables a container gets from its ConfigMaps and literal env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env
