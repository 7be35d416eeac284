"""A Celery task message carrying one envelope, as kombu's Redis transport stores it.

The API publishes envelopes from its event loop, with one pipelined LPUSH per batch
of ready envelopes. `send_task` would make the same LPUSH, but from a thread and
after about 600 µs of kombu machinery per message (a new redis client per command,
the declare cache, the retry wrapper), holding the GIL the gRPC loop needs.

Only the transport's wrapper is written here: Celery still builds the protocol-2
headers (`app.amqp.as_task_v2`) and kombu's serializer registry encodes the body.
The wrapper is kombu's virtual `Channel.prepare_message` plus
`_inplace_augment_message` for the anonymous exchange, which routes on the queue
name (priority 0 is the queue's own list). tests/test_taskwire.py checks it key for
key against what `send_task` writes, and a stock Celery worker consumes it.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu.serialization import dumps
from kombu.utils.json import dumps as json_dumps

from inferpool.codec import SERIALIZER

DELIVERY_MODE_PERSISTENT = 2


def task_payload(app: Celery, task: str, queue: str, body: bytes, expires_unix_ns: int) -> bytes:
    """The LPUSH value that publishes task `task(body)` on `queue`; workers discard it
    unseen after `expires_unix_ns` (when no caller in the envelope still waits)."""
    task_id = str(uuid.uuid4())
    expires = datetime.fromtimestamp(expires_unix_ns / 1e9, tz=UTC)
    message = app.amqp.as_task_v2(
        task_id,
        task,
        args=(body,),
        expires=expires,
        reply_to=app.thread_oid,
        ignore_result=True,
        # Celery would otherwise repr() the tensor bytes into the headers.
        argsrepr="",
        kwargsrepr="",
    )
    content_type, content_encoding, data = dumps(message.body, serializer=SERIALIZER)
    properties: dict[str, Any] = dict(message.properties)
    properties.update(
        delivery_mode=DELIVERY_MODE_PERSISTENT,
        # What send_task passes on for AMQP brokers' per-message TTL (ms, as a string).
        expiration=str(max(0, int((expires_unix_ns / 1e9 - app.now().timestamp()) * 1000))),
        delivery_info={"exchange": "", "routing_key": queue},
        priority=0,
        body_encoding="base64",
        delivery_tag=str(uuid.uuid4()),
    )
    rest = json_dumps(
        {
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": message.headers,
            "properties": properties,
        }
    ).encode()
    # Base64 needs no JSON escaping, so the body is spliced in, not run through the JSON
    # encoder: for an envelope of 30 digits images (96 KB) the encoder's scan of it took
    # 300 of the payload's 450 µs, on the API's event loop.
    return b'{"body": "' + base64.b64encode(data) + b'", ' + rest[1:]
