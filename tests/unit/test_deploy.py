"""What operators deploy and watch: the tests that need no server (those against real
servers: tests/integration/test_deploy.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.proxies import compose_haproxy_config, kubernetes_haproxy_config
from tests.servers import ROOT
from tests.unit.manifests import (
    COMPOSE,
    duration_s,
    k8s_by_name,
    worker_deployment,
)

SERVICES = {"redis", "memcached", "api", "proxy", "worker", "flower", "prometheus", "grafana", "jaeger"}

# What `scripts/compose-secrets.sh > compose/.env` provides.
COMPOSE_ENV = {
    "FLOWER_BASIC_AUTH": "ops:secret",
    "GRAFANA_PASSWORD": "secret",
    "REDIS_API_PASSWORD": "api0pw",
    "REDIS_WORKER_PASSWORD": "worker0pw",
    "REDIS_FLOWER_PASSWORD": "flower0pw",
    "INFERPOOL_CACHE_KEY_SECRET": "0123456789abcdef0123456789abcdef",
}


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
    grace = worker_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert duration_s(worker["stop_grace_period"]) == grace


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
    assert duration_s(api["stop_grace_period"]) > drain


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
    kubernetes = k8s_by_name()["ConfigMap", "inferpool-haproxy"]["data"]["haproxy.cfg"]
    assert kubernetes == kubernetes_haproxy_config()
    for config in (compose, kubernetes):
        _haproxy_check(config, tmp_path)
    service = k8s_by_name()["Service", "inferpool-proxy"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("grpc", 50051)]


def test_headless_service_for_client_side_balancing() -> None:
    objects = k8s_by_name()
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
