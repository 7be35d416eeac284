"""Typed settings from INFERPOOL_* environment variables, validated once at start-up.

Every problem is reported together, naming the variable and what it expects, so a
misconfigured deployment fails at boot with one readable error instead of at the
first request.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from inferpool.names import MODEL_NAME_RE

ENV_PREFIX = "INFERPOOL_"
# Settings that were replaced: set, they stop the start with the name to use instead
# (ignored, they would silently change what a deployment does).
REPLACED = {
    "INFERPOOL_HTTP_ACCESS_LOG": "INFERPOOL_ACCESS_LOG, which covers the gRPC and the HTTP front",
}


# Query parameters whose values are secrets wherever they appear in a URL.
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:password|passwd|pwd|token|secret|access_key)=)[^&;#\s]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*")
# A malformed URL (`redis//:pw@host`) is not found as a URL; `:secret@` still is.
_USERINFO_PASSWORD = re.compile(r":[^\s:@'\"/]+@")
REDACTED = "***"


def _redact_url(match: re.Match[str]) -> str:
    url = match.group(0)
    scheme, _, rest = url.partition("://")
    # The authority ends at the first '/', '?' or '#'; its userinfo at the last '@'.
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + REDACTED
    return _SECRET_PARAM.sub(r"\1" + REDACTED, f"{scheme}://{userinfo}{at}{host}{rest[end:]}")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it (a password in the userinfo, a
    password or token in the query) replaced by ***, for messages and log lines."""
    return _USERINFO_PASSWORD.sub(":" + REDACTED + "@", _URL.sub(_redact_url, text))


class SettingsError(ValueError):
    """One or more settings are invalid; the message lists each of them. Credentials in
    it are redacted, whoever raises it: start-up errors end up in logs."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def _redis_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
    return raw


def _host_ports(raw: str) -> str:
    nodes = [node.strip() for node in raw.split(",") if node.strip()]
    if not nodes:
        return ""  # cache disabled
    for node in nodes:
        host, sep, port = node.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port[,host:port...], or empty to disable the cache")
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is listed twice")
    return ",".join(nodes)


def _broker_shards(raw: str) -> str:
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    models = []
    for entry in entries:
        model, sep, url = entry.partition("=")
        if not sep or not MODEL_NAME_RE.match(model.strip()):
            raise ValueError("expected model=redis://host:port/db entries, comma-separated")
        _redis_url(url.strip())
        models.append(model.strip())
    if len(set(models)) != len(models):
        raise ValueError("a model is listed twice")
    return ",".join(entries)


def _model_names(raw: str) -> str:
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not all(MODEL_NAME_RE.match(name) for name in names):
        raise ValueError("expected comma-separated model names")
    return ",".join(names)


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _share(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError("must be > 0 and <= 1")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value < 65536:
        raise ValueError("must be 0..65535 (0 picks a free port)")
    return value


def _device(raw: str) -> str:
    if raw not in ("auto", "cpu", "cuda") and not raw.startswith("cuda:"):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return raw


def _file(raw: str) -> str:
    if raw and not Path(raw).is_file():
        raise ValueError("no such file")
    return raw


def _command_names(raw: str) -> str:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not all(re.fullmatch(r"[a-z_]{1,40}", n) for n in names):
        raise ValueError("expected comma-separated command names (e.g. enable_events,heartbeat) or 'all'")
    return ",".join(names)


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError("expected text or json")
    return raw


def _setting(default: Any, parse: Callable[[str], Any], doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # Shared by the API and the workers.
    redis_url: str = _setting("redis://127.0.0.1:6379/0", _redis_url, "broker and reply store")
    broker_shards: str = _setting(
        "",
        _broker_shards,
        "model=redis://... entries, comma-separated: the Redis each listed model's requests, "
        "flight locks and replies use (the rest use redis_url); the same map for API and workers",
    )
    memcached: str = _setting(
        "127.0.0.1:11211",
        _host_ports,
        "cache nodes, host:port comma-separated (keys spread by rendezvous hashing; every API "
        "and worker must list the same nodes); empty disables it",
    )
    model_repository: Path = _setting(Path("models"), Path, "models/<name>/<version>/ tree")
    cache_ttl_s: int = _setting(3600, _positive_int, "lifetime of a cached result")
    local_cache_items: int = _setting(
        4096, _non_negative_int, "results each API process keeps in its own LRU before Memcached; 0 = off"
    )
    cache_timeout_ms: float = _setting(20.0, _positive_float, "bound on one cache call")
    reply_ttl_s: int = _setting(60, _positive_int, "lifetime of an unread reply list")
    job_ttl_s: int = _setting(86400, _positive_int, "lifetime of a bulk job's record and results")
    metrics_host: str = _setting("127.0.0.1", str, "address the Prometheus /metrics server binds")
    metrics_port: int = _setting(0, _port, "Prometheus /metrics port; 0 = no metrics server")
    log_format: str = _setting("text", _log_format, "log lines as text or json (one object per line)")
    access_log: bool = _setting(
        False, _bool, "one log line per call, gRPC and HTTP (inferpool.access); off by default for its CPU"
    )
    # API.
    grpc_host: str = _setting("127.0.0.1", str, "address the gRPC server binds")
    grpc_port: int = _setting(50051, _port, "gRPC port; 0 picks a free one")
    default_deadline_ms: float = _setting(5000.0, _positive_float, "wait bound for calls with no deadline")
    coalesce_window_ms: float = _setting(0.0, _non_negative_float, "extra wait to group misses")
    max_inflight_envelopes: int = _setting(1, _positive_int, "envelopes in flight per model")
    max_envelope_items: int = _setting(0, _non_negative_int, "misses per queue message; 0 = max_batch_size")
    max_message_bytes: int = _setting(4 * 1024 * 1024, _positive_int, "largest gRPC message accepted")
    health_interval_s: float = _setting(1.0, _positive_float, "period of the Redis health probe")
    # HTTP front (api/http/): KServe v2 REST, job endpoints and the page, beside gRPC.
    http_port: int = _setting(0, _port, "HTTP port (KServe v2 REST, jobs, the page at /); 0 = no HTTP server")
    http_host: str = _setting("127.0.0.1", str, "address the HTTP server binds")
    http_max_connections: int = _setting(
        1024, _positive_int, "HTTP requests held at once; more are answered 503 at once"
    )
    http_header_timeout_s: float = _setting(
        10.0, _positive_float, "an HTTP connection that has not sent a whole request head this long is closed"
    )
    http_body_timeout_s: float = _setting(
        10.0,
        _positive_float,
        "an HTTP body that sends nothing this long is refused (408); job uploads excepted",
    )
    http_cors_origins: str = _setting(
        "", str, "comma-separated origins allowed cross-origin calls; empty = CORS off"
    )
    # Shutdown on SIGTERM: NOT_SERVING at once, new calls still served for drain_s (so load
    # balancers see it and move away), then in-flight calls get shutdown_grace_s to finish.
    drain_s: float = _setting(
        0.0,
        _non_negative_float,
        "on SIGTERM, health NOT_SERVING but calls still served this long; a 2nd signal ends it",
    )
    shutdown_grace_s: float = _setting(
        5.0, _non_negative_float, "after draining, calls in flight get this long before they are cut"
    )
    # Admission (api/admission.py): refuse what cannot be answered in time, before it waits.
    max_concurrent_rpcs: int = _setting(
        512, _non_negative_int, "RPCs the server holds at once; more are refused at once; 0 = no bound"
    )
    admit_share: float = _setting(
        0.8, _share, "share of a call's remaining deadline its predicted wait may take"
    )
    shed_loop_lag_ms: float = _setting(
        100.0, _non_negative_float, "refuse inference calls while the event loop lags more; 0 = never"
    )
    # Connections: how long one may live, and how a vanished peer is noticed.
    max_connection_age_s: float = _setting(
        1800.0, _positive_float, "a client connection is asked to close (GOAWAY) after this long"
    )
    max_connection_age_grace_s: float = _setting(
        3600.0, _positive_float, "calls still open on a closing connection get this long, then are cut"
    )
    keepalive_time_s: float = _setting(
        60.0, _positive_float, "the server pings an idle connection this often to find vanished clients"
    )
    keepalive_timeout_s: float = _setting(
        20.0, _positive_float, "a ping unanswered this long closes the connection (its calls end)"
    )
    min_client_ping_interval_s: float = _setting(
        10.0, _positive_float, "clients pinging more often than this are disconnected"
    )
    # Security. Files are checked when read from the environment; api/auth.py
    # reads them at start-up (a missing or unreadable one stops the server there too).
    # Tokens: `name:token` entries; the name is the identity bulk jobs are scoped to.
    # Not in repr, and parsed by api/auth.py, whose errors never quote a token.
    auth_tokens_file: str = _setting("", _file, "bearer tokens, one name:token per line; empty = none")
    auth_tokens: str = field(
        default="",
        repr=False,
        metadata={"parse": str, "doc": "bearer tokens, comma-separated name:token entries"},
    )
    tls_cert_file: str = _setting("", _file, "PEM certificate chain of the gRPC port; empty = plain text")
    tls_key_file: str = _setting("", _file, "PEM private key of tls_cert_file")
    tls_client_ca_file: str = _setting("", _file, "PEM CA; when set, clients need a certificate it signed")
    memcached_tls_ca_file: str = _setting("", _file, "PEM CA for memcached's certificate; set = TLS on")
    memcached_tls_cert_file: str = _setting("", _file, "PEM client certificate for memcached (optional)")
    memcached_tls_key_file: str = _setting("", _file, "PEM key of memcached_tls_cert_file")
    # Cache keys. The secret keys every cache key (inferpool/cache.py): the API and all
    # workers must share it, and it is required while `memcached` is set. Not in repr;
    # errors never quote it. A new secret (rotation) starts from an empty cache.
    cache_key_secret: str = field(
        default="",
        repr=False,
        metadata={
            "parse": str,
            "doc": "secret keying cache keys (>= 16 characters), shared by API and workers",
        },
    )
    cache_key_secret_file: str = _setting("", _file, "file whose first line is cache_key_secret")
    cache_per_caller: bool = _setting(
        False, _bool, "with auth on, each caller's results are cached apart (no hits across tenants)"
    )
    bulk_chunk_items: int = _setting(256, _positive_int, "bulk items per queue message")
    max_job_items: int = _setting(10_000_000, _positive_int, "largest bulk job accepted")
    # Bounds on the job service's streams: what one caller can hold open, and for how long.
    upload_idle_timeout_s: float = _setting(
        30.0, _positive_float, "a job upload that sends nothing this long is broken off (job FAILED)"
    )
    upload_max_duration_s: float = _setting(
        3600.0, _positive_float, "a job upload still open after this long is broken off (job FAILED)"
    )
    max_uploads_per_caller: int = _setting(
        8, _positive_int, "job uploads one caller (token name, or peer address without auth) holds open"
    )
    max_uploads: int = _setting(64, _positive_int, "job uploads one API process holds open at once")
    watch_max_duration_s: float = _setting(
        600.0, _positive_float, "a WatchJob stream ends (OK, job still live) after this long"
    )
    # Worker.
    worker_models: str = _setting(
        "", _model_names, "models this worker serves, comma-separated; empty = every model in the repository"
    )
    worker_concurrency: int = _setting(8, _positive_int, "envelopes a worker holds at once")
    worker_prefetch: int = _setting(4, _positive_int, "messages reserved per concurrency slot")
    bulk_prefetch_chunks: int = _setting(4, _positive_int, "bulk chunks a worker holds at once")
    task_events_flush_ms: float = _setting(
        100.0,
        _non_negative_float,
        "task events (sent while Flower watches) leave in one message this often; 0 = after each send",
    )
    # Recovery: how soon a dead worker's bulk chunks, and a Redis that came back, are noticed.
    bulk_lease_s: float = _setting(
        3.0, _positive_float, "a bulk consumer silent this long is dead: its chunks go back on their queue"
    )
    bulk_lease_renew_s: float = _setting(
        1.0, _positive_float, "how often a bulk consumer renews its lease and reaps dead ones (<= lease/2)"
    )
    redis_reconnect_max_s: float = _setting(
        0.25, _positive_float, "longest wait between two attempts to reach a lost Redis"
    )
    worker_control_commands: str = _setting(
        "enable_events,disable_events,heartbeat,election",
        _command_names,
        "Celery remote-control commands a worker obeys, comma-separated (inspect stays on); 'all' = Celery's",
    )
    device: str = _setting("auto", _device, "torch device: auto picks CUDA when present")
    torch_threads: int = _setting(
        0, _non_negative_int, "intra-op CPU threads; 0 = the usable cores minus one (at least 1)"
    )
    compiled_cache_dir: str = _setting(
        "~/.cache/inferpool/compiled",
        str,
        "folder keeping compiled model forms between starts (AOTInductor packages, optimised ONNX graphs), "
        "keyed by model version, runtime version and device; empty = none kept",
    )
    ready_file: str = _setting(
        "",
        str,
        "file the worker creates once its models are loaded and warmed up and it consumes (removed at "
        "shutdown): a readiness probe's test; empty = none",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems = [f"{old} is no longer read: use {new}" for old, new in REPLACED.items() if old in env]
        for f in dataclasses.fields(cls):
            var = ENV_PREFIX + f.name.upper()
            if var not in env:
                continue
            raw = env[var].strip()
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                # A secret is never quoted, not even in part; anything else loses the
                # credentials a URL in it carries (SettingsError redacts the whole).
                shown = REDACTED if not f.repr else repr(raw)
                reason = REDACTED if not f.repr else str(exc)
                problems.append(f"{var}={shown}: {reason} ({f.metadata['doc']})")
        if problems:
            raise SettingsError("invalid inferpool settings:\n  " + "\n  ".join(problems))
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        # Settings get logged; their URLs may carry a password, and some fields are
        # secrets (repr=False) that are left out whole.
        shown = ", ".join(
            f"{f.name}={redact(repr(getattr(self, f.name)))}" for f in dataclasses.fields(self) if f.repr
        )
        return f"Settings({shown})"

    def env(self) -> dict[str, str]:
        """The settings as INFERPOOL_* variables, to hand to a child process."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}
