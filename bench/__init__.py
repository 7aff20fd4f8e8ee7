"""Benchmarks of the PatchGD engine (scripts run with ``python -m bench.<name>``, not tests)."""
