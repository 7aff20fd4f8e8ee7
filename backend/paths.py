"""Path convertors shared by the domains' routes.

``{user_id:row_id}`` matches only an integer-looking segment (``12``, ``-1``), so a literal sibling
such as ``/users/me`` is never taken for ``/users/{user_id}``: ``PATCH /users/me`` is a 405, not a
validation error or an admin-only 404. The value is passed on as text; the route's parameter type
parses and bounds it (out of range: 422).
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class RowIdConvertor(Convertor[str]):
    """An optionally signed run of digits, handed to the route unchanged."""

    regex = "-?[0-9]+"

    def convert(self, value: str) -> str:
        """The segment as matched."""
        return value

    def to_string(self, value: str) -> str:
        """The segment for ``url_path_for``."""
        return str(value)


register_url_convertor("row_id", RowIdConvertor())
