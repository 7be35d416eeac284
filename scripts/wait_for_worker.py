"""Waits, at most `bound_s` seconds, until some Celery worker answers a ping on `broker_url`.

`make up` starts Flower with this in front: Flower asks the workers what they consume
only when it starts (or when someone forces a refresh), so a Flower that starts first
shows no workers and Celery's default queue. One process and one connection for the
whole wait, so it costs the worker, still warming its models, almost no CPU.

    python scripts/wait_for_worker.py redis://127.0.0.1:6379/0 [bound_s]

Exit status 0 once a worker answered, 1 when the bound passed first.
"""

from __future__ import annotations

import sys
import time

from celery import Celery


def main(argv: list[str]) -> int:
    url = argv[1]
    bound_s = float(argv[2]) if len(argv) > 2 else 300.0
    app = Celery("wait", broker=url, set_as_current=False)
    app.conf.update(broker_connection_timeout=1.0, broker_connection_retry=False)
    deadline = time.monotonic() + bound_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return 1
        try:
            if app.control.ping(timeout=min(1.0, left)):
                return 0
        except Exception:  # the broker is not up yet: a ping costs a second either way
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
