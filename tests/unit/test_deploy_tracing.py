"""The Kubernetes manifests' tracing wiring (the rest of the manifest checks:
tests/unit/test_deploy.py): one ConfigMap switch, empty by default, turns tracing on
for the API and the workers alike, each under its own service name, and an empty
endpoint really means off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from inferpool import tracing
from tests.unit.manifests import COMPOSE, container_env, k8s_by_name

DEPLOYMENTS = {"inferpool-api": tracing.API_SERVICE, "inferpool-worker": tracing.WORKER_SERVICE}
# The samplers OpenTelemetry's SDK knows by name (OTEL_TRACES_SAMPLER).
SAMPLERS = {
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
}
# What the downward API would hand the pods here.
FIELDS = {"metadata.name": "pod-0", "metadata.namespace": "ns-0"}


def _config() -> dict[str, str]:
    data: dict[str, str] = k8s_by_name()["ConfigMap", "inferpool"]["data"]
    return data


def _container(deployment: str) -> dict[str, Any]:
    (container,) = k8s_by_name()["Deployment", deployment]["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(deployment: str, config: dict[str, str]) -> dict[str, str]:
    """The OTEL_* environment a pod of `deployment` gets with ConfigMap data `config`:
    envFrom first, then env in order, `$(VAR)` expanded from the variables before it
    as Kubernetes does (an unknown one is left as written)."""
    container = _container(deployment)
    refs = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
    assert refs == ["inferpool"], f"{deployment} must take its settings from the inferpool ConfigMap"
    env = dict(config)
    for name, entry in container_env(container).items():
        if "value" in entry:
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        elif "fieldRef" in entry.get("valueFrom", {}):
            env[name] = FIELDS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return {k: v for k, v in env.items() if k.startswith("OTEL_")}


def test_the_configmap_holds_the_one_switch_and_it_is_off() -> None:
    config = _config()
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    assert config["OTEL_TRACES_SAMPLER"] in SAMPLERS
    assert 0.0 < float(config["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0
    for deployment, service in DEPLOYMENTS.items():
        env = _pod_env(deployment, config)
        assert tracing.endpoint(env) == "", f"{deployment} traces with the shipped ConfigMap"
        # The endpoint and sampler are the ConfigMap's alone: no Deployment overrides
        # them, so one edit turns tracing on (or off) everywhere.
        own = set(container_env(_container(deployment)))
        assert not own & {k for k in config if k.startswith("OTEL_")}, deployment
        assert env["OTEL_SERVICE_NAME"] == service
        attributes = dict(pair.split("=", 1) for pair in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
        assert attributes == {
            "k8s.pod.name": "pod-0",
            "k8s.namespace.name": "ns-0",
            "k8s.deployment.name": deployment,
        }


def test_compose_and_kubernetes_set_the_same_tracing_variables() -> None:
    shared = yaml.safe_load((COMPOSE / "compose.yaml").read_text())["x-inferpool-env"]
    compose = {k for k in shared if k.startswith("OTEL_")}
    kubernetes = {k for k in _config() if k.startswith("OTEL_")}
    assert compose == kubernetes


_PROBE = """
import json, sys
from inferpool import tracing
import inferpool.api.server, workers.batcher, workers.bulk
on = tracing.setup(sys.argv[1])
resource = tracing.resource_attributes()
tracing.shutdown()
ours = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
loaded = sorted(m for m in sys.modules if m.startswith(ours))
print(json.dumps({"on": on, "resource": resource, "loaded": loaded}))
"""


def _probe(env: dict[str, str], service: str) -> dict[str, Any]:
    """What a process started with `env` does: tracing.setup() reads os.environ there,
    as the API's and the worker's start-up do."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, service],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **env},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_an_empty_endpoint_is_off_and_a_set_one_is_on_with_the_pods_names(deployment: str) -> None:
    config = _config()
    off = _probe(_pod_env(deployment, config), "unnamed")
    assert off == {"on": False, "resource": {}, "loaded": []}
    # Blank is off too, also for the traces-only variable.
    blank = {**_pod_env(deployment, config), "OTEL_EXPORTER_OTLP_ENDPOINT": "  "}
    assert _probe({**blank, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}, "unnamed")["on"] is False
    # Filled in, the same wiring turns tracing on, under the Deployment's service name.
    filled = {**config, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    on = _probe(_pod_env(deployment, filled), "unnamed")
    assert on["on"] is True
    assert on["resource"]["service.name"] == DEPLOYMENTS[deployment]
    assert on["resource"]["k8s.pod.name"] == "pod-0"
    assert on["resource"]["k8s.deployment.name"] == deployment
