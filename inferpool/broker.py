"""The Celery app configuration both sides share (the API publishes, workers consume).

The API builds this app only to publish by task name; it never imports `workers`.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import kombu
import redis
from celery import Celery
from celery.app.amqp import AMQP
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from inferpool.codec import CONTENT_TYPE, register_serializer
from inferpool.names import is_interactive_queue
from inferpool.settings import Settings

log = logging.getLogger(__name__)

# While Redis is unreachable its clients retry several times a second; each says so this often.
LOST_LOG_EVERY_S = 10.0


class Reconnect:
    """The pace at which a client of a lost Redis tries again, and its log line: waits
    start at a quarter of `max_s` and double up to it (a refused connect costs nothing,
    and every step of waiting is time a restarted Redis goes unused); the loss is logged
    at most once every LOST_LOG_EVERY_S."""

    def __init__(self, what: str, max_s: float, logger: logging.Logger) -> None:
        self.what = what
        self.max_s = max_s
        self.logger = logger
        self._logged_at = -LOST_LOG_EVERY_S
        self.backoff_s = max_s / 4

    def reset(self) -> None:
        """Connected again: the next loss starts from the shortest wait."""
        self.backoff_s = self.max_s / 4

    def lost(self, exc: BaseException) -> float:
        """How long to wait before the next try."""
        now = time.monotonic()
        if now - self._logged_at >= LOST_LOG_EVERY_S:
            self._logged_at = now
            self.logger.warning(
                "%s lost Redis (%r); retrying every %.2fs or less", self.what, exc, self.max_s
            )
        wait_s = self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.max_s)
        return wait_s


# An interactive message still unacknowledged this long after delivery gets its entry
# in kombu's `unacked` hash; one acknowledged sooner never touches Redis for it.
DEFER_UNACKED_S = 0.05


class _QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with the bookkeeping of interactive messages that
    start at once deferred.

    Stock kombu writes each delivery to the `unacked` hash (a MULTI/EXEC with the whole
    message as JSON) before handing it on, and removes it on acknowledgement (another):
    two round trips on the consumer thread per message, 0.65 ms of a lone Classify's
    3.8 ms (measured). An interactive message is acknowledged when its task starts
    (acks_late=False). So one delivered while a pool thread is free (`defer_while`,
    set by the worker) gets its entry only if it is still unacknowledged
    DEFER_UNACKED_S later (write_deferred, on a timer of the worker's event loop); one
    delivered while every thread is busy is written at once, as stock, so the backlog
    KEDA scales on sees what workers hold, and the visibility timeout restores it if its
    worker dies. An entry not yet written is restored from memory at shutdown, as the
    stock one would have been. Bulk chunks (acknowledged after their results are
    written) and every process that sets no gate keep the stock path.
    """

    # Whether a message delivered now starts at once; None: never defer.
    defer_while: Callable[[], bool] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # delivery tag -> (wall-clock delivery time, message), in delivery order
        self._deferred: dict[str, tuple[float, Any]] = {}
        # Acks may come from other threads than the consumer's.
        self._deferred_lock = threading.Lock()

    def append(self, message: Any, delivery_tag: str) -> None:
        gate = _QoS.defer_while
        if gate is None or not is_interactive_queue(message.delivery_info["routing_key"]) or not gate():
            super().append(message, delivery_tag)
            return
        with self._deferred_lock:
            self._deferred[delivery_tag] = (time.time(), message)
        virtual.QoS.append(self, message, delivery_tag)

    def _take_deferred(self, delivery_tag: str) -> Any | None:
        with self._deferred_lock:
            entry = self._deferred.pop(delivery_tag, None)
        return None if entry is None else entry[1]

    def ack(self, delivery_tag: str) -> None:
        if self._take_deferred(delivery_tag) is None:
            self._remove_from_indices(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        elif self._take_deferred(delivery_tag) is None:
            self._remove_from_indices(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        message = self._take_deferred(tag)
        if message is None:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
            return
        delivery = message.delivery_info
        with self.channel.conn_or_acquire(client) as conn:
            pipe = conn.pipeline()
            self.channel._do_restore_message(
                message._raw, delivery["exchange"], delivery["routing_key"], pipe, leftmost
            )
            pipe.execute()

    def write_deferred(self, older_than_s: float) -> None:
        """Writes the entries of interactive messages unacknowledged for older_than_s."""
        cutoff = time.time() - older_than_s
        # Held across the write: an ack that raced it would remove the entry before it
        # was written, and leave it for the visibility timeout to redeliver.
        with self._deferred_lock:
            due = [tag for tag, (delivered, _) in self._deferred.items() if delivered <= cutoff]
            if not due:
                return
            with self.pipe_or_acquire() as pipe:
                for tag in due:
                    delivered, message = self._deferred[tag]
                    delivery = message.delivery_info
                    pipe.zadd(self.unacked_index_key, {tag: delivered})
                    pipe.hset(
                        self.unacked_key,
                        tag,
                        dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                    )
                pipe.execute()
            for tag in due:
                del self._deferred[tag]


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one client for its blocking commands. Stock kombu
    builds a new redis.Redis for each of them (each delivery's unacked bookkeeping,
    each ack, each publish): 75 µs apiece with redis-py 8, on the worker's consumer
    thread. The client is thread-safe and the pool is the channel's either way."""

    QoS = _QoS
    _sync_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


def defer_unacked_while(gate: Callable[[], bool] | None) -> None:
    """Defers the `unacked` entry of interactive messages delivered while gate() holds
    (see _QoS); None turns deferral off. Process-wide: the worker sets it at start."""
    _QoS.defer_while = gate


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel
    _write_deferred_tref: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        # Registered again on each reconnect: one timer, not one per connection.
        if self._write_deferred_tref is not None:
            self._write_deferred_tref.cancel()
        self._write_deferred_tref = loop.call_repeatedly(DEFER_UNACKED_S, self._write_deferred)

    def _write_deferred(self) -> None:
        poller: Any = self.cycle  # kombu's MultiChannelPoller for this transport
        for channel in list(poller._channels):
            qos = channel._qos  # None until the channel first consumes
            if isinstance(qos, _QoS):
                try:
                    qos.write_deferred(DEFER_UNACKED_S)
                except redis.RedisError as exc:
                    # Kept, and tried again on the next tick; the consumer sees the
                    # outage itself and reconnects.
                    log.warning("writing deferred unacked entries failed: %r", exc)


class _Connection(kombu.Connection):
    """kombu's connection, reconnecting at the pace its transport options set.

    Celery's consumer re-establishes a lost broker connection with kombu's default
    pace: attempts 2, 4, 6 ... up to 30 s apart. A worker whose Redis was down for three
    seconds slept through its return and answered nothing for about three more (measured:
    2.8-3.1 s from Redis answering PING to the first Classify answered). kombu already
    reads `interval_start`/`interval_step`/`interval_max` from the transport options when
    it connects on its own; this applies them to Celery's reconnect loop too."""

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        # Celery passes (errback, max_retries) positionally and the rest by name.
        if len(args) <= 2:
            options = self.transport_options or {}
            for name in ("interval_start", "interval_step", "interval_max"):
                if name in options:
                    kwargs.setdefault(name, options[name])
            if args and args[0] is not None:
                args = (_now_and_then(args[0]), *args[1:])
        return super().ensure_connection(*args, **kwargs)


# Celery logs an ERROR per failed attempt; at the pace above, that would be several a
# second for as long as Redis is down.
RECONNECT_LOG_EVERY_S = 10.0


def _now_and_then(errback: Callable[..., Any]) -> Callable[..., Any]:
    """errback, called for the first failed attempt and then at most every RECONNECT_LOG_EVERY_S."""
    last = [-RECONNECT_LOG_EVERY_S]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - last[0] < RECONNECT_LOG_EVERY_S:
            return None
        last[0] = now
        return errback(*args, **kwargs)

    return wrapped


class _AMQP(AMQP):
    Connection = _Connection


def make_celery(settings: Settings, main: str = "inferpool", broker_url: str = "") -> Celery:
    """The app on `broker_url` (a shard of inferpool.shards), or on redis_url."""
    register_serializer()
    broker_url = broker_url or settings.redis_url
    app = Celery(main, broker=broker_url, set_as_current=False, amqp=f"{__name__}:_AMQP")
    app.conf.update(
        # Envelopes name their serializer on each publish (see api/publisher.py); the
        # default stays json because Celery's control mailbox (ping, inspect) uses it.
        task_serializer="json",
        accept_content=[CONTENT_TYPE, "json"],  # never pickle
        result_backend=None,
        task_ignore_result=True,
        # Interactive requests are deadline-bound: a lost one is answered by its deadline,
        # and redelivering it after a crash would compute an answer nobody waits for.
        task_acks_late=False,
        worker_prefetch_multiplier=settings.worker_prefetch,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A worker exists to consume: it waits for its broker however long it is gone
        # (Celery's default gives up after 100 attempts, minutes at the pace below).
        broker_connection_max_retries=None,
        # Publishing is on the request path: fail fast and let the caller see UNAVAILABLE.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1},
        broker_transport_options={
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            # Reconnect attempts (see _Connection): a refused connect costs nothing, and
            # each step of waiting is time a restarted Redis goes unused.
            "interval_start": 0.0,
            "interval_step": settings.redis_reconnect_max_s / 4,
            "interval_max": settings.redis_reconnect_max_s,
        },
        worker_enable_remote_control=True,
    )
    scheme = urlsplit(broker_url).scheme
    # Plain redis:// only: for rediss:// kombu derives TLS defaults from the scheme name,
    # which naming a transport class would bypass.
    if scheme == "redis":
        app.conf.broker_transport = f"{__name__}:RedisTransport"
    elif scheme == "rediss":
        # For a rediss:// URL that names no ssl_* option, kombu (unlike redis-py, which
        # the API's own clients use) connects without checking the certificate. This
        # makes both verify; ssl_* options in the URL replace it whole, so
        # `ssl_cert_reqs=none` stays an explicit way out.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app
