"""What operators deploy and watch: the tests that need no server (those against real
servers: tests/integration/test_deploy.py)."""

from __future__ import annotations

import importlib.util
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
import yaml
from prometheus_client import CollectorRegistry

from bench.proxies import compose_haproxy_config, kubernetes_haproxy_config
from inferpool.api import metrics as api_metrics
from inferpool.names import bulk_queue_name, queue_name
from inferpool.repository import Repository
from inferpool.workers import metrics as worker_metrics
from tests.servers import ROOT

COMPOSE = ROOT / "compose"

K8S = COMPOSE / "k8s"

SERVICES = {"redis", "memcached", "api", "proxy", "worker", "flower", "prometheus", "grafana", "jaeger"}

# The oldest Kubernetes these manifests target (gRPC probes are GA from 1.27) and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

# What `scripts/compose-secrets.sh > compose/.env` provides.
COMPOSE_ENV = {
    "FLOWER_BASIC_AUTH": "ops:secret",
    "GRAFANA_PASSWORD": "secret",
    "REDIS_API_PASSWORD": "api0pw",
    "REDIS_WORKER_PASSWORD": "worker0pw",
    "REDIS_FLOWER_PASSWORD": "flower0pw",
    "INFERPOOL_CACHE_KEY_SECRET": "0123456789abcdef0123456789abcdef",
}


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
    run = _compose("config", env=COMPOSE_ENV)
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


def test_compose_runs_api_replicas_behind_the_proxy(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    api, proxy = services["api"], services["proxy"]
    # Replicas: no host port, no fixed name; the proxy publishes the gRPC port.
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api and "container_name" not in api
    assert [str(p).removesuffix("/tcp") for p in proxy["ports"]] == [
        "127.0.0.1:50051:50051",
        "127.0.0.1:8080:8080",
    ]
    assert any(v.endswith("/usr/local/etc/haproxy/haproxy.cfg") for v in _volume_targets(proxy))
    # The replicas' gRPC port is on a network of their own with the proxy only.
    members = _network_members(compose_config)
    assert members["grpc"] == {"api", "proxy"}
    assert compose_config["networks"]["grpc"].get("internal") is True
    # Draining fits in the stop bound: NOT_SERVING, drain, then grace for calls in flight.
    env = api["environment"]
    drain = float(env["INFERPOOL_DRAIN_S"]) + float(env["INFERPOOL_SHUTDOWN_GRACE_S"])
    assert _seconds(api["stop_grace_period"]) > drain


def _volume_targets(service: dict[str, Any]) -> list[str]:
    return [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service.get("volumes", [])]


def _haproxy_check(config: str, tmp_path: Path) -> None:
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if binary is None:
        pytest.fail("haproxy not found: run scripts/ensure-servers.sh (or apt-get install haproxy)")
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    run = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


def test_proxy_configs_are_generated_and_valid(tmp_path: Path) -> None:
    compose = (COMPOSE / "haproxy.cfg").read_text()
    assert compose == compose_haproxy_config(), (
        "regenerate: python -m bench.proxies compose > compose/haproxy.cfg"
    )
    kubernetes = _objects()["ConfigMap", "inferpool-haproxy"]["data"]["haproxy.cfg"]
    assert kubernetes == kubernetes_haproxy_config()
    for config in (compose, kubernetes):
        _haproxy_check(config, tmp_path)
    service = _objects()["Service", "inferpool-proxy"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 50051)]


def test_headless_service_for_client_side_balancing() -> None:
    objects = _objects()
    headless = objects["Service", "inferpool-api-headless"]["spec"]
    deployment = objects["Deployment", "inferpool-api"]["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False)
    assert headless["selector"] == deployment["selector"]["matchLabels"]
    assert "inferpool-api-headless.default.svc.cluster.local:50051" in kubernetes_haproxy_config()
    pod = deployment["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    drain = float(env["INFERPOOL_DRAIN_S"]) + float(env["INFERPOOL_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("missing", sorted(COMPOSE_ENV))
def test_compose_requires_every_credential(missing: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    run = _compose("config", "-q", env={**env, **{k: v for k, v in COMPOSE_ENV.items() if k != missing}})
    assert run.returncode != 0
    assert missing in run.stderr


def test_compose_secrets_script_provides_every_credential() -> None:
    run = subprocess.run(
        [str(ROOT / "scripts" / "compose-secrets.sh")], capture_output=True, text=True, timeout=30, check=True
    )
    values = dict(line.split("=", 1) for line in run.stdout.splitlines())
    assert set(values) == set(COMPOSE_ENV)
    for name, value in values.items():
        assert re.fullmatch(r"(ops:)?[0-9a-f]{24,}", value), name


def test_compose_services_restart_and_run_as_non_root(compose_config: dict[str, Any]) -> None:
    # Images whose own default user is not root (prom/prometheus: nobody, grafana: 472).
    non_root_images = ("prom/prometheus:", "grafana/grafana:")
    for name, service in compose_config["services"].items():
        assert service.get("restart") == "unless-stopped", name
        if "build" in service:
            dockerfile = ROOT / service["build"]["dockerfile"]
            users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
            assert users and users[-1] not in ("root", "0"), f"{name}: {dockerfile.name} runs as root"
        elif not service["image"].startswith(non_root_images):
            assert service.get("user") not in (None, "root", "0"), f"{name} runs as root"


def _network_members(config: dict[str, Any]) -> dict[str, set[str]]:
    members: dict[str, set[str]] = {n: set() for n in config.get("networks", {})}
    for name, service in config["services"].items():
        networks = service.get("networks") or {"default": None}
        for network in networks:
            members.setdefault(network, set()).add(name)
    return members


def test_compose_backends_reachable_only_by_their_clients(compose_config: dict[str, Any]) -> None:
    members = _network_members(compose_config)
    networks = compose_config["networks"]

    def reachable_from(service: str) -> set[str]:
        return {peer for n, peers in members.items() if service in peers for peer in peers} - {service}

    assert reachable_from("redis") == {"api", "worker", "flower"}
    assert reachable_from("memcached") == {"api", "worker"}
    for backend in ("redis", "memcached"):
        for network in compose_config["services"][backend]["networks"]:
            assert networks[network].get("internal") is True, network
    # Grafana talks to Prometheus only; metrics ports are published nowhere.
    assert reachable_from("grafana") == {"prometheus"}
    # Jaeger receives the API's and the workers' traces, and reaches nothing else.
    assert reachable_from("jaeger") == {"api", "worker"}
    for name in ("api", "worker"):
        ports = compose_config["services"][name].get("ports", [])
        published = {
            p["target"] if isinstance(p, dict) else int(p.rsplit(":", 1)[-1].split("/")[0]) for p in ports
        }
        assert not published & {8000, 8001}, name


def test_compose_api_and_workers_send_traces_to_jaeger(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
    assert services["jaeger"]["ports"] == ["127.0.0.1:16686:16686/tcp"]


def test_compose_clients_log_in_to_redis_as_their_own_user(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    urls = {
        "api": services["api"]["environment"]["INFERPOOL_REDIS_URL"],
        "worker": services["worker"]["environment"]["INFERPOOL_REDIS_URL"],
        "flower": services["flower"]["environment"]["FLOWER_BROKER_URL"],
    }
    for role, url in urls.items():
        assert url == f"redis://{role}:{COMPOSE_ENV[f'REDIS_{role.upper()}_PASSWORD']}@redis:6379/0", role
    redis_env = services["redis"]["environment"]
    for role in urls:
        assert redis_env[f"REDIS_{role.upper()}_PASSWORD"] == COMPOSE_ENV[f"REDIS_{role.upper()}_PASSWORD"]
    assert "--read_only" in " ".join(services["flower"]["command"])
    assert "--conf=/etc/flower/flowerconfig.py" in " ".join(services["flower"]["command"])
    assert not any("redis://" in str(v) and "@" not in str(v) for s in services.values() for v in _env(s))


def _env(service: dict[str, Any]) -> list[str]:
    env = service.get("environment") or {}
    return list(env.values()) if isinstance(env, dict) else list(env)


def test_prometheus_scrapes_every_part() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Flower's /metrics asks for Flower's password (scripts/flowerconfig.py); nothing of
    # the dashboards or rules reads it.
    assert set(jobs) == {"api", "worker"}
    assert jobs["worker"]["dns_sd_configs"][0]["port"] == 8001
    assert jobs["api"]["dns_sd_configs"][0]["port"] == 8000
    rules = yaml.safe_load((COMPOSE / "prometheus-rules.yml").read_text())
    assert [r["record"] for g in rules["groups"] for r in g["rules"]] == [
        "queue:inferpool_backlog_messages:sum"
    ]


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
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_objects()}
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
    (scaled,) = [d for d in _docs(K8S / name) if d["kind"] == "ScaledObject"]
    return scaled


@pytest.mark.parametrize("name", ["keda-redis.yaml", "keda-prometheus.yaml"])
def test_scaled_objects(name: str) -> None:
    scaled = _scaled_object(name)
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
    assert _metric_names(trigger["metadata"]["query"]) == {"inferpool_backlog_messages"}
    assert "inferpool_backlog_messages" in api_metrics.QueueDepth.NAMES


def test_redis_triggers_log_in_as_the_keda_user() -> None:
    docs = _docs(K8S / "keda-redis.yaml")
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "inferpool-redis", "key": "keda-password"}
    ]
    for trigger in _scaled_object("keda-redis.yaml")["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        assert trigger["metadata"]["username"] == "keda"


COMPONENT = "app.kubernetes.io/component"


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in _k8s_objects()}


def _container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_redis_clients_get_their_password_from_the_secret() -> None:
    objects = _objects()
    config = objects["ConfigMap", "inferpool"]["data"]
    assert "INFERPOOL_REDIS_URL" not in config, "a Redis URL (with its password) belongs in a Secret"
    for deployment, role in (("inferpool-api", "api"), ("inferpool-worker", "worker")):
        (container,) = objects["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
        env = _container_env(container)
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
    env = _container_env(redis_container)
    for role in ("api", "worker", "flower", "keda"):
        ref = env[f"REDIS_{role.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("inferpool-redis", f"{role}-password")
    for deployment in ("inferpool-api", "inferpool-worker"):
        (container,) = objects["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
        ref = _container_env(container)["INFERPOOL_CACHE_KEY_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "inferpool-cache", "key": "key-secret"}
    secret = objects["Secret", "inferpool-redis"]["stringData"]
    assert set(secret) == {f"{r}-password" for r in ("api", "worker", "flower", "keda")}


def _policy_for(component: str) -> dict[str, Any]:
    policies = [
        d["spec"]
        for d in _k8s_objects()
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
    objects = _objects()
    keda = _scaled_object("keda-prometheus.yaml")["spec"]["triggers"][0]["metadata"]
    assert ".monitoring.svc" in keda["serverAddress"]
    for name in ("inferpool-api", "inferpool-worker"):
        annotations = objects["Deployment", name]["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in _ingress(name.removeprefix("inferpool-"))


def test_api_service_publishes_grpc_and_http_only() -> None:
    service = _objects()["Service", "inferpool-api"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 50051), ("http", 8080)]


ROLE_PASSWORDS = {"api": "api0pw", "worker": "worker0pw", "flower": "flower0pw", "keda": "keda0pw"}


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


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_flower_starts_after_a_worker_answers_and_read_only() -> None:
    flower = _procfile()["flower"]
    wait, start = flower.find("scripts/wait_for_worker.py"), flower.find(" flower ")
    assert 0 <= wait < start, "Flower must wait for a worker before it starts"
    assert "--read_only" in flower[start:]
    make_flower = (ROOT / "Makefile").read_text().split("\nflower:", 1)[1].split("\n\n", 1)[0]
    assert "--read_only" in make_flower


def test_flowers_broker_page_shows_bulk_queues_and_not_celerys_default() -> None:
    """scripts/flowerconfig.py restates the queue naming rule (Flower's image has no
    project code): it must give each model's bulk queue as inferpool/names.py does, and
    invent no queue, Celery's default `celery` included, while no worker is known."""
    spec = importlib.util.spec_from_file_location("flowerconfig", ROOT / "scripts" / "flowerconfig.py")
    assert spec is not None and spec.loader is not None
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    models = ["digits", "digits_onnx", "a.b-c"]
    consumed = {queue_name(m) for m in models}
    assert config.queues_shown(consumed) == sorted(consumed | {bulk_queue_name(m) for m in models})
    assert config.queues_shown(set()) == []
    assert config.queues_shown({"other"}) == ["other"]  # a queue a worker reports is kept as it is

    class Handler:  # what Flower's handler offers the patched method: its known workers
        def __init__(self, workers: dict[str, Any]) -> None:
            self.application = type("App", (), {"workers": workers})()

    from flower.views import BaseHandler

    names = BaseHandler.get_active_queue_names
    assert names(Handler({})) == []
    worker = {"active_queues": [{"name": queue_name("digits")}]}
    assert names(Handler({"w1": worker})) == [queue_name("digits"), bulk_queue_name("digits")]


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


def test_metrics_table_lists_every_metric_and_nothing_else() -> None:
    from scripts.gen_docs import OPERATIONS, metric_names_in

    families = {**_exported(api_metrics.REGISTRY), **_exported(worker_metrics.REGISTRY)}
    families.update(dict.fromkeys(api_metrics.QueueDepth.NAMES, "gauge"))
    ours = {
        f"{n}_total" if kind == "counter" else n for n, kind in families.items() if n.startswith("inferpool_")
    }
    assert metric_names_in(OPERATIONS.read_text()) == ours


def test_generated_docs_match_the_code() -> None:
    """What `make docs-check` runs: docs/configuration.md and the metrics table are current."""
    from scripts.gen_docs import drift

    assert drift() == [], "\n".join(drift())


DOCS = ROOT / "docs"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_readme_is_short_and_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    assert "## Contents" in readme
    pages = {p.name for p in DOCS.glob("*.md")}
    assert {"architecture.md", "operations.md", "configuration.md", "protocols.md", "benchmarks.md"} <= pages
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert linked == pages


def test_docs_links_resolve_and_text_stays_impersonal() -> None:
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target) if target else page
            assert path.is_file(), f"{page.name}: link to {target}"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: #{anchor} not in {path.name}"
        assert not re.search(r"[Ii]ssue #?[0-9]+", text), page.name
        assert not re.search(r"\b(I|[Ww]e) (measured|tried|did not)\b", text), page.name


def test_configuration_page_names_every_setting() -> None:
    import dataclasses

    from inferpool.settings import ENV_PREFIX, Settings

    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(INFERPOOL_[A-Z0-9_]+)` \|", page, re.M))
    assert rows == {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


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
    from inferpool.workers.main import _own_options

    own, celery_args = _own_options(
        ["--metrics-port=0", "--hostname=w1@h", "--metrics-host", "0.0.0.0", "-E"]
    )
    assert (own.metrics_port, own.metrics_host) == (0, "0.0.0.0")
    assert celery_args == ["--hostname=w1@h", "-E"]
    assert _own_options([])[0].metrics_port is None  # no metrics server unless asked
