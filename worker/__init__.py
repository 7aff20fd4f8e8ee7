"""Tessera workers: Celery tasks and the PatchGD engine."""
