"""Login attempts are also counted per client IP: index them by ip and time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 17:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index login attempts by client IP and time (per-IP throttling)."""
    op.create_index("ix_login_attempts_ip_at", "login_attempts", ["ip", "at"])


def downgrade() -> None:
    """Drop the per-IP index."""
    op.drop_index("ix_login_attempts_ip_at", table_name="login_attempts")
