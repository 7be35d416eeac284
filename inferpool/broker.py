"""The Celery app configuration both sides share (the API publishes, workers consume).

The API builds this app only to publish by task name; it never imports `workers`.
"""

from __future__ import annotations

from celery import Celery

from inferpool.codec import CONTENT_TYPE, register_serializer
from inferpool.settings import Settings


def make_celery(settings: Settings, main: str = "inferpool") -> Celery:
    register_serializer()
    app = Celery(main, broker=settings.redis_url, set_as_current=False)
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
        # Publishing is on the request path: fail fast and let the caller see UNAVAILABLE.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1},
        broker_transport_options={
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
        },
        worker_enable_remote_control=True,
    )
    return app
