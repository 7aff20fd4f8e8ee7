"""Celery tasks, one thin module per domain; each registers under a name from ``backend.queue``."""
