"""The deployment files as data, for the tests that check them (no servers)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.servers import ROOT

COMPOSE = ROOT / "compose"
K8S = COMPOSE / "k8s"

# The Redis role passwords the tests hand the manifests' start script.
ROLE_PASSWORDS = {"api": "api0pw", "worker": "worker0pw", "flower": "flower0pw", "keda": "keda0pw"}


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in yaml_docs(p)]


def worker_deployment() -> dict[str, Any]:
    return next(d for d in yaml_docs(K8S / "worker.yaml") if d["kind"] == "Deployment")


def duration_s(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def k8s_by_name() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_objects()}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:[a-z]+:)?inferpool_[a-z_]+(?::[a-z0-9_]+)?\b", expr))


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}
