"""What operators run and read: the Procfile, Flower, metrics, dashboards and the docs."""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.request
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from inferpool.api import metrics as api_metrics
from inferpool.names import bulk_queue_name, queue_name
from inferpool.workers import metrics as worker_metrics
from tests.servers import ROOT
from tests.unit.manifests import COMPOSE, metric_names


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


def test_dashboard_and_rules_use_exported_metrics() -> None:
    known = _sample_names()
    rules = yaml.safe_load((COMPOSE / "prometheus-rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"]}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert metric_names(rule["expr"]) <= known, rule["expr"]
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "inferpool.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 10
    for expr in exprs:
        unknown = metric_names(expr) - known - recorded
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
