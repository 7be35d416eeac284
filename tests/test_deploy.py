"""What operators deploy and watch: the compose file, the Kubernetes and KEDA
manifests, the Prometheus rules and Grafana dashboard, and the metrics they read.

Nothing here needs a container engine or a cluster: docker-compose validates and
resolves the compose file offline, the Kubernetes objects are checked against the
API's JSON schemas (kubernetes-validate ships them), and the KEDA ScaledObjects
against a schema of the CRD fields they use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from api import metrics as api_metrics
from bench.stack import free_port
from inferpool.names import bulk_queue_name, queue_name
from inferpool.repository import Repository
from tests.servers import ROOT, RedisServer
from workers import metrics as worker_metrics

COMPOSE = ROOT / "compose"
K8S = COMPOSE / "k8s"
SERVICES = {"redis", "memcached", "api", "worker", "flower", "prometheus", "grafana"}
# The oldest Kubernetes these manifests target (gRPC probes are GA from 1.27) and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _docs(p)]


def _worker_deployment() -> dict[str, Any]:
    return next(d for d in _docs(K8S / "worker.yaml") if d["kind"] == "Deployment")


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# -- compose


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose not found: run scripts/ensure-servers.sh (or apt-get install docker-compose)"
        )
    return subprocess.run(
        [binary, "-f", str(COMPOSE / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    run = _compose("config", env={"FLOWER_BASIC_AUTH": "ops:secret", "GRAFANA_PASSWORD": "secret"})
    assert run.returncode == 0, run.stderr
    config: dict[str, Any] = yaml.safe_load(run.stdout)
    return config


def test_compose_file_is_valid_and_complete(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for path in (
        COMPOSE / "Dockerfile.api",
        COMPOSE / "Dockerfile.worker",
        COMPOSE / "Dockerfile.flower",
        COMPOSE / "prometheus.yml",
        COMPOSE / "prometheus-rules.yml",
        COMPOSE / "grafana" / "dashboards" / "inferpool.json",
    ):
        assert path.is_file(), path


def test_compose_worker_scales_on_gpus_and_drains(compose_config: dict[str, Any]) -> None:
    worker = compose_config["services"]["worker"]
    # `--scale worker=N` needs neither a fixed name nor a host port.
    assert "container_name" not in worker and "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "count": 1, "driver": "nvidia"}]
    grace = _worker_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert _seconds(worker["stop_grace_period"]) == grace


def test_compose_requires_flower_credentials() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    run = _compose("config", "-q", env={**env, "GRAFANA_PASSWORD": "secret"})
    assert run.returncode != 0
    assert "FLOWER_BASIC_AUTH" in run.stderr


def test_prometheus_scrapes_every_part() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"api", "worker", "flower"}
    assert jobs["worker"]["dns_sd_configs"][0]["port"] == 8001
    assert jobs["api"]["dns_sd_configs"][0]["port"] == 8000
    rules = yaml.safe_load((COMPOSE / "prometheus-rules.yml").read_text())
    assert [r["record"] for g in rules["groups"] for r in g["rules"]] == [
        "queue:inferpool_backlog_messages:sum"
    ]


# -- kubernetes and KEDA


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    checked = 0
    for obj in _k8s_objects():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")
        checked += 1
    assert checked >= 4  # ConfigMap, two Deployments, a Service


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    # One ScaledObject per Deployment: the two KEDA variants are alternatives.
    assert sum(r.startswith("keda-") for r in kustomization["resources"]) == 1


def test_deployments_are_graceful_and_probed() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_objects()}
    for name in ("inferpool-api", "inferpool-worker"):
        deployment = objects["Deployment", name]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > 0
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert "livenessProbe" in container
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


@pytest.mark.parametrize("name", ["keda-redis.yaml", "keda-prometheus.yaml"])
def test_scaled_objects(name: str) -> None:
    (scaled,) = _docs(K8S / name)
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _worker_deployment()["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    names = [t["name"] for t in spec["triggers"]]
    assert len(names) == len(set(names))
    for trigger in spec["triggers"]:
        for key in ("listLength", "threshold", "activationThreshold"):
            if key in trigger["metadata"]:
                float(trigger["metadata"][key])


def test_redis_triggers_cover_every_list_of_every_queue() -> None:
    (scaled,) = _docs(K8S / "keda-redis.yaml")
    lists = sorted(t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis")
    expected = sorted(
        key
        for model in Repository.load(ROOT / "models").names
        for queue in (queue_name(model), bulk_queue_name(model))
        for key in api_metrics.priority_lists(queue)
    )
    assert lists == expected


def test_prometheus_trigger_reads_the_backlog_the_api_exports() -> None:
    (scaled,) = _docs(K8S / "keda-prometheus.yaml")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert _metric_names(trigger["metadata"]["query"]) == {"inferpool_backlog_messages"}
    assert "inferpool_backlog_messages" in api_metrics.QueueDepth.NAMES


# -- metrics: what the dashboard, rules and README name exists


def _exported(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> type, for every family a registry can export."""
    return {m.name: m.type for m in registry.collect()}


def _sample_names() -> set[str]:
    families = {**_exported(api_metrics.REGISTRY), **_exported(worker_metrics.REGISTRY)}
    families.update(dict.fromkeys(api_metrics.QueueDepth.NAMES, "gauge"))
    names = set()
    for name, kind in families.items():
        names.add(name)
        if kind == "counter":
            names.add(f"{name}_total")
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:[a-z]+:)?inferpool_[a-z_]+(?::[a-z0-9_]+)?\b", expr))


def test_dashboard_and_rules_use_exported_metrics() -> None:
    known = _sample_names()
    rules = yaml.safe_load((COMPOSE / "prometheus-rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"]}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert _metric_names(rule["expr"]) <= known, rule["expr"]
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "inferpool.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 10
    for expr in exprs:
        unknown = _metric_names(expr) - known - recorded
        assert not unknown, f"{expr}: {unknown}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_readme_documents_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    families = set(_exported(api_metrics.REGISTRY)) | set(_exported(worker_metrics.REGISTRY))
    families |= set(api_metrics.QueueDepth.NAMES)
    ours = {f for f in families if f.startswith("inferpool_")}
    missing = sorted(f for f in ours if f not in readme)
    assert not missing, f"README's metrics table lacks {missing}"


def test_queue_depth_counts_what_llen_misses(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/5")
    client.flushdb()
    try:
        interactive, bulk = queue_name("digits"), bulk_queue_name("digits")
        client.rpush(interactive, b"a", b"b")
        client.rpush(api_metrics.priority_lists(interactive)[2], b"c")  # priority step 6
        client.rpush(bulk, b"d")
        # Two messages a worker prefetched: kombu keeps them in the unacked hash.
        client.hset("unacked", mapping={"tag-1": "[]", "tag-2": "[]"})
        registry = CollectorRegistry()
        registry.register(api_metrics.QueueDepth(client, [interactive, bulk]))
        assert registry.get_sample_value("inferpool_queue_messages", {"queue": interactive}) == 3
        assert registry.get_sample_value("inferpool_queue_messages", {"queue": bulk}) == 1
        assert registry.get_sample_value("inferpool_broker_unacked_messages") == 2
        assert registry.get_sample_value("inferpool_backlog_messages") == 6
        assert registry.get_sample_value("inferpool_broker_up") == 1
    finally:
        client.flushdb()
        client.close()

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(api_metrics.QueueDepth(dead, [interactive]))
    assert registry.get_sample_value("inferpool_broker_up") == 0
    assert registry.get_sample_value("inferpool_backlog_messages") is None


def test_worker_reports_held_messages_per_queue() -> None:
    from celery.worker import state

    class Request:  # what the collector reads of celery.worker.request.Request
        def __init__(self, queue: str) -> None:
            self.delivery_info = {"routing_key": queue, "exchange": queue}

    held = worker_metrics.HeldMessages()
    held.queues = {"inferpool.digits", "inferpool.digits.bulk"}
    held.add_source("inferpool.digits.bulk", reserved=lambda: 3, active=lambda: 1)
    registry = CollectorRegistry()
    registry.register(held)
    running, waiting = Request("inferpool.digits"), Request("inferpool.digits")
    # A request stays reserved while it runs (Celery's bookkeeping): count it once, as active.
    for r in (running, waiting):
        state.reserved_requests.add(r)  # type: ignore[arg-type]
    state.active_requests.add(running)  # type: ignore[arg-type]
    try:

        def value(name: str, queue: str) -> float | None:
            return registry.get_sample_value(name, {"queue": queue})

        assert value("inferpool_worker_reserved_messages", "inferpool.digits") == 1
        assert value("inferpool_worker_active_messages", "inferpool.digits") == 1
        assert value("inferpool_worker_reserved_messages", "inferpool.digits.bulk") == 3
        assert value("inferpool_worker_active_messages", "inferpool.digits.bulk") == 1
    finally:
        for r in (running, waiting):
            state.reserved_requests.discard(r)  # type: ignore[arg-type]
            state.active_requests.discard(r)  # type: ignore[arg-type]


def test_metrics_endpoint_serves_the_registry() -> None:
    worker_metrics.BATCH_SIZE.labels("digits").observe(8)
    server, thread = worker_metrics.serve(0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert 'inferpool_batch_size_bucket{le="8.0",model="digits"}' in text
    assert "process_cpu_seconds_total" in text


def test_worker_entry_point_keeps_celery_options_apart() -> None:
    from workers.main import _own_options

    own, celery_args = _own_options(
        ["--metrics-port=0", "--hostname=w1@h", "--metrics-host", "0.0.0.0", "-E"]
    )
    assert (own.metrics_port, own.metrics_host) == (0, "0.0.0.0")
    assert celery_args == ["--hostname=w1@h", "-E"]
    assert _own_options([])[0].metrics_port is None  # no metrics server unless asked
