"""The Kubernetes and KEDA manifests: schemas, probes, triggers, secrets and network policies."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from inferpool.api import metrics as api_metrics
from inferpool.names import bulk_queue_name, queue_name
from inferpool.repository import Repository
from tests.servers import ROOT
from tests.unit.manifests import (
    K8S,
    ROLE_PASSWORDS,
    container_env,
    k8s_by_name,
    k8s_objects,
    metric_names,
    worker_deployment,
    yaml_docs,
)

# The oldest Kubernetes these manifests target (gRPC probes are GA from 1.27) and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    checked = 0
    for obj in k8s_objects():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")
        checked += 1
    assert checked >= 12  # ConfigMap, Secret, four Deployments, three Services, four NetworkPolicies


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (K8S / file).is_file(), file
    # Passwords are never applied from the repository: the Secret is the operator's.
    assert not any("secret" in r for r in kustomization["resources"])
    # One ScaledObject per Deployment: the two KEDA variants are alternatives.
    assert sum(r.startswith("keda-") for r in kustomization["resources"]) == 1


def test_deployments_are_graceful_and_probed() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in k8s_objects()}
    for name in ("inferpool-api", "inferpool-worker", "redis", "memcached"):
        deployment = objects["Deployment", name]
        pod = deployment["spec"]["template"]["spec"]
        assert pod.get("terminationGracePeriodSeconds", 30) > 0
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert "livenessProbe" in container
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if name.startswith("inferpool-"):
            assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    worker = objects["Deployment", "inferpool-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--metrics-port=8001" in worker["command"]


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The ScaledObject fields (keda.sh/v1alpha1 CRD) these manifests use, closed to typos.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        k: {"type": "string"}
                        for k in ("apiVersion", "kind", "name", "envSourceContainerName")
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "metadata": _STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                        "allOf": [
                            {
                                "if": {"properties": {"type": {"const": "redis"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {"required": ["address", "listName", "listLength"]}
                                    }
                                },
                            },
                            {
                                "if": {"properties": {"type": {"const": "prometheus"}}},
                                "then": {
                                    "properties": {
                                        "metadata": {"required": ["serverAddress", "query", "threshold"]}
                                    }
                                },
                            },
                        ],
                    },
                },
            },
        },
    },
}


def _scaled_object(name: str) -> dict[str, Any]:
    (scaled,) = [d for d in yaml_docs(K8S / name) if d["kind"] == "ScaledObject"]
    return scaled


@pytest.mark.parametrize("name", ["keda-redis.yaml", "keda-prometheus.yaml"])
def test_scaled_objects(name: str) -> None:
    scaled = _scaled_object(name)
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker_deployment()["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    names = [t["name"] for t in spec["triggers"]]
    assert len(names) == len(set(names))
    for trigger in spec["triggers"]:
        for key in ("listLength", "threshold", "activationThreshold"):
            if key in trigger["metadata"]:
                float(trigger["metadata"][key])


def test_redis_triggers_cover_every_list_of_every_queue() -> None:
    scaled = _scaled_object("keda-redis.yaml")
    lists = sorted(t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis")
    expected = sorted(
        key
        for model in Repository.load(ROOT / "models").names
        for queue in (queue_name(model), bulk_queue_name(model))
        for key in api_metrics.priority_lists(queue)
    )
    assert lists == expected


def test_prometheus_trigger_reads_the_backlog_the_api_exports() -> None:
    scaled = _scaled_object("keda-prometheus.yaml")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert metric_names(trigger["metadata"]["query"]) == {"inferpool_backlog_messages"}
    assert "inferpool_backlog_messages" in api_metrics.QueueDepth.NAMES


def test_redis_triggers_log_in_as_the_keda_user() -> None:
    docs = yaml_docs(K8S / "keda-redis.yaml")
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "inferpool-redis", "key": "keda-password"}
    ]
    for trigger in _scaled_object("keda-redis.yaml")["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        assert trigger["metadata"]["username"] == "keda"


COMPONENT = "app.kubernetes.io/component"


def test_redis_clients_get_their_password_from_the_secret() -> None:
    objects = k8s_by_name()
    config = objects["ConfigMap", "inferpool"]["data"]
    assert "INFERPOOL_REDIS_URL" not in config, "a Redis URL (with its password) belongs in a Secret"
    for deployment, role in (("inferpool-api", "api"), ("inferpool-worker", "worker")):
        (container,) = objects["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
        env = container_env(container)
        url = env["INFERPOOL_REDIS_URL"]["value"]
        match = re.fullmatch(r"redis://(\w+):\$\((\w+)\)@redis:6379/0", url)
        assert match and match[1] == role, url
        # The variable it expands is defined before it, from the Secret (Kubernetes
        # expands $(VAR) only for variables listed earlier).
        names = list(env)
        assert names.index(match[2]) < names.index("INFERPOOL_REDIS_URL")
        ref = env[match[2]]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "inferpool-redis", "key": f"{role}-password"}
    (redis_container,) = objects["Deployment", "redis"]["spec"]["template"]["spec"]["containers"]
    env = container_env(redis_container)
    for role in ("api", "worker", "flower", "keda"):
        ref = env[f"REDIS_{role.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("inferpool-redis", f"{role}-password")
    for deployment in ("inferpool-api", "inferpool-worker"):
        (container,) = objects["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
        ref = container_env(container)["INFERPOOL_CACHE_KEY_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "inferpool-cache", "key": "key-secret"}
    secret = objects["Secret", "inferpool-redis"]["stringData"]
    assert set(secret) == {f"{r}-password" for r in ("api", "worker", "flower", "keda")}


def _policy_for(component: str) -> dict[str, Any]:
    policies = [
        d["spec"]
        for d in k8s_objects()
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"].get(COMPONENT) == component
    ]
    assert len(policies) == 1, f"one NetworkPolicy should select the {component} pods"
    assert policies[0]["policyTypes"] == ["Ingress"]
    return policies[0]


def _peers(rule: dict[str, Any]) -> set[str]:
    """What a rule's `from` admits, as 'pod:<component>' and 'namespace:<name>'; 'any' when open."""
    if "from" not in rule:
        return {"any"}
    found = set()
    for peer in rule["from"]:
        assert set(peer) <= {"podSelector", "namespaceSelector"}, peer  # no ipBlock
        if "namespaceSelector" in peer:
            assert "podSelector" not in peer
            found.add(f"namespace:{peer['namespaceSelector']['matchLabels']['kubernetes.io/metadata.name']}")
            continue
        selector = peer["podSelector"]
        assert selector["matchLabels"] == {"app.kubernetes.io/name": "inferpool"}
        (expr,) = selector["matchExpressions"]
        assert (expr["key"], expr["operator"]) == (COMPONENT, "In")
        found |= {f"pod:{c}" for c in expr["values"]}
    return found


def _ingress(component: str) -> dict[int, set[str]]:
    """Port -> who may connect to it."""
    allowed: dict[int, set[str]] = {}
    for rule in _policy_for(component).get("ingress", []):
        for port in rule["ports"]:
            allowed.setdefault(port["port"], set()).update(_peers(rule))
    return allowed


def test_network_policies_let_only_clients_reach_the_backends() -> None:
    assert _ingress("redis") == {6379: {"pod:api", "pod:worker", "pod:flower", "namespace:keda"}}
    assert _ingress("memcached") == {11211: {"pod:api", "pod:worker"}}


def test_only_prometheus_reaches_metrics_ports() -> None:
    assert _ingress("api") == {50051: {"any"}, 8080: {"any"}, 8000: {"namespace:monitoring"}}
    assert _ingress("worker") == {8001: {"namespace:monitoring"}}
    objects = k8s_by_name()
    keda = _scaled_object("keda-prometheus.yaml")["spec"]["triggers"][0]["metadata"]
    assert ".monitoring.svc" in keda["serverAddress"]
    for name in ("inferpool-api", "inferpool-worker"):
        annotations = objects["Deployment", name]["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in _ingress(name.removeprefix("inferpool-"))


def test_api_service_publishes_grpc_and_http_only() -> None:
    service = k8s_by_name()["Service", "inferpool-api"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 50051), ("http", 8080)]


def test_redis_start_refuses_missing_or_placeholder_passwords(tmp_path: Path) -> None:
    base = {**os.environ, "REDIS_ACL_FILE": str(tmp_path / "users.acl")}
    base.update({f"REDIS_{r.upper()}_PASSWORD": p for r, p in ROLE_PASSWORDS.items()})
    for role, value in (("API", ""), ("WORKER", "REPLACE-with-openssl-rand-hex-24"), ("FLOWER", "a b#c")):
        env = {**base, f"REDIS_{role}_PASSWORD": value}
        run = subprocess.run(
            ["sh", str(K8S / "redis-start.sh"), "--port", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 1 and f"REDIS_{role}_PASSWORD" in run.stderr
        assert not (tmp_path / "users.acl").exists()
