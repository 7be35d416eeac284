"""Flower's configuration file (`celery flower --conf=scripts/flowerconfig.py`).

Flower executes this file at start-up. Two patches:

- Flower 2.x serves `/metrics` without the basic auth its pages and API require;
  wrapped in tornado's `authenticated`, the handler asks for the same credentials (a
  wrong or missing password: 401). With no auth configured nothing changes.
- The queues of the Broker page and `/api/queues/length`: Flower lists the queues the
  workers report consuming, and Celery's default queue `celery` while it knows no
  worker. Here it lists each model's bulk queue beside its interactive one (the
  workers take bulk chunks from that Redis list themselves, so Celery never reports
  it), and never `celery`, which nothing in this project uses.

Flower's image carries this file and not the project's code, so the queue naming rule
(inferpool/names.py) is restated here; tests/unit/test_deploy.py checks they agree.
"""

from typing import Any

import tornado.web
from flower.views import BaseHandler
from flower.views.monitor import Metrics

PREFIX = "inferpool."
BULK_SUFFIX = ".bulk"


def queues_shown(worker_queues: set[str]) -> list[str]:
    """The queues the Broker page lists, given those the workers consume."""
    bulk = {q + BULK_SUFFIX for q in worker_queues if q.startswith(PREFIX) and not q.endswith(BULK_SUFFIX)}
    return sorted(worker_queues | bulk)


def _active_queue_names(self: Any) -> list[str]:
    return queues_shown(
        {q["name"] for info in self.application.workers.values() for q in info.get("active_queues", [])}
    )


Metrics.get = tornado.web.authenticated(Metrics.get)  # type: ignore[method-assign]
BaseHandler.get_active_queue_names = _active_queue_names
