"""L7 proxies in front of several API replicas: HAProxy (the one deployed) and nginx
(measured against it), each as a real process with a generated config.

HAProxy balances gRPC calls (HTTP/2 streams) round-robin over HTTP/2 backends and
checks each backend through `grpc.health.v1.Health/Check`: a replica that answers
NOT_SERVING (draining after SIGTERM, or without Redis) gets no new calls. HAProxy 2.6's
`http-check send` cannot carry the NUL bytes of a gRPC message frame, so the check is
a `tcp-check` that sends one complete HTTP/2 exchange (connection preface, SETTINGS,
HEADERS, the 5-byte empty HealthCheckRequest) and expects the bytes of a SERVING
answer. nginx (open source) has no active health checks: it only notices a replica
once connecting to it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.stack import free_port, wait_port

# The gRPC message frame of HealthCheckResponse{status: SERVING}: flag 0, length 2,
# field 1 (varint) = 1. NOT_SERVING ends in 02 and does not match.
SERVING_FRAME_HEX = "00000000020801"


def _literal(index: int, value: bytes) -> bytes:
    """An HPACK header field without indexing, its name from the static table."""
    prefix = bytes([index]) if index < 15 else bytes([0x0F, index - 15])
    return prefix + bytes([len(value)]) + value


def health_check_hex(authority: str = "localhost") -> str:
    """The bytes (hex) of an HTTP/2 client asking Health/Check for the whole server ("")."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = bytes.fromhex("000000040000000000")
    block = (
        b"\x83"  # :method POST
        + b"\x86"  # :scheme http
        + _literal(4, b"/grpc.health.v1.Health/Check")
        + _literal(1, authority.encode())
        + _literal(31, b"application/grpc")
        + b"\x00\x02te\x08trailers"
    )
    stream_1 = (1).to_bytes(4, "big")
    headers = len(block).to_bytes(3, "big") + b"\x01\x04" + stream_1 + block  # HEADERS, END_HEADERS
    data = (5).to_bytes(3, "big") + b"\x00\x01" + stream_1 + b"\x00" * 5  # DATA, END_STREAM
    return (preface + settings + headers + data).hex()


# The calls the in-flight guard refuses: inference, never job streams or health checks.
INFERENCE_PATHS = "/inferpool.v1.InferenceService/Classify /inference.GRPCInferenceService/ModelInfer"


def haproxy_config(
    listen: str,
    backends: list[str] | None = None,
    *,
    template: tuple[str, int] | None = None,
    resolvers: str = "",
    check_inter_ms: int = 500,
    timeout_s: int = 3700,
    stats_socket: str = "",
    monitor: str = "",
    maxconn: int = 4000,
    http: tuple[str, str] | None = None,
    inflight_limit: int = 0,
) -> str:
    """An HAProxy config: `listen` (host:port, HTTP/2 cleartext) round-robin over the
    replicas, each health-checked every `check_inter_ms`. The replicas are `backends`
    (host:port each), or `template` = (name:port, n): up to n servers from the name's
    DNS A records, re-resolved through `resolvers` (`nameserver NAME IP:PORT` lines, or
    `parse-resolv-conf`), as compose's and Kubernetes' replicas come and go.
    `monitor` (host:port) answers GET /healthz 200 while at least one replica is up.
    `http` = (listen, name:port): the replicas' HTTP front too (template only), checked
    on its KServe readiness route.
    `inflight_limit` (0: none): inference calls past that many in flight per replica
    up (every call through the proxy counts toward it) are refused by HAProxy itself,
    as a gRPC RESOURCE_EXHAUSTED (a trailers-only answer), in well under a millisecond
    and without a byte reaching a replica. A grpc.aio server takes calls from gRPC's core
    one per event-loop turn: past what that allows, calls wait in the core, where no
    handler sees them, until their deadlines pass."""
    check = f"check inter {check_inter_ms}ms fall 2 rise 1"
    if template is not None:
        name, count = template
        servers = f"  server-template api {count} {name} proto h2 {check} resolvers dns init-addr none"
        resolver_section = "\nresolvers dns\n" + "".join(f"  {line}\n" for line in resolvers.splitlines())
        resolver_section += "  hold valid 5s\n"
    else:
        servers = "\n".join(
            f"  server api{i} {address} proto h2 {check}" for i, address in enumerate(backends or [])
        )
        resolver_section = ""
    http_section = ""
    if http is not None and template is not None:
        http_listen, http_name = http
        http_section = f"""
frontend http
  bind {http_listen}
  default_backend api_http

backend api_http
  balance roundrobin
  option httpchk GET /v2/health/ready
  server-template api_http {template[1]} {http_name} {check} resolvers dns init-addr none
"""
    stats = f"  stats socket {stats_socket} level admin\n" if stats_socket else ""
    # Per replica up: the bound grows and shrinks with the replicas HAProxy sees.
    guard = (
        f"  acl inference path {INFERENCE_PATHS}\n"
        f"  http-request set-var(txn.inflight_cap) nbsrv(api),mul({inflight_limit}) if inference\n"
        "  http-request return status 200 hdr content-type application/grpc hdr grpc-status 8 "
        f'hdr grpc-message "inferpool%%20is%%20at%%20its%%20limit%%20of%%20{inflight_limit}%%20calls%%20'
        'in%%20flight%%20per%%20replica%%3B%%20retry%%20later" '
        "if inference { nbsrv(api) gt 0 } { be_conn(api),sub(txn.inflight_cap) ge 0 }\n"
        if inflight_limit
        else ""
    )
    health = (
        f"""
frontend health
  bind {monitor}
  monitor-uri /healthz
  monitor fail if {{ nbsrv(api) lt 1 }}
"""
        if monitor
        else ""
    )
    return f"""# Generated by bench/proxies.py (haproxy_config): gRPC over HTTP/2, round-robin per call,
# each replica checked through grpc.health.v1 (a draining replica reports NOT_SERVING).
global
  maxconn {maxconn}
{stats}
defaults
  mode http
  timeout connect 1s
  # Uploads and WatchJob streams last long; the API bounds them itself.
  timeout client {timeout_s}s
  timeout server {timeout_s}s
  timeout check 1s
  # A call goes elsewhere only if it never reached a replica (its connection refused),
  # never one it may have run: a submit without an idempotency key must not run twice.
  retries 2
  retry-on conn-failure
  option redispatch
{resolver_section}
frontend grpc
  bind {listen} proto h2
{guard}  default_backend api
{health}
backend api
  balance roundrobin
  # Health/Check over one HTTP/2 exchange: HAProxy 2.6's http-check cannot send the NUL
  # bytes of a gRPC message, so the bytes are spelt out (bench/proxies.py).
  option tcp-check
  tcp-check connect
  tcp-check send-binary {health_check_hex()}
  tcp-check expect binary {SERVING_FRAME_HEX}
{servers}
{http_section}"""


# The deployed proxies' bound on inference calls in flight per API replica: about one
# full batch of the default model waiting per replica, well within what one grpc.aio
# process takes from gRPC's core without a queue forming there (docs/scaling.md).
INFLIGHT_PER_REPLICA = 64


def compose_haproxy_config() -> str:
    """compose/haproxy.cfg: the `api` service's replicas, found through Docker's DNS."""
    return haproxy_config(
        ":50051",
        template=("api:50051", 16),
        resolvers="nameserver docker 127.0.0.11:53",
        monitor=":8404",
        http=(":8080", "api:8080"),
        inflight_limit=INFLIGHT_PER_REPLICA,
    )


def kubernetes_haproxy_config() -> str:
    """The config in compose/k8s/haproxy.yaml: the headless Service's pods (the name is
    fully qualified: HAProxy's resolver does not apply the search domains)."""
    return haproxy_config(
        ":50051",
        template=("inferpool-api-headless.default.svc.cluster.local:50051", 64),
        resolvers="parse-resolv-conf",
        monitor=":8404",
        inflight_limit=INFLIGHT_PER_REPLICA,
    )


def nginx_config(listen: str, backends: list[str], workdir: Path) -> str:
    """An nginx config: `listen` (HTTP/2 cleartext) grpc_pass'ed round-robin to `backends`."""
    servers = "\n".join(f"    server {address} max_fails=1 fail_timeout=2s;" for address in backends)
    return f"""daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  upstream api {{
{servers}
    keepalive 64;
  }}
  server {{
    listen {listen} http2;
    client_max_body_size 0;
    grpc_read_timeout 3700s;
    grpc_send_timeout 3700s;
    # Only calls that never reached a replica go elsewhere (see haproxy_config).
    grpc_next_upstream error;
    location / {{ grpc_pass grpc://api; }}
  }}
}}
"""


def binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found: run scripts/ensure-servers.sh (or apt-get install {name})")
    return path


class ProxyProcess:
    """HAProxy or nginx on a free loopback port in front of `backends`, until stop()."""

    def __init__(
        self,
        kind: str,
        backends: list[str],
        log: Path | None = None,
        check_inter_ms: int = 200,
        inflight_limit: int = 0,
    ) -> None:
        if kind not in ("haproxy", "nginx"):
            raise ValueError(f"unknown proxy {kind!r}")
        self.kind = kind
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"inferpool-{kind}-"))
        # nginx's workers drop to nobody when started as root: they must reach the temp dirs.
        os.chmod(self.workdir, 0o755)
        listen = f"127.0.0.1:{self.port}"
        self.stats_socket = str(self.workdir / "stats.sock")
        if kind == "haproxy":
            config = haproxy_config(
                listen,
                backends,
                check_inter_ms=check_inter_ms,
                timeout_s=60,
                stats_socket=self.stats_socket,
                inflight_limit=inflight_limit,
            )
            path = self.workdir / "haproxy.cfg"
            args = [binary("haproxy"), "-db", "-f", str(path)]
        else:
            config = nginx_config(listen, backends, self.workdir)
            path = self.workdir / "nginx.conf"
            args = [binary("nginx"), "-c", str(path), "-e", "stderr"]
        path.write_text(config)
        self.log = log or self.workdir / f"{kind}.log"
        self._out = self.log.open("ab")
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, 10, self.popen)
        except BaseException:
            self.stop()
            raise
        self.target = listen

    def servers_up(self) -> dict[str, bool]:
        """HAProxy's view of each backend (by name api0, api1, ...): up or not."""
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.stats_socket)
            s.sendall(b"show servers state api\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().splitlines()
        # Fields: be_id be_name srv_id srv_name srv_addr srv_op_state ... (2 = running)
        return {f[3]: f[5] == "2" for f in (line.split() for line in lines[2:]) if len(f) > 5}

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    import sys

    # `python -m bench.proxies compose > compose/haproxy.cfg`; `kubernetes` prints the
    # config compose/k8s/haproxy.yaml carries.
    print({"compose": compose_haproxy_config, "kubernetes": kubernetes_haproxy_config}[sys.argv[1]](), end="")
