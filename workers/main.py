"""`inferpool-worker`: a Celery worker consuming every model queue in the repository."""

from __future__ import annotations

import argparse
import logging
import sys

from inferpool import logs, tracing
from inferpool.heap import keep_large_buffers
from inferpool.names import bulk_queue_name, queue_name
from inferpool.repository import RepositoryError
from inferpool.settings import Settings, SettingsError


def _own_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits off the options Celery does not know; everything else goes to Celery."""
    parser = argparse.ArgumentParser(prog="inferpool-worker", add_help=False, allow_abbrev=False)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (0 picks a free one; default: INFERPOOL_METRICS_PORT, "
        "where 0 means off)",
    )
    parser.add_argument(
        "--metrics-host", default=None, help="address the metrics server binds (INFERPOOL_METRICS_HOST)"
    )
    return parser.parse_known_args(argv)


# Celery's two INFO lines per message ("Received task", "Task succeeded"): at a thousand
# messages a second they cost the task threads a tenth of their time, plus whatever
# ships the log. Flower lists every task; --loglevel=DEBUG brings the lines back.
PER_MESSAGE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def _log_level(args: list[str]) -> str:
    """The level the worker will run at: Celery takes the last -l/--loglevel given."""
    level = "INFO"
    for i, arg in enumerate(args):
        if arg.startswith("--loglevel="):
            level = arg.split("=", 1)[1]
        elif arg in ("-l", "--loglevel") and i + 1 < len(args):
            level = args[i + 1]
        elif arg.startswith("-l") and len(arg) > 2:
            level = arg[2:]
    return level.upper()


def main(argv: list[str] | None = None) -> None:
    keep_large_buffers()  # before the model's and the chunks' buffers exist
    from celery import signals

    from inferpool.workers import metrics
    from inferpool.workers.app import create_app, served_repository

    # Settings and the repository are validated here, before Celery starts.
    try:
        settings = Settings.from_env()
        repository = served_repository(settings)
        app = create_app(settings, repository)
    except (SettingsError, RepositoryError) as exc:
        sys.exit(str(exc))

    own, extra = _own_options(list(sys.argv[1:] if argv is None else argv))
    # Logging is set up now, not by Celery once the worker starts: the start-up lines
    # (device, threads, each model's warm-up) are written before that. A setup_logging
    # receiver tells Celery to leave the root logger as it is; --loglevel still applies.
    level = _log_level(["--loglevel=INFO", *extra])
    logs.configure(settings.log_format, level)
    signals.setup_logging.connect(
        lambda loglevel=None, **_: logging.getLogger().setLevel(loglevel or level), weak=False
    )
    try:
        tracing.setup(tracing.WORKER_SERVICE)
    except SettingsError as exc:
        sys.exit(str(exc))
    queues = [queue_name(n) for n in repository.names]
    metrics.install(app, [*queues, *(bulk_queue_name(n) for n in repository.names)])
    port = own.metrics_port if own.metrics_port is not None else (settings.metrics_port or None)
    if port is not None:
        metrics.serve(port, own.metrics_host or settings.metrics_host)
    args = [
        "worker",
        # Threads, not prefork: one process holds the model once, and the batcher thread
        # merges the messages that the task threads decode concurrently.
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        # No -E: task events (three Redis publishes per message, on the consumer's
        # thread) doubled a lone Classify's latency. Flower turns them on while it runs
        # (its enable_events broadcast, every 5 s); worker heartbeats, which feed its
        # worker list, are always sent. Pass -E to have them from the start.
        "--without-gossip",
        "--without-mingle",
        "--loglevel=INFO",
        "--hostname=inferpool@%h",
    ]
    # Later flags win in Celery's parser, so callers can override any of the above.
    if _log_level([*args, *extra]) != "DEBUG":
        for name in PER_MESSAGE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    app.worker_main([*args, *extra])


if __name__ == "__main__":
    main()
