"""Backbones: the engine's catalog as built-in entries, and users' uploaded weights for it."""
