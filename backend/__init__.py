"""Tessera web platform: API, HTML UI, services and persistence (never imports torch)."""
