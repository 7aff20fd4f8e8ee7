"""Login attempts being checked are marked pending, so a burst of right passwords waits for them
instead of being refused as if they had failed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 18:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the pending flag (existing attempts are settled)."""
    with op.batch_alter_table("login_attempts") as batch:
        batch.add_column(sa.Column("pending", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    """Drop the pending flag."""
    with op.batch_alter_table("login_attempts") as batch:
        batch.drop_column("pending")
