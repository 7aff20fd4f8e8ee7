"""Checks on text users send that is stored as is (names, file names, usernames).

Postgres refuses NUL characters in text columns (a 500 if one slipped through), and control
characters in a name only ever confuse the pages that show it, so every stored name is checked
here first.
"""

from __future__ import annotations

import unicodedata


def has_control_characters(value: str) -> bool:
    """True when ``value`` holds a NUL or another control character (tabs and newlines included)."""
    return any(unicodedata.category(char) == "Cc" for char in value)


def without_control_characters(value: str, replacement: str = "_") -> str:
    """``value`` with each control character replaced (for file names that are only displayed)."""
    return "".join(replacement if unicodedata.category(char) == "Cc" else char for char in value)
