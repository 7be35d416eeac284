"""Flower's configuration file (`celery flower --conf=scripts/flowerconfig.py`).

Flower executes this file at start-up. Flower 2.x serves `/metrics` without the basic
auth its pages and API require; wrapped in tornado's `authenticated`, the handler asks
for the same credentials (a wrong or missing password: 401). With no auth configured
nothing changes.
"""

import tornado.web
from flower.views.monitor import Metrics

Metrics.get = tornado.web.authenticated(Metrics.get)  # type: ignore[method-assign]
