"""`inferpool-worker`: a Celery worker consuming every model queue in the repository."""

from __future__ import annotations

import sys

from inferpool.names import queue_name
from inferpool.repository import RepositoryError
from inferpool.settings import SettingsError


def main(argv: list[str] | None = None) -> None:
    # Settings and the repository are validated when workers.app is imported.
    try:
        from workers.app import app, repository, settings
    except (SettingsError, RepositoryError) as exc:
        sys.exit(str(exc))

    extra = list(sys.argv[1:] if argv is None else argv)
    args = [
        "worker",
        # Threads, not prefork: one process holds the model once, and the batcher thread
        # merges the messages that the task threads decode concurrently.
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={','.join(queue_name(n) for n in repository.names)}",
        "--without-gossip",
        "--without-mingle",
        "--loglevel=INFO",
        "--hostname=inferpool@%h",
    ]
    # Later flags win in Celery's parser, so callers can override any of the above.
    app.worker_main([*args, *extra])


if __name__ == "__main__":
    main()
