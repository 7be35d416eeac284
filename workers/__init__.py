"""The worker side: a Celery app whose tasks feed per-model micro-batchers running PyTorch."""
